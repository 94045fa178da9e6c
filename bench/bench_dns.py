"""DNS benchmark: the connector against Unbound (one thread), same names, same run, on loopback.

    ./dev bench bench_dns [--seconds 8] [--names 2000] [--new-names 3000] [--cluster]

1. Known mappings: dnsperf replays A queries for ``--names`` names, first against Unbound serving
   them as local data, then against the connector (DnsService + LocalPool on uvloop, every name
   already mapped for the client, so the pre-built fast path answers). Reports both qps and the ratio
   (target ≥ 0.7).
2. New names: dnsperf sends each of ``--new-names`` fresh names once (100 outstanding); every query
   is an upstream lookup (Unbound) plus a pool checkout: checkouts/s on a single node with LocalPool,
   and, with ``--cluster``, through a 3-member RaftReplica cluster (separate processes on loopback).
3. First-answer latency: a client in another process asks fresh names one at a time; p50/p99.

Prints a markdown table (paste into bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appconnector.config import Config, load
from appconnector.dns.service import DnsService
from appconnector.pool.api import Replica
from appconnector.pool.local import LocalPool
from appconnector.tailnet.standalone import StandaloneIdentity

POOL = "100.80.0.0/12"


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def start_unbound(workdir: Path, names: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    lines = ["server:", f"  interface: 127.0.0.1@{port}", "  do-daemonize: no", '  username: ""', '  chroot: ""',
             f'  directory: "{workdir}"', '  pidfile: ""', "  use-syslog: no", "  verbosity: 0", "  num-threads: 1",
             "  do-ip6: no", "  access-control: 127.0.0.0/8 allow", '  module-config: "iterator"',
             '  local-zone: "bench.test." static',
             '  local-data: "bench.test. 3600 IN SOA ns.bench.test. h.bench.test. 1 3600 600 86400 60"',
             *[f'  local-data: "k{i}.bench.test. 300 IN A 192.0.2.{1 + i % 250}"' for i in range(names)],
             # every name below new.test answers A 198.18.0.1: fresh names without a huge config
             '  local-zone: "new.test." redirect', '  local-data: "new.test. 300 IN A 198.18.0.1"',
             "remote-control:", "  control-enable: no"]
    conf = workdir / "unbound.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["unbound", "-d", "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if dns_query("127.0.0.1", port, "k0.bench.test") is not None:
            return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("unbound did not start")


def dns_query(host: str, port: int, name: str, timeout: float = 0.5) -> bytes | None:
    packet = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (host, port))
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def dnsperf(port: int, datafile: Path, seconds: float | None, *, once: bool = False,
            outstanding: int = 100, clients: int = 4) -> dict[str, float]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-c", str(clients),
           "-T", "1", "-q", str(outstanding), "-t", "5"]
    cmd += ["-n", "1"] if once else ["-l", str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    def grab(label: str) -> float:
        m = re.search(rf"{label}:\s+([0-9.]+)", out)
        return float(m.group(1)) if m else float("nan")
    return {"qps": grab("Queries per second"), "completed": grab("Queries completed"),
            "lost": grab("Queries lost"), "avg_latency": grab(r"Average Latency \(s\)")}


def latency_client(port: int, prefix: str, count: int) -> list[float]:
    """Runs in a child process: one fresh name at a time, wall time per answer."""
    code = f"""
import socket, struct, time, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
out = []
for i in range({count}):
    name = "{prefix}" + str(i) + ".new.test"
    p = struct.pack("!6H", i & 0xffff, 0x0100, 1, 0, 0, 0)
    for l in name.split("."):
        p += bytes([len(l)]) + l.encode()
    p += b"\\x00\\x00\\x01\\x00\\x01"
    t = time.perf_counter(); s.sendto(p, ("127.0.0.1", {port})); s.recv(4096)
    out.append(time.perf_counter() - t)
