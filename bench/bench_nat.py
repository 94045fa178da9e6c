"""NAT benchmark: kernel steering against plain routing, and the cost of keeping the steer map in step.

    ./dev bench bench_nat [--seconds 5] [--rounds 3] [--mappings 100000]

Needs root, iproute2, nftables (libnftables1) and iperf3. Everything runs inside namespaces the bench
creates (the NAT tests' topology: client → connector → origin, names ``acnat-bench-*``).

1. Throughput: iperf3 (TCP, one stream) from the client to the origin's real address by plain routing,
   then to the pool address steered by our table, in the same namespaces, alternating ``--rounds``
   times; medians and the ratio (target ≥ 0.9).
2. Control plane, in the connector namespace:
   - checkouts/s of a LocalPool with the NAT service attached (each checkout then awaits
     ``nat.ready``, as DNS does, so its element is in the kernel; the worker's transactions run
     meanwhile) against the same LocalPool alone;
   - single-element transactions/s through libnftables against ``nft -j -f -`` per change (the
     alternative docs/design.md §5 names);
   - batched installs (250 elements per transaction) in elements/s;
   - a full reconcile (the model from ``--mappings`` mappings, then one transaction replacing the
     table) against the same JSON through ``nft -j -f -`` (medians of 3, alternating);
   - reading the ``seen`` set with 1,000 and with ``--mappings`` elements: our raw netlink dump
     against libnftables' JSON listing;
   - the long-flow conntrack dump (5,000 entries): our raw netlink read against pyroute2's.

Prints a markdown table (paste into bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pyroute2 import Conntrack  # noqa: E402

from appconnector.config import load  # noqa: E402
from appconnector.kernel.nftables import Nftables  # noqa: E402
from appconnector.nat import render  # noqa: E402
from appconnector.nat.reconcile import Reconciler  # noqa: E402
from appconnector.nat.render import SteerModel, TableSpec  # noqa: E402
from appconnector.nat.seen import PoolRanges, conntrack_pairs  # noqa: E402
from appconnector.nat.service import NatService  # noqa: E402
from appconnector.nat.settings import NatSettings  # noqa: E402
from appconnector.pool.addresses import format_address  # noqa: E402
from appconnector.pool.api import MappingView  # noqa: E402
from appconnector.pool.local import LocalPool  # noqa: E402
from tests.nat.netns import CLIENTS, CONNECTORS, ORIGIN, POOL, TAILNET_IF, Driver, Topology  # noqa: E402

BIG_POOL = "100.64.0.0/14"  # room for the control-plane measurements' mappings
PORT = 5201


def iperf(topo: Topology, target: str, seconds: float) -> float:
    out = topo.run_in("cli1", "iperf3", "-c", target, "-p", str(PORT), "-t", str(seconds), "-J",
                      timeout=seconds + 30).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])


def throughput(seconds: float, rounds: int) -> dict[str, float]:
    topo = Topology("bench").create()
    try:
        server = topo.spawn("origin", "iperf3", "-s", "-B", ORIGIN, "-p", str(PORT))
        # plain routing both ways through the same connector, no NAT
        topo.ip("cli1", "route", "add", "198.51.100.0/24", "via", CONNECTORS["conn1"][0])
        topo.ip("origin", "route", "add", "100.101.0.0/24", "via", CONNECTORS["conn1"][1])
        env = {"tailnet_mode": "standalone", "tailnet_interface": TAILNET_IF, "pool_prefixes": POOL,
               "cluster_state_dir": "/tmp"}
        d = Driver(topo, "conn1", env=env)
        assert d.hello["enabled"], d.hello
        pool_ip = d.call("checkout", node=CLIENTS["cli1"], domain="iperf.example", targets=[ORIGIN])["address"]
        time.sleep(0.3)  # iperf3 server bind
        plain, nat = [], []
        for _ in range(rounds):
            plain.append(iperf(topo, ORIGIN, seconds))
            nat.append(iperf(topo, pool_ip, seconds))
        d.stop()
        server.kill()
        return {"plain": statistics.median(plain), "nat": statistics.median(nat)}
    finally:
        topo.destroy()


# ---- control plane (runs inside the connector namespace: libnftables acts on its own netns) ----------

def _cli(commands: list[dict[str, Any]]) -> None:
    subprocess.run(["nft", "-j", "-f", "-"], input=json.dumps({"nftables": commands}), text=True,
                   check=True, capture_output=True)


def _views(n: int) -> tuple[list[MappingView], dict[str, tuple[int, ...]]]:
    base_node = int(ipaddress.IPv4Address("100.101.0.0"))
    base_pool = int(ipaddress.IPv4Address("100.64.0.1"))
    views = [MappingView(str(ipaddress.IPv4Address(base_node + i % 4000)), f"d{i % 5000}.example",
                         base_pool + i // 4000, 0.0) for i in range(n)]
    targets = {f"d{j}.example": (int(ipaddress.IPv4Address("198.51.100.10")) + j % 7,) for j in range(5000)}
    return views, targets


async def _checkouts(n: int, with_nat: bool) -> float:
    env = {"APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_POOL_PREFIXES": BIG_POOL,
           "APPCONNECTOR_TAILNET_INTERFACE": TAILNET_IF, "APPCONNECTOR_CLUSTER_STATE_DIR": "/tmp",
           "APPCONNECTOR_NAT_MAX_MAPPINGS": "262144"}
    cfg = load(None, env=env)
    pool = LocalPool(cfg.pool.prefixes)
    await pool.start()
    nat = NatService(NatSettings.from_config(cfg), pool, None, seen_interval=3600)
    if with_nat:
        await nat.start()
        assert nat.enabled, nat.reason
    target = (int(ipaddress.IPv4Address(ORIGIN)),)
    t0 = time.perf_counter()
    for i in range(n):
        node = f"100.101.{i // 250}.{i % 250 + 1}"
        address = await pool.checkout(node, "x.example", target, 60)
        if with_nat:
            await nat.ready(node, address)
    elapsed = time.perf_counter() - t0
    if with_nat:
        await nat.stop()
    await pool.stop()
    return n / elapsed


def control_plane(mappings: int) -> dict[str, float]:
    out: dict[str, float] = {}
    out["checkouts_pool"] = asyncio.run(_checkouts(3000, with_nat=False))
    out["checkouts_nat"] = asyncio.run(_checkouts(3000, with_nat=True))

    spec = TableSpec(interface=TAILNET_IF, pool=(ipaddress.IPv4Network(BIG_POOL),),
                     max_mappings=max(262144, 2 * mappings))
    nft = Nftables()
    rec = Reconciler(nft, spec)
    rec.rebuild({})
    base = int(ipaddress.IPv4Address("100.101.0.0"))
    addr = int(ipaddress.IPv4Address("100.64.0.1"))
    real = int(ipaddress.IPv4Address(ORIGIN))

    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        nft.run(render.element_commands(add={(base + i, addr): real}))
    out["single_lib"] = n / (time.perf_counter() - t0)
    n_cli = 200
    t0 = time.perf_counter()
    for i in range(n_cli):
        _cli(render.element_commands(add={(base + 100_000 + i, addr): real}))
    out["single_cli"] = n_cli / (time.perf_counter() - t0)

    rec.rebuild({})
    t0 = time.perf_counter()
    for first in range(0, mappings, 250):
        nft.run(render.element_commands(add={(base + i, addr + 1): real for i in range(first, first + 250)}))
    out["batched"] = mappings / (time.perf_counter() - t0)

    views, targets = _views(mappings)
    model_s, rebuild_s, cli_s = [], [], []
    for _ in range(3):  # alternate ours and the reference; medians (the machine is shared)
        t0 = time.perf_counter()
        model = SteerModel()
        elements = model.reset(views, targets)
        model_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rec.rebuild(elements)
        rebuild_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the same rendering, then a process instead of the library
        _cli(render.table_commands(spec) + render.element_commands(add=elements))
        cli_s.append(time.perf_counter() - t0)
    out["model"] = statistics.median(model_s)
    out["rebuild"] = statistics.median(rebuild_s)
    out["reconcile"] = out["model"] + out["rebuild"]
    out["elements"] = float(len(elements))
    out["rebuild_cli"] = statistics.median(cli_s)

    for count, key in ((1000, "seen_1k"), (mappings, "seen_big")):
        rec.rebuild({})
        keys = [{"concat": [format_address(base + i), format_address(addr)]} for i in range(count)]
        nft.run([{"add": {"element": {"family": "inet", "table": "appconnector", "name": "seen",
                                      "elem": [{"elem": {"val": k, "timeout": 600}} for k in keys]}}}])
        t0 = time.perf_counter()
        got = rec.read_seen()
        out[key] = time.perf_counter() - t0
        assert len(got) == count, (len(got), count)
        t0 = time.perf_counter()
        listed = nft.list("set inet appconnector seen")
        out[key + "_json"] = time.perf_counter() - t0
        assert len(listed[0]["set"]["elem"]) == count
    # conntrack: the long-flow dump, raw netlink against pyroute2's decoder, on the same entries
    # (our table's nat chains switch conntrack on in this namespace; loopback flows are enough)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for i in range(5000):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"x", (f"127.0.{i // 250}.{i % 250 + 1}", 9))
    loop_pool = PoolRanges([ipaddress.IPv4Network("127.0.0.0/8")])
    t0 = time.perf_counter()
    pairs = conntrack_pairs(loop_pool)
    out["ct_raw"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with Conntrack() as ct:
        entries = list(ct.dump_entries())
    out["ct_pyroute2"] = time.perf_counter() - t0
    out["ct_entries"] = float(len(entries))
    assert len(pairs) >= 0.9 * len(entries), (len(pairs), len(entries))
    rec.remove()
    nft.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mappings", type=int, default=100_000)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(control_plane(args.mappings)))
        return
    if os.geteuid() != 0:
        sys.exit("bench_nat: needs root (network namespaces, nftables)")
    for tool in ("ip", "nft", "iperf3"):
        if shutil.which(tool) is None:
            sys.exit(f"bench_nat: needs {tool}")
    tp = throughput(args.seconds, args.rounds)
    ns = "acnat-bench-cp"
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner",
                              "--mappings", str(args.mappings)], check=True, capture_output=True, text=True)
        cp = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    m = args.mappings
    rows = [
        ("iperf3 TCP, 1 stream, through the pool address (Gbit/s)", f"{tp['nat'] / 1e9:.2f}",
         f"plain routing {tp['plain'] / 1e9:.2f}", f"{tp['nat'] / tp['plain']:.2f} (target ≥ 0.9)"),
        ("checkouts/s, LocalPool + NAT (each awaits its element in the kernel, as DNS does)",
         f"{cp['checkouts_nat']:,.0f}", f"LocalPool alone {cp['checkouts_pool']:,.0f}",
         f"{cp['checkouts_nat'] / cp['checkouts_pool']:.2f}"),
        ("single-element transactions/s (libnftables, in-process)", f"{cp['single_lib']:,.0f}",
         f"`nft -j -f -` per change {cp['single_cli']:,.0f}", f"{cp['single_lib'] / cp['single_cli']:.1f}x"),
        (f"batched install, 250 elements per transaction, {m:,} elements (elements/s)",
         f"{cp['batched']:,.0f}", "", ""),
        (f"full reconcile at {m:,} mappings: model + one transaction (s)",
         f"{cp['reconcile']:.2f} ({cp['model']:.2f} + {cp['rebuild']:.2f})",
         f"same JSON via `nft -j -f -` {cp['rebuild_cli']:.2f}", f"{cp['rebuild_cli'] / cp['rebuild']:.2f}x"),
        ("read `seen` set, 1,000 elements (s): netlink dump", f"{cp['seen_1k']:.3f}",
         f"libnftables JSON listing {cp['seen_1k_json']:.3f}", f"{cp['seen_1k_json'] / cp['seen_1k']:.1f}x"),
        (f"read `seen` set, {m:,} elements (s): netlink dump", f"{cp['seen_big']:.2f}",
         f"libnftables JSON listing {cp['seen_big_json']:.2f}", f"{cp['seen_big_json'] / cp['seen_big']:.1f}x"),
        (f"conntrack dump, {cp['ct_entries']:,.0f} entries (s): raw netlink", f"{cp['ct_raw']:.3f}",
         f"pyroute2 `dump_entries` {cp['ct_pyroute2']:.2f}", f"{cp['ct_pyroute2'] / cp['ct_raw']:.0f}x"),
    ]
    print("| measurement | ours | reference (same run) | ratio |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
