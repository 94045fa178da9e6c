"""Tailnet benchmark: what the whois cache saves, and what a netmap change costs, against the stand-in.

    ./dev bench bench_tailnet [--nodes 2000] [--lookups 20000]

Reference (measured in the same run): one LocalAPI whois round trip over the unix socket to the
stand-in (a real HTTP server; real tailscaled is slower, it also takes locks and builds the node).
Rows:
1. whois through ``TailnetIdentity`` with a warm cache (``whois()`` and the sync ``cached()`` the DNS
   fast path uses), as a ratio against the round trip;
2. ``status`` parse + directory rebuild for ``--nodes`` peers (a reconnect or an unknown change);
3. one netmap-change notification applied by the directory and the whois cache re-pointed, for both
   notification styles (full NetMap ≤1.96, PeersChanged ≥1.100).

Prints a markdown table (paste into bench/README.md under "tailnet").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.identity import TailnetIdentity
from appconnector.tailnet.localapi import LocalAPIClient
from tests.localapi_standin import Standin


def _state(nodes: int, style: str) -> dict[str, object]:
    peers = [{"stable_id": f"n{i:06d}", "addresses": [f"100.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"],
              "tags": ["tag:appconnector"] if i < 3 else []} for i in range(1, nodes + 1)]
    return {"style": style, "self": {"stable_id": "nSELF", "addresses": ["100.99.0.1"]}, "peers": peers}


async def _run(nodes: int, lookups: int) -> list[tuple[str, float, str]]:
    rows: list[tuple[str, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "ts.sock")
        s = Standin(sock, _state(nodes, "netmap"))
        await s.start()
        client = LocalAPIClient(sock)
        ips = [f"100.{100 + i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(1, nodes + 1)]
        n_rt = min(lookups, 2000)
        t0 = time.perf_counter()
        for i in range(n_rt):
            await client.whois(ips[i % len(ips)])
        rt = (time.perf_counter() - t0) / n_rt
        rows.append(("LocalAPI whois round trip (reference)", rt, "1.00"))

        d = TailnetDirectory(client)
        ident = TailnetIdentity(client, d)
        for ip in ips:
            await ident.whois(ip)
        t0 = time.perf_counter()
        for i in range(lookups):
            await ident.whois(ips[i % len(ips)])
        hit = (time.perf_counter() - t0) / lookups
        rows.append(("whois, warm cache (async)", hit, f"{rt / hit:.0f}x faster"))
        t0 = time.perf_counter()
        for i in range(lookups):
            ident.cached(ips[i % len(ips)])
        c = (time.perf_counter() - t0) / lookups
        rows.append(("cached() (DNS fast path)", c, f"{rt / c:.0f}x faster"))

        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            await d.refresh()
        rows.append((f"status + directory rebuild, {nodes} nodes", (time.perf_counter() - t0) / reps,
                     f"{(time.perf_counter() - t0) / reps / rt:.1f}x a whois"))

        netmap_notify = {"NetMap": s.netmap_doc()}
        t0 = time.perf_counter()
        for _ in range(reps):
            d._nodes = {}  # force a change so subscribers (the cache) run every time
            d.apply_notify(netmap_notify)
        per = (time.perf_counter() - t0) / reps
        rows.append((f"full NetMap notification (≤1.96), {nodes} nodes", per, f"{per / rt:.1f}x a whois"))
        delta_notify = {"PeersChanged": [s.peers["n000001"].tailcfg_node()]}
        t0 = time.perf_counter()
        for i in range(reps):
            s.peers["n000001"].online = bool(i % 2)
            delta_notify = {"PeersChanged": [s.peers["n000001"].tailcfg_node()]}
            d.apply_notify(delta_notify)
        per = (time.perf_counter() - t0) / reps
        rows.append((f"PeersChanged notification (≥1.100), {nodes} nodes", per, f"{per / rt:.1f}x a whois"))
        await s.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--lookups", type=int, default=20000)
    args = ap.parse_args()
    rows = asyncio.run(_run(args.nodes, args.lookups))
    print("| operation | time per op | vs. reference |")
    print("|---|---:|---:|")
    for name, sec, ratio in rows:
        print(f"| {name} | {sec * 1e6:.1f} µs | {ratio} |")


if __name__ == "__main__":
    main()