print(" ".join(repr(x) for x in out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [float(x) for x in res.stdout.split()]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def config(upstream_port: int, dns_port: int) -> Config:
    return load(None, env={
        "APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_DNS_LISTEN": f"127.0.0.1:{dns_port}",
        "APPCONNECTOR_DNS_UPSTREAM": f"127.0.0.1:{upstream_port}", "APPCONNECTOR_POOL_PREFIXES": POOL,
        "APPCONNECTOR_NAT_ENABLED": "false"})


def start_echo(loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, int]:
    """The ceiling of this process's UDP loop: the same add_reader drain as the DNS listener, but the
    'answer' is the query with QR set (no parsing, no lookup)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    recv, send = sock.recvfrom, sock.sendto

    def ready() -> None:
        for _ in range(64):
            try:
                data, addr = recv(65535)
            except BlockingIOError:
                return
            send(data[:2] + b"\x81\x80" + data[4:], addr)
    loop.add_reader(sock.fileno(), ready)
    return sock, int(sock.getsockname()[1])


async def run_connector(cfg: Config, replica: Replica, work: Any) -> Any:
    """Start the service on ``replica``, run ``work(port)`` in a thread (it blocks on subprocesses)."""
    service = DnsService(cfg, replica, StandaloneIdentity())
    await service.start()
    try:
        port = service.bound[0][1]
        return await asyncio.to_thread(work, port)
    finally:
        await service.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=9, help="alternating Unbound/connector/echo qps rounds")
    ap.add_argument("--names", type=int, default=2000)
    ap.add_argument("--new-names", type=int, default=3000)
    ap.add_argument("--latency-samples", type=int, default=500)
    ap.add_argument("--cluster", action="store_true", help="also through a 3-member RaftReplica cluster")
    args = ap.parse_args()
    for tool in ("dnsperf", "unbound"):
        if shutil.which(tool) is None:
            print(f"needs {tool} (apt-get install {tool})", file=sys.stderr)
            return 2
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="acdns-bench-") as tmp:
        work = Path(tmp)
        unbound, ub_port = start_unbound(work, args.names)
        try:
            known = work / "known.txt"
            known.write_text("".join(f"k{i}.bench.test A\n" for i in range(args.names)))
            unbound_runs: list[float] = []

            async def single() -> dict[str, Any]:
                pool = LocalPool((POOL,))
                await pool.start()
                try:
                    cfg = config(ub_port, free_port())
                    echo_sock, echo_port = start_echo(asyncio.get_running_loop())

                    def scenario(port: int) -> dict[str, Any]:
                        dnsperf(port, known, None, once=True)  # map every name for 127.0.0.1
                        # alternate Unbound and the connector: the machine is shared, its load drifts
                        fast_runs, echo_runs = [], []
                        for _ in range(args.rounds):
                            unbound_runs.append(dnsperf(ub_port, known, args.seconds)["qps"])
                            fast_runs.append(dnsperf(port, known, args.seconds)["qps"])
                            echo_runs.append(dnsperf(echo_port, known, args.seconds)["qps"])
                            print(f"unbound {unbound_runs[-1]:.0f} qps, connector {fast_runs[-1]:.0f} qps, "
                                  f"echo {echo_runs[-1]:.0f} qps", file=sys.stderr)
                        fast = {"qps": statistics.median(fast_runs), "runs": fast_runs, "echo": echo_runs}
                        fresh = work / "fresh.txt"
                        fresh.write_text("".join(f"s{i}.new.test A\n" for i in range(args.new_names)))
                        new = dnsperf(port, fresh, None, once=True)
                        lat = latency_client(port, "lat", args.latency_samples)
                        return {"fast": fast, "new": new, "lat": lat}
                    return dict(await run_connector(cfg, pool, scenario))
                finally:
                    asyncio.get_running_loop().remove_reader(echo_sock.fileno())
                    echo_sock.close()
                    await pool.stop()
            res = uvloop.run(single())
            ub_qps = statistics.median(unbound_runs)
            ratios = [c / u for c, u in zip(res["fast"]["runs"], unbound_runs, strict=True)]
            rows.append(("known mappings, Unbound 1 thread (reference)", f"{ub_qps:,.0f} qps",
                         "median of " + ", ".join(f"{q:,.0f}" for q in unbound_runs)))
            rows.append(("known mappings, connector (fast path, uvloop)", f"{res['fast']['qps']:,.0f} qps",
                         f"**{statistics.median(ratios):.2f}** of Unbound (median of per-round ratios "
                         + ", ".join(f"{r:.2f}" for r in ratios) + "; target ≥ 0.7); best rounds "
                         f"{max(res['fast']['runs']):,.0f} vs {max(unbound_runs):,.0f} = "
                         f"{max(res['fast']['runs']) / max(unbound_runs):.2f}"))
            echo_ratios = [e / u for e, u in zip(res["fast"]["echo"], unbound_runs, strict=True)]
            rows.append(("UDP echo in this process (ceiling of Python + uvloop, no DNS work)",
                         f"{statistics.median(res['fast']['echo']):,.0f} qps",
                         f"{statistics.median(echo_ratios):.2f} of Unbound"))
            rows.append(("new names, single node (LocalPool): checkouts/s", f"{res['new']['qps']:,.0f}/s",
                         f"{int(res['new']['completed'])} names, each an upstream lookup + checkout"))
            lat = res["lat"]
            rows.append(("first answer of a new name, single node", f"p50 {percentile(lat, 50) * 1e3:.2f} ms",
                         f"p99 {percentile(lat, 99) * 1e3:.2f} ms ({len(lat)} sequential names)"))
            if args.cluster:
                rows += cluster_rows(args, work, ub_port)
        finally:
            unbound.terminate()
            unbound.wait(5)
    print("| measurement | result | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    print(f"\n{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"dnsperf -c 4 -T 1 -q 100, {args.rounds} alternating rounds of {args.seconds:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f}")
    return 0


def cluster_rows(args: argparse.Namespace, work: Path, ub_port: int) -> list[tuple[str, str, str]]:
    """New-name checkouts through a 3-member RaftReplica cluster: this process hosts one member (with
    the DNS service), two more run as separate processes (``appconnector.pool.member``)."""
    try:
        from appconnector.pool.member import MemberProcess, free_ports
        from appconnector.pool.replica import RaftReplica
    except ImportError:
        return [("new names, 3-node RaftReplica", "n/a", "appconnector.pool.replica not available")]
    members = [f"127.0.0.1:{p}" for p in free_ports(3)]
    secret = work / "secret"
    secret.write_text("bench-secret\n")
    others = [MemberProcess(members[i], [m for m in members if m != members[i]], work / f"m{i}",
                            secret_file=secret, prefixes=(POOL,)).start() for i in (1, 2)]

    async def run() -> dict[str, Any]:
        cfg = load(None, env={
            "APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_DNS_LISTEN": f"127.0.0.1:{free_port()}",
            "APPCONNECTOR_DNS_UPSTREAM": f"127.0.0.1:{ub_port}", "APPCONNECTOR_POOL_PREFIXES": POOL,
            "APPCONNECTOR_NAT_ENABLED": "false", "APPCONNECTOR_CLUSTER_STATE_DIR": str(work / "m0"),
            "APPCONNECTOR_CLUSTER_SELF": members[0], "APPCONNECTOR_CLUSTER_PEERS": ",".join(members[1:]),
            "APPCONNECTOR_CLUSTER_SECRET_FILE": str(secret)})
        replica = RaftReplica(cfg, members[0], members[1:], cfg.read_secret())
        await replica.start()
        try:
            deadline = time.monotonic() + 30
            while not replica.status().get("leader"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no Raft leader after 30 s: {replica.status()}")
                await asyncio.sleep(0.1)

            def scenario(port: int) -> dict[str, Any]:
                fresh = work / "fresh-cluster.txt"
                fresh.write_text("".join(f"c{i}.new.test A\n" for i in range(args.new_names)))
                new = dnsperf(port, fresh, None, once=True)
                lat = latency_client(port, "clat", min(args.latency_samples, 300))
                return {"new": new, "lat": lat, "leader": replica.is_leader()}
            return dict(await run_connector(cfg, replica, scenario))
        finally:
            await replica.stop()
    try:
        for m in others:
            m.wait_ready()
        res = uvloop.run(run())
    finally:
        for m in others:
            m.stop()
    where = "DNS on the leader" if res["leader"] else "DNS on a follower"
    lat = res["lat"]
    return [("new names, 3-node RaftReplica: checkouts/s", f"{res['new']['qps']:,.0f}/s",
             f"{int(res['new']['completed'])} names, {where}; concurrent checkouts batched per Raft entry"),
            ("first answer of a new name, 3-node cluster", f"p50 {percentile(lat, 50) * 1e3:.2f} ms",
             f"p99 {percentile(lat, 99) * 1e3:.2f} ms ({len(lat)} sequential names, {where})")]


if __name__ == "__main__":
    sys.exit(main())
