"""Side by side with upstream natc (v1.102.3) on one real tailnet (issue 16): one table, ours | natc | ratio.

    ./dev bench bench_natc [--seconds 5] [--rounds 2] [--budget 420]

Needs root and the real-tailnet peers (``./dev peers``: headscale, tailscaled, natc). Brings up the
tier's tailnet (tests/realnet/tailnet.py, tests/realnet/natc.py): the product as it ships (``appconnector
run`` beside tailscaled on c1, pool 100.64.1.0/24) and natc as its own tsnet node (pool 100.64.2.0/24),
both asking the same upstream, clients cl1 and cl2. Every row is measured from the client namespaces
through WireGuard to each connector's DNS address and pool addresses; the two run alternately (ours,
natc, ours, natc … for ``--rounds``) and the best round of each is kept. Stops by itself: every stage
checks ``--budget`` seconds and the rest is skipped (and says so) once it is spent.

Rows: known-name DNS qps (dnsperf, 4 senders in each of the two clients at once) and p99 (a third
sender timing every query during that load); first answer of a new name p50/p99; connect time, DNS
answer → first byte of an HTTP reply through the pool address, p50/p99; TCP throughput (iperf3); short
connections/s (connect, GET, close); UDP and ICMP through a pool address; RSS and CPU of each at idle and
under the DNS load (ours: appconnector + its tailscaled; natc: its one process, which holds its own
tailnet stack). Clusters of 3, failover and the 100k-mapping scale rows: bench_natc_cluster.py.

Prints a markdown table (paste into bench/README.md under "natc").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.realnet.natc import (
    NATC_DNS,
    OURS_DNS,
    Natc,
    allow_natc,
    natc_missing,
    ours_config,
    stable_name,
    start_corpus_upstream,
)
from tests.realnet.tailnet import HTTP_PORT, SERVED, Node, resolve_in, running

SYSTEMS = ("ours", "natc")
DNS = {"ours": OURS_DNS, "natc": NATC_DNS}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self, what: str) -> bool:
        if time.monotonic() < self.end:
            return True
        self.skipped.append(what)
        return False


def cpu_ticks(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def dnsperf(client: Node, server: str, seconds: float, out: list[float]) -> None:
    qfile = client.dir / "dnsperf.queries"
    qfile.write_text("web.app.test A\n")
    r = client.run("dnsperf", "-s", server, "-d", str(qfile), "-l", str(seconds), "-c", "4", "-T", "2",
                   "-t", "2", check=False, timeout=seconds + 30)
    for line in r.stdout.splitlines():
        if "Queries per second" in line:
            out.append(float(line.split()[-1]))


def timed_queries(ns: str, server: str, names: Callable[[int], str], n: int, until: float = 0) -> list[float]:
    """Seconds per A query (sequential), ``n`` queries or until ``until`` (monotonic)."""
    lat: list[float] = []
    i = 0
    while (i < n) if not until else (time.monotonic() < until):
        t = time.perf_counter()
        try:
            rc, addrs = resolve_in(ns, names(i), server, timeout=2)
            if rc == 0 and addrs:
                lat.append(time.perf_counter() - t)
        except Exception:
            pass
        i += 1
    return lat


def first_byte(client: Node, address: str, timeout: float = 5) -> float | None:
    t = time.perf_counter()
    try:
        with client.sockets():
            s = socket.create_connection((address, HTTP_PORT), timeout=timeout)
        with s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            if not s.recv(1):
                return None
    except OSError:
        return None
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", type=float, default=420)
    args = ap.parse_args()
    if (reason := natc_missing()) is not None:
        print(f"bench_natc: {reason}", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    conn_names = [stable_name("connect", i) for i in range(60)]
    with running(Path(tempfile.mkdtemp(prefix="bench-natc-")), "bn") as net:
        allow_natc(net)
        upstream = start_corpus_upstream(net)
        try:
            net.serve_origin(SERVED + conn_names)
            c1 = net.connector("c1")
            natc = Natc(net, "natc", 21)
            cl1, cl2 = net.client("cl1"), net.client("cl2", user="bob")
            net.wait_online()
            c1.start_appconnector(ours_config(c1))
            cl1.pool_address("web.app.test")
            natc.wait_serving(cl1)
            natc.wait_serving(cl2)
            iperf = subprocess.Popen(["ip", "netns", "exec", net.ns("origin"), "iperf3", "-s"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                rows = measure(c1, natc, cl1, cl2, conn_names, args, budget)
            finally:
                os.killpg(iperf.pid, 9)
                iperf.wait()
        finally:
            upstream.close()
    print_table(rows, budget, args)
    return 0


Row = tuple[str, str, str, str]
Results = dict[str, dict[str, float | str]]   # system -> row key -> figure (or what happened)
Spec = list[tuple[str, str, str, int, bool]]  # (label, key, unit, digits, higher is better)


def keep_best(res: Results, system: str, key: str, value: float, higher: bool = True) -> None:
    """Keep the best round's figure of ``key``."""
    old = res[system].get(key)
    if not isinstance(old, float) or (value > old if higher else value < old):
        res[system][key] = value


