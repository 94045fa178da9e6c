"""What ``cluster.fsync`` costs: checkout latency and pipelined checkouts, fsync on vs off, in one run.

    ./dev bench bench_durability [--quick] [--no-harness] [--rounds N]

Both settings run in the same run, alternating (on, off, on, off, ... ``--rounds`` times each; every row
is the median over the rounds), with state directories on the same disk (the temporary directory), so
the ratio is what to read on a shared machine.

Headline rows: a 3-member cluster of the shipped ``appconnector run --config`` processes (standalone,
static peers, shared secret, shipped defaults but ``cluster.fsync``), pinned to core 1 with their
upstream (Unbound), driven from outside through DNS on loopback (bench/shipped.py): sequential new names
from one client through the leader and through a follower (p50/p99; each answer waits for a Raft
checkout), and new names pipelined with dnsperf (2,000 outstanding) through the leader.

Extra rows, labelled "harness (pool member process)": three ``pool member`` processes on loopback (journal
and full dumps on disk, shared secret), checkouts asked of the replica directly, so the Raft layer and
its syncs are what is measured: sequential checkouts on the leader and through a follower, and
checkouts pipelined from one member with 2,000 in flight.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_raft import leader_and_follower
from bench_raft import start_cluster as start_member_cluster
from shipped import dnsperf, latency_client, percentile, start_unbound, stop_group
from shipped import start_cluster as start_shipped_cluster

SETTINGS = (True, False)


def measure_shipped(work: Path, ub_port: int, fsync: bool, quick: bool, round_: int) -> dict[str, Any]:
    base = work / f"shipped-fsync-{fsync}-{round_}"
    base.mkdir()
    members = start_shipped_cluster(base, ub_port, cluster_extra=[f"fsync = {str(fsync).lower()}"])
    try:
        time.sleep(1.0)
        leader, follower = members[0], members[1]
        n = 200 if quick else 1000
        tag = "on" if fsync else "off"
        lat_l = latency_client(leader.dns_port, f"l{tag}", n)
        lat_f = latency_client(follower.dns_port, f"f{tag}", n)
        count = 10_000 if quick else 30_000
        names = base / "pipelined.txt"
        names.write_text("".join(f"p{tag}{i}.new.test A\n" for i in range(count)))
        r = dnsperf(leader.dns_port, names, None, once=True, outstanding=2000)
        return {"leader_p50": percentile(lat_l, 50) * 1e3, "leader_p99": percentile(lat_l, 99) * 1e3,
                "follower_p50": percentile(lat_f, 50) * 1e3, "follower_p99": percentile(lat_f, 99) * 1e3,
                "pipelined": r["qps"], "lost": r["lost"]}
    finally:
        for m in members:
            m.stop()


def measure_harness(work: Path, fsync: bool, quick: bool, round_: int) -> dict[str, Any]:
    base = work / f"harness-fsync-{fsync}-{round_}"
    base.mkdir()
    members = start_member_cluster(base, "ours", () if fsync else ("--no-fsync",))
    try:
        time.sleep(1.0)
        leader, follower = leader_and_follower(members)
        n = 200 if quick else 1000
        lat_l = leader.call("latency", count=n, node="lat-l", domain_prefix="l", timeout=600)
        lat_f = follower.call("latency", count=n, node="lat-f", domain_prefix="f", timeout=600)
        count = 20_000 if quick else 60_000
        r = leader.call("load", count=count, concurrency=2000, nodes=200, node_prefix="p", domain_prefix="p",
                        return_acked=False, timeout=600)
        return {"leader_p50": lat_l["p50"], "leader_p99": lat_l["p99"], "follower_p50": lat_f["p50"],
                "follower_p99": lat_f["p99"], "pipelined": r["rate"], "lost": sum(r["errors"].values())}
    finally:
        for m in members:
            m.kill()


ROWS = (
    ("checkout p50, leader", "leader_p50", "ms", ""),
    ("checkout p99, leader", "leader_p99", "ms", ""),
    ("checkout p50, through a follower", "follower_p50", "ms", "≤ 8 ms (fsync on)"),
    ("checkout p99, through a follower", "follower_p99", "ms", "≤ 20 ms (fsync on)"),
    ("pipelined checkouts/s", "pipelined", "rate", "on ≥ 0.8 × off"),
)


def rounds(measure: Callable[[bool, int], dict[str, Any]], n: int) -> dict[bool, dict[str, Any]]:
    """``measure(fsync, round)`` alternating the settings ``n`` times; the median of each figure."""
    runs: dict[bool, list[dict[str, Any]]] = {fsync: [] for fsync in SETTINGS}
    for round_ in range(n):
        for fsync in SETTINGS:
            runs[fsync].append(measure(fsync, round_))
    return {fsync: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for fsync, rs in runs.items()}


def table(title: str, on: dict[str, Any], off: dict[str, Any]) -> list[str]:
    lines = [f"| {title} | fsync on | fsync off | on / off | target |", "|---|---:|---:|---:|---|"]
    for label, key, unit, target in ROWS:
        a, b = on[key], off[key]
        fmt = "{:.1f} ms" if unit == "ms" else "{:,.0f}"
        lost = f" ({on['lost']:.0f} / {off['lost']:.0f} lost)" if unit == "rate" else ""
        lines.append(f"| {label}{lost} | {fmt.format(a)} | {fmt.format(b)} | {a / b:.2f} | {target} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-harness", action="store_true", help="skip the pool member process rows")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each setting, alternating (median reported)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="acdurability-bench-") as tmp:
        work = Path(tmp)
        print(f"state directories under {work} (one disk for both settings)")
        unbound, ub_port = start_unbound(work, 1)
        try:
            load = [os.getloadavg()[0]]
            shipped = rounds(lambda fsync, r: measure_shipped(work, ub_port, fsync, args.quick, r), args.rounds)
            load.append(os.getloadavg()[0])
        finally:
            stop_group(unbound)
        print(f"\n`appconnector run` x3, median of {args.rounds} rounds each: load average {load[0]:.1f} before, "
              f"{load[1]:.1f} after")
        print("\n".join(table("`appconnector run` ×3, new names through DNS", shipped[True], shipped[False])))
        if args.no_harness:
            return 0
        harness = rounds(lambda fsync, r: measure_harness(work, fsync, args.quick, r), args.rounds)
        load.append(os.getloadavg()[0])
        print(f"\nharness (pool member process) x3, median of {args.rounds} rounds each: load average "
              f"{load[1]:.1f} before, {load[2]:.1f} after")
        print("\n".join(table("harness (pool member process) ×3", harness[True], harness[False])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
