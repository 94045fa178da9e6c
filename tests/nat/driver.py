"""A connector's NAT half, run inside a connector namespace by the NAT tests and the benchmark.

argv[1] is a JSON object of options; commands arrive as JSON lines on stdin, answers leave as JSON
lines on stdout, logs go to stderr. The pool is a real ``LocalPool`` (restored from ``snapshot`` when
that file exists, saved there on stop) or, with ``raft``, a real ``RaftReplica`` member.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appconnector import metrics
from appconnector.config import load
from appconnector.nat.service import NatService
from appconnector.nat.settings import NatSettings
from appconnector.pool.addresses import format_address
from appconnector.pool.local import LocalPool
from appconnector.pool.state import PoolState
from appconnector.tailnet.api import NodeInfo


def ip_int(t: str) -> int:
    return int(ipaddress.ip_address(t))


class StaticDirectory:
    """A fixed node list (option ``nodes``: node → its tailnet IPs, both families), as the tailnet
    directory would give it: one node, one mapping, reachable from its IPv4 and its IPv6."""

    def __init__(self, nodes: dict[str, list[str]]) -> None:
        self._nodes = {n: NodeInfo(node=n, name=n, ipv4=tuple(i for i in ips if ":" not in i),
                                   ipv6=tuple(i for i in ips if ":" in i)) for n, ips in nodes.items()}

    def nodes(self) -> dict[str, NodeInfo]:
        return dict(self._nodes)

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass  # the list never changes


def counter_value(counter: Any) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


class CountingPool(LocalPool):
    """LocalPool that also counts the touch marks handed to it (the NAT service's output)."""

    touch_calls = 0

    def touch(self, node: str, address: int, domain: str, at: float) -> None:
        self.touch_calls += 1
        super().touch(node, address, domain, at)


async def make_replica(opts: dict[str, Any], cfg: Any) -> Any:
    raft = opts.get("raft")
    if raft:
        from appconnector.pool.replica import RaftReplica  # only when the cluster variant runs
        from appconnector.pool.settings import PoolSettings, RaftSettings

        replica = RaftReplica(PoolSettings.from_config(cfg), RaftSettings(
            cfg.cluster.state_dir, raft["self"], tuple(raft["peers"]), raft["secret"]))
        await replica.start()
        return replica
    state = None
    snap = opts.get("snapshot")
    if snap and Path(snap).exists():
        state = PoolState.from_bytes(Path(snap).read_bytes(), cfg.pool.prefixes)
    pool = CountingPool(cfg.pool.prefixes, reuse_after=cfg.pool.reuse_after, state=state)
    await pool.start()
    return pool


async def main() -> None:
    opts: dict[str, Any] = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    env = {f"APPCONNECTOR_{k.upper()}": str(v) for k, v in opts.get("env", {}).items()}
    cfg = load(opts.get("config"), env=env)
    replica = await make_replica(opts, cfg)
    fatal: list[str] = []
    directory = StaticDirectory(opts["nodes"]) if "nodes" in opts else None
    nat = NatService(NatSettings.from_config(cfg), replica, directory, seen_interval=opts.get("seen_interval", 1.0),
                     conntrack_interval=opts.get("conntrack_interval", 30.0),
                     touch_refresh=opts.get("touch_refresh"), on_fatal=fatal.append)
    await nat.start()
    delay = opts.get("nft_delay")
    if delay and nat._nft is not None:  # a deliberately slow kernel: after start, every transaction takes `delay` s
        slow = nat._nft

        def slow_run(commands: Any, run: Any = slow.run) -> None:
            time.sleep(delay)
            run(commands)

        slow.run = slow_run  # type: ignore[method-assign]
    broken = {"left": int(opts.get("break_rebuilds", 0))}
    if broken["left"] and nat._reconciler is not None:  # a bug in the worker's path, the first n rebuilds
        rec = nat._reconciler

        def buggy_rebuild(elements: Any, rebuild: Any = rec.rebuild) -> None:
            if broken["left"] > 0:
                broken["left"] -= 1
                raise RuntimeError("planted bug in rebuild")
            rebuild(elements)

        rec.rebuild = buggy_rebuild  # type: ignore[method-assign]
    out = sys.stdout

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    reply({"ready": True, "enabled": nat.enabled, "reason": nat.reason})
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "checkout":  # as DNS does: checkout, then wait (bounded) for the kernel element
                t0 = time.perf_counter()
                address = await replica.checkout(cmd["node"], cmd["domain"],
                                                 tuple(sorted(ip_int(t) for t in cmd["targets"])),
                                                 cmd.get("ttl", 60.0))
                applied = time.perf_counter() - t0
                await asyncio.wait_for(nat.ready(cmd["node"], address), cmd.get("ready_timeout", 10.0))
                reply({"address": format_address(address), "installed": nat.installed(cmd["node"], address),
                       "applied_seconds": applied, "seconds": time.perf_counter() - t0})
            elif op == "burst":  # many checkouts without waiting for the kernel: how long each apply takes
                applies = []
                targets = tuple(sorted(ip_int(t) for t in cmd["targets"]))
                for node in cmd.get("nodes", [cmd.get("node")]):
                    for i in range(cmd["n"]):
                        t0 = time.perf_counter()
                        await replica.checkout(node, f"{i}.{cmd['domain']}", targets, 60.0)
                        applies.append(time.perf_counter() - t0)
                        if i == 0 and cmd.get("wait_busy"):  # the rest while the worker is in a transaction
                            deadline = time.monotonic() + 10
                            while nat.status()["worker"] == "idle" and time.monotonic() < deadline:
                                await asyncio.sleep(0.005)
                reply({"max_apply_seconds": max(applies), "status": nat.status()})
            elif op == "ready":
                t0 = time.perf_counter()
                await asyncio.wait_for(nat.ready("", 0), cmd.get("timeout", 30.0))
                reply({"seconds": time.perf_counter() - t0, "status": nat.status()})
            elif op == "set_targets":
                await replica.set_targets(cmd["domain"], tuple(sorted(ip_int(t) for t in cmd["targets"])),
                                          cmd.get("ttl", 60.0))
                reply({"ok": True})
            elif op == "forget":
                await replica.forget(cmd["nodes"])
                reply({"ok": True})
            elif op == "release":
                await replica.release([(n, d) for n, d in cmd["pairs"]])
                reply({"ok": True})
            elif op == "lookup":
                found = replica.lookup(cmd["node"], cmd["domain"])
                reply({"address": format_address(found[0]) if found else None,
                       "last_used": found[1] if found else None})
            elif op == "installed":
                reply({"installed": nat.installed(cmd["node"], ip_int(cmd["address"]))})
            elif op == "status":
                reply({**nat.status(), "touch_calls": getattr(replica, "touch_calls", None),
                       "reconciles": {f"{s.labels['kind']}/{s.labels['result']}": s.value
                                      for m in metrics.NAT_RECONCILES.collect() for s in m.samples
                                      if s.name.endswith("_total")},
                       "worker_errors": counter_value(metrics.NAT_WORKER_ERRORS),
                       "worker_errors_internal": metrics.NAT_WORKER_ERRORS.labels("internal")._value.get(),
                       "fatal": fatal,
                       "touch_batches": counter_value(metrics.POOL_TOUCH_BATCHES),
                       "unmapped_drops": metrics.NAT_UNMAPPED_DROPS._value.get(),
                       "seen_reads": counter_value(metrics.NAT_SEEN_READS),
                       "last_reconcile": metrics.NAT_LAST_RECONCILE._value.get(),
                       "unmapped_rejects": metrics.NAT_UNMAPPED_REJECTS._value.get(),
                       "leader": replica.is_leader(), "term": replica.status().get("term")})
            elif op == "stop":
                await nat.stop()
                await replica.stop()
                snap = opts.get("snapshot")
                if snap and isinstance(replica, LocalPool):
                    Path(snap).write_bytes(replica.snapshot())
                reply({"stopped": True})
                return
            else:
                reply({"error": f"unknown op {op}"})
        except Exception as e:
            logging.exception("driver: %s failed", op)
            reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    asyncio.run(main())
