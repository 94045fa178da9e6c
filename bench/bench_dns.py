"""DNS benchmark: the shipped connector (`appconnector run`) against Unbound (one thread), same run.

    ./dev bench bench_dns [--seconds 2] [--rounds 5] [--names 2000] [--sources 4] [--new-names 3000]
                          [--no-cluster] [--no-uvloop] [--no-in-process] [--before DIR]

Everything on loopback; the servers (each connector process and Unbound, one thread) are pinned to
core 1, every client to core 0 (``bench/shipped.py``). Headline rows are ``appconnector run --config``
processes with the shipped defaults (stdlib event loop, RaftReplica with compaction, standalone mode
where the client IP is the node), driven from outside:

1. Known names: ``--sources`` dnsperf processes at once, one per loopback source address (one node
   each), replay A queries for ``--names`` names after each node has checked them all out; Unbound
   serves the same names as local data. Unbound and the connectors alternate in ``--seconds`` rounds;
   the ratio is the median of per-round ratios (target ≥ 0.8).
2. New names: dnsperf sends ``--new-names`` fresh names once (100 outstanding): each is an upstream
   lookup (Unbound) plus a Raft checkout. First answer: a client asks fresh names one at a time.
3. The same through a 3-member standalone cluster (static peers, shared secret): through the leader and
   through a follower.

Extra rows, labelled: the same `run` started with uvloop (the event-loop decision); with ``--before
DIR`` (a source tree of another version, e.g. ``git worktree add /tmp/before main``) that version's
`run` in the same alternating rounds (a before/after ratio from one run); and the old
in-process measurement (DnsService + LocalPool on uvloop inside this process, plus a UDP echo there).
Prints a markdown table (paste into bench/README.md). Stops by itself: every client call has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shipped import (
    POOL,
    Connector,
    cpu_seconds,
    dnsperf,
    dnsperf_many,
    free_port,
    latency_client,
    percentile,
    sources,
    start_cluster,
    start_unbound,
    stop_group,
)

from appconnector.config import Config, load

Row = tuple[str, str, str]


def config(upstream_port: int, dns_port: int) -> Config:
    return load(None, env={
        "APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_DNS_LISTEN": f"127.0.0.1:{dns_port}",
        "APPCONNECTOR_DNS_UPSTREAM": f"127.0.0.1:{upstream_port}", "APPCONNECTOR_POOL_PREFIXES": POOL,
        "APPCONNECTOR_NAT_ENABLED": "false"})


def start_echo(loop: asyncio.AbstractEventLoop) -> tuple[socket.socket, int]:
    """The ceiling of this process's UDP loop: the same drain as the DNS listener (recvmmsg/sendmmsg
    batches where available), but the 'answer' is the query with QR set (no parsing, no lookup)."""
    from appconnector.dns import mmsg
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)

    def echo(data: bytes, ip: str) -> bytes:
        return data[:2] + b"\x81\x80" + data[4:]

    if mmsg.available(sock):
        batch = mmsg.BatchSocket(sock, 64)

        def ready() -> None:
            batch.serve(echo, lambda data, addr: None, lambda what, error, size: None)
    else:
        recv, send = sock.recvfrom, sock.sendto

        def ready() -> None:
            for _ in range(64):
                try:
                    data, addr = recv(65535)
                except BlockingIOError:
                    return
                send(echo(data, addr[0]), addr)
    loop.add_reader(sock.fileno(), ready)
    return sock, int(sock.getsockname()[1])


class Runs:
    """Per-round qps and server CPU per answer (utime+stime of the server process over the round / answers):
    the CPU figure is what one dedicated core would give, and moves much less with the machine's load."""

    def __init__(self) -> None:
        self.qps: list[float] = []
        self.us: list[float] = []


def alternate(rounds: int, seconds: float, datafile: Path, srcs: list[str],
              targets: dict[str, tuple[int, int]]) -> dict[str, Runs]:
    """Each round drives every target (name → (DNS port, server pid)) once, in turn: the shared
    machine's load drifts, so each ratio compares runs seconds apart."""
    out = {k: Runs() for k in targets}
    for _ in range(rounds):
        for k, (port, pid) in targets.items():
            before = cpu_seconds(pid)
            r = dnsperf_many(port, datafile, seconds, srcs)
            out[k].qps.append(r["qps"])
            out[k].us.append(1e6 * (cpu_seconds(pid) - before) / max(1.0, r["completed"]))
        print("  " + ", ".join(f"{k} {v.qps[-1]:,.0f} qps {v.us[-1]:.1f} µs" for k, v in out.items()),
              file=sys.stderr)
    return out