def table_rows(res: Results, spec: Spec) -> list[Row]:
    """(label, ours, natc, ratio) per row of ``spec``; ratio = ours/natc where higher is better,
    natc/ours where lower is; "—" where either is not a figure."""
    def fmt(v: float | str | None, unit: str, digits: int) -> str:
        if v is None:
            return "not measured"
        return v if isinstance(v, str) else f"{v:,.{digits}f}{unit}"

    def ratio(key: str, higher: bool) -> str:
        o, n = res["ours"].get(key), res["natc"].get(key)
        if not isinstance(o, float) or not isinstance(n, float) or not o or not n:
            return "—"
        return f"{(o / n if higher else n / o):.2f}×"
    return [(label, fmt(res["ours"].get(key), unit, d), fmt(res["natc"].get(key), unit, d), ratio(key, higher))
            for label, key, unit, d, higher in spec]


def measure(c1: Node, natc: Natc, cl1: Node, cl2: Node, conn_names: list[str],
            args: argparse.Namespace, budget: Budget) -> list[Row]:
    assert c1.appconnector is not None and c1.tailscaled is not None
    pids = {"ours": [c1.appconnector.pid, c1.tailscaled.pid], "natc": [natc.proc.pid]}
    res: Results = {s: {} for s in SYSTEMS}

    def best(system: str, key: str, value: float, higher: bool = True) -> None:
        keep_best(res, system, key, value, higher)

    # idle resource use first (nothing asked yet beyond the readiness probes)
    for s in SYSTEMS:
        c0 = cpu_ticks(pids[s])
        time.sleep(3)  # a measurement window, not a wait for a condition
        res[s]["idle_cpu"] = (cpu_ticks(pids[s]) - c0) / 3 * 100
        res[s]["idle_rss"] = rss_mib(pids[s])

    for rnd in range(args.rounds):
        for s in SYSTEMS:
            if not budget.left(f"DNS load round {rnd + 1} ({s})"):
                continue
            qps: list[float] = []
            natc.prime(cl1)  # natc's netstack keeps its DNS address 2 min after this (tests/realnet/natc.py)
            c0 = cpu_ticks(pids[s])
            ts = [threading.Thread(target=dnsperf, args=(c, DNS[s], args.seconds, qps)) for c in (cl1, cl2)]
            for t in ts:
                t.start()
            lat = timed_queries(cl1.ns, DNS[s], lambda i: "web.app.test", 0, until=time.monotonic() + args.seconds)
            for t in ts:
                t.join()
            cpu = (cpu_ticks(pids[s]) - c0) / args.seconds * 100
            if qps:
                best(s, "qps", sum(qps))
                best(s, "p99", pct(lat, 99) * 1000, higher=False)
                best(s, "load_cpu", cpu, higher=False)
                best(s, "cpu_per_kqps", cpu / (sum(qps) / 1000), higher=False)
                res[s]["load_rss"] = max(float(res[s].get("load_rss", 0.0)), rss_mib(pids[s]))

    for s in SYSTEMS:
        natc.prime(cl1)
        if budget.left(f"new names ({s})"):
            def fresh(i: int, s: str = s) -> str:
                return stable_name(f"new-{s}", i)
            lat = timed_queries(cl1.ns, DNS[s], fresh, 200)
            res[s]["new_p50"], res[s]["new_p99"] = pct(lat, 50) * 1000, pct(lat, 99) * 1000
        if budget.left(f"connect ({s})"):
            half = conn_names[:30] if s == "ours" else conn_names[30:]
            times: list[float] = []
            for name in half:
                rc, addrs = resolve_in(cl1.ns, name, DNS[s], timeout=2)
                if rc == 0 and addrs and (ft := first_byte(cl1, addrs[0])) is not None:
                    times.append(ft)
            res[s]["conn_p50"], res[s]["conn_p99"] = pct(times, 50) * 1000, pct(times, 99) * 1000
            res[s]["conn_ok"] = f"{len(times)}/{len(half)}"
        addr = resolve_in(cl1.ns, "web.app.test", DNS[s])[1][0]
        if budget.left(f"iperf3 ({s})"):
            r = cl1.run("iperf3", "-c", addr, "-t", "4", "-J", check=False, timeout=40)
            try:
                res[s]["tcp_gbit"] = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
            except (ValueError, KeyError):
                res[s]["tcp_gbit"] = "fails"
        if budget.left(f"short connections ({s})"):
            n, end = 0, time.monotonic() + 3
            while time.monotonic() < end:
                n += first_byte(cl1, addr) is not None
            res[s]["short_cps"] = n / 3
        try:
            res[s]["udp"] = "yes" if cl1.udp(addr, timeout=2) else "no"
        except OSError:
            res[s]["udp"] = "no (nothing comes back)"
        res[s]["icmp"] = "yes" if cl1.ping(addr, timeout=2) else "no (no echo reply)"

    spec = [("DNS known name, qps (2 clients × 4 dnsperf senders)", "qps", " qps", 0, True),
            ("DNS known name under that load, p99", "p99", " ms", 2, False),
            ("DNS first answer of a new name, p50", "new_p50", " ms", 2, False),
            ("DNS first answer of a new name, p99", "new_p99", " ms", 2, False),
            ("connect: DNS answer → first byte through the pool address, p50", "conn_p50", " ms", 2, False),
            ("connect: DNS answer → first byte, p99", "conn_p99", " ms", 2, False),
            ("connect: new names that connected", "conn_ok", "", 0, True),
            ("TCP throughput (iperf3, 4 s)", "tcp_gbit", " Gbit/s", 2, True),
            ("short connections/s (connect, GET, close; one client)", "short_cps", "/s", 0, True),
            ("UDP through a pool address", "udp", "", 0, True),
            ("ICMP echo through a pool address", "icmp", "", 0, True),
            ("RSS idle", "idle_rss", " MiB", 1, False),
            ("CPU idle", "idle_cpu", " %", 1, False),
            ("RSS under the DNS load", "load_rss", " MiB", 1, False),
            ("CPU under the DNS load (100 % = one core)", "load_cpu", " %", 0, False),
            ("CPU per 1,000 qps of that load", "cpu_per_kqps", " %", 1, False)]
    return table_rows(res, spec)


def print_table(rows: list[Row], budget: Budget, args: argparse.Namespace) -> None:
    print(f"\nnatc side by side (real tailnet, v1.102.3; {args.rounds} alternating rounds of {args.seconds:g} s,"
          " best kept; ratio = ours/natc where higher is better, natc/ours where lower is)\n")
    print("| row | ours | natc | ratio |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if budget.skipped:
        print(f"\nskipped (budget spent): {', '.join(budget.skipped)}")
    print("\nours = appconnector + its tailscaled (the product runs beside it); natc = its one process"
          " (its tailnet stack inside)")
    print("\nclusters of 3 (natc --cluster-tag), failover, 100k-mapping scale: ./dev bench bench_natc_cluster")


if __name__ == "__main__":
    raise SystemExit(main())