def ratio_row(label: str, runs: Runs, ref: Runs, target: str = "") -> Row:
    ratios = [c / u for c, u in zip(runs.qps, ref.qps, strict=True)]
    cpu = [u / c for c, u in zip(runs.us, ref.us, strict=True)]
    return (label, f"{statistics.median(runs.qps):,.0f} qps",
            f"**{statistics.median(ratios):.2f}** of Unbound (per-round " + ", ".join(f"{r:.2f}" for r in ratios)
            + (f"; target {target}" if target else "") + f"); CPU per answer {statistics.median(runs.us):.1f} µs "
            f"vs Unbound's {statistics.median(ref.us):.1f} µs = **{statistics.median(cpu):.2f}** of its rate per core")


def ref_row(ub: Runs) -> Row:
    return ("known names, Unbound 1 thread (reference)", f"{statistics.median(ub.qps):,.0f} qps",
            "median of " + ", ".join(f"{q:,.0f}" for q in ub.qps)
            + f"; CPU per answer {statistics.median(ub.us):.1f} µs")


def new_name_rows(label: str, port: int, work: Path, tag: str, args: argparse.Namespace,
                  samples: int) -> list[Row]:
    fresh = work / f"fresh-{tag}.txt"
    fresh.write_text("".join(f"{tag}{i}.new.test A\n" for i in range(args.new_names)))
    new = dnsperf(port, fresh, None, once=True)
    lat = latency_client(port, f"{tag}lat", samples)
    return [(f"new names, {label}: checkouts/s", f"{new['qps']:,.0f}/s",
             f"{int(new['completed'])} names once, 100 outstanding, {int(new['lost'])} lost; "
             "each an upstream lookup + checkout"),
            (f"first answer of a new name, {label}", f"p50 {percentile(lat, 50) * 1e3:.2f} ms",
             f"p99 {percentile(lat, 99) * 1e3:.2f} ms ({len(lat)} sequential names)")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=5, help="alternating known-name rounds")
    ap.add_argument("--names", type=int, default=2000)
    ap.add_argument("--sources", type=int, default=4, help="client source addresses (nodes), one dnsperf each")
    ap.add_argument("--new-names", type=int, default=3000)
    ap.add_argument("--latency-samples", type=int, default=500)
    ap.add_argument("--no-cluster", action="store_true")
    ap.add_argument("--no-uvloop", action="store_true", help="skip the `run` with uvloop comparison")
    ap.add_argument("--no-in-process", action="store_true", help="skip the old in-process rows")
    ap.add_argument("--before", type=Path, help="source tree of another version: its `run` in the same rounds")
    args = ap.parse_args()
    for tool in ("dnsperf", "unbound", "taskset"):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    load_before = os.getloadavg()
    rows: list[Row] = []
    srcs = sources(args.sources)
    with tempfile.TemporaryDirectory(prefix="acdns-bench-") as tmp:
        work = Path(tmp)
        unbound, ub_port = start_unbound(work, args.names)
        known = work / "known.txt"
        known.write_text("".join(f"k{i}.bench.test A\n" for i in range(args.names)))
        started: list[Connector] = []
        try:
            print("single node: `appconnector run` (stdlib loop)" + ("" if args.no_uvloop else " and with uvloop"),
                  file=sys.stderr)
            single = Connector(work, "single", ub_port).start()
            started.append(single)
            targets = {"connector": single}
            if not args.no_uvloop:
                targets["uvloop"] = Connector(work, "single-uvloop", ub_port, uvloop=True).start()
                started.append(targets["uvloop"])
            if args.before is not None:
                targets["before"] = Connector(work, "single-before", ub_port, code=args.before.resolve()).start()
                started.append(targets["before"])
            for c in targets.values():
                c.wait_ready()
                dnsperf_many(c.dns_port, known, None, srcs, once=True)  # every node checks out every name
            runs = alternate(args.rounds, args.seconds, known, srcs, {
                "unbound": (ub_port, unbound.pid), **{k: (c.dns_port, c.pid()) for k, c in targets.items()}})
            ub = runs["unbound"]
            rows.append(ref_row(ub))
            rows.append(ratio_row(f"known names, `appconnector run`, single node, {args.sources} nodes",
                                  runs["connector"], ub, "≥ 0.8"))
            if "uvloop" in runs:
                rows.append(ratio_row("extra: the same `run` started with uvloop (not shipped)", runs["uvloop"], ub))
            if "before" in runs:
                rows.append(ratio_row(f"extra: `run` of {args.before} (before)", runs["before"], ub))
            rows += new_name_rows("`run`, single node", single.dns_port, work, "s", args, args.latency_samples)
            for c in started:
                c.stop()
            started.clear()
            if not args.no_cluster:
                rows += cluster_rows(args, work, ub_port, unbound.pid, known, srcs, started)
            for c in started:
                c.stop()
            started.clear()
            if not args.no_in_process:
                rows += in_process_rows(args, ub_port, unbound.pid, known, srcs)
        finally:
            for c in started:
                c.stop()
            stop_group(unbound)
    print("| measurement | result | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    load_after = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, servers on core 1, "
          f"clients on core 0, {args.sources} dnsperf (-c 1 -q {max(1, 100 // args.sources)}) at once, "
          f"{args.rounds} alternating rounds of {args.seconds:.0f} s, "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    return 0


def cluster_rows(args: argparse.Namespace, work: Path, ub_port: int, ub_pid: int, known: Path, srcs: list[str],
                 started: list[Connector]) -> list[Row]:
    """Three `appconnector run` members (standalone, static peers, shared secret): leader and a follower."""
    print("3-member cluster of `appconnector run`", file=sys.stderr)
    base = work / "cluster"
    base.mkdir()
    members = start_cluster(base, ub_port)
    started += members
    leader, follower = members[0], members[1]
    for c in (leader, follower):
        dnsperf_many(c.dns_port, known, None, srcs, once=True)
    runs = alternate(args.rounds, args.seconds, known, srcs, {
        "unbound": (ub_port, ub_pid), "leader": (leader.dns_port, leader.pid()),
        "follower": (follower.dns_port, follower.pid())})
    rows = [ref_row(runs["unbound"]),
            ratio_row("known names, 3-member cluster, through the leader", runs["leader"], runs["unbound"], "≥ 0.8"),
            ratio_row("known names, 3-member cluster, through a follower", runs["follower"], runs["unbound"],
                      "≥ 0.8")]
    samples = min(args.latency_samples, 300)
    rows += new_name_rows("3-member cluster, through the leader", leader.dns_port, work, "cl", args, samples)
    rows += new_name_rows("3-member cluster, through a follower", follower.dns_port, work, "cf", args, samples)
    return rows


def in_process_rows(args: argparse.Namespace, ub_port: int, ub_pid: int, known: Path, srcs: list[str]) -> list[Row]:
    """The old measurement, kept as extra rows: DnsService + LocalPool on uvloop in this process (pinned to
    the server core while it runs), and a UDP echo in the same loop (the ceiling of Python + uvloop)."""
    import uvloop

    from appconnector.dns.service import DnsService
    from appconnector.dns.settings import DnsSettings
    from appconnector.pool.local import LocalPool
    from appconnector.tailnet.standalone import StandaloneIdentity
    print("in-process DnsService + LocalPool on uvloop", file=sys.stderr)

    async def measure() -> dict[str, Runs]:
        pool = LocalPool((POOL,))
        await pool.start()
        echo_sock, echo_port = start_echo(asyncio.get_running_loop())
        service = DnsService(DnsSettings.from_config(config(ub_port, free_port())), pool, StandaloneIdentity())
        await service.start()
        try:
            port = service.bound[0][1]

            def scenario() -> dict[str, Runs]:
                dnsperf_many(port, known, None, srcs, once=True)
                return alternate(args.rounds, args.seconds, known, srcs, {
                    "unbound": (ub_port, ub_pid), "in-process": (port, os.getpid()),
                    "echo": (echo_port, os.getpid())})
            return await asyncio.to_thread(scenario)
        finally:
            await service.stop()
            asyncio.get_running_loop().remove_reader(echo_sock.fileno())
            echo_sock.close()
            await pool.stop()
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {1})
    try:
        runs = uvloop.run(measure())
    finally:
        os.sched_setaffinity(0, mask)
    return [ref_row(runs["unbound"]),
            ratio_row("in-process: DnsService + LocalPool on uvloop (not `run`)", runs["in-process"],
                      runs["unbound"]),
            ratio_row("in-process: UDP echo on uvloop (ceiling of Python, no DNS work)", runs["echo"],
                      runs["unbound"])]


if __name__ == "__main__":
    sys.exit(main())
