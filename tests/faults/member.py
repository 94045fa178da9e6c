"""One pool member for the fault harness: a real ``RaftReplica`` driven by JSON lines on stdin/stdout.

    python -m tests.faults.member --self 127.0.0.1:27401 --peers 127.0.0.1:27402,... --state-dir DIR \
        --prefixes 100.64.1.0/24 --reuse-after 172800 --secret-file FILE [--broken]

Requests ``{"id": 1, "op": "checkout", "node": "n1", "domain": "a.com"}``; answers
``{"id": 1, "ok": true, "address": "100.64.1.1"}`` or ``{"id": 1, "ok": false, "error": "..."}``.
Ops: checkout, lookup, domain_for, touch (``flush: true`` proposes it as its own ``touch_batch`` and
answers once applied), status, state (digest and every mapping).

``--broken`` plants a wrong state machine (a :class:`BrokenPoolState` subclass, defined here and nowhere
in the product): every seventh address it hands out is its neighbour's. The reliability suite shows the
history checker catches it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from appconnector import config
from appconnector.pool import replica as replica_module
from appconnector.pool.api import Changes, PoolExhausted, ReplicaUnavailable
from appconnector.pool.replica import RaftReplica, RaftTuning, StateError
from appconnector.pool.state import PoolState

log = logging.getLogger("acfault.member")


class BrokenPoolState(PoolState):
    """A deliberately wrong state machine: every 7th address it returns belongs to the next offset."""

    answered = 0

    def apply(self, command: tuple[Any, ...]) -> tuple[object, Changes]:
        result, changes = super().apply(command)
        if command and command[0] == "checkout_batch" and isinstance(result, list):
            for i, r in enumerate(result):
                if isinstance(r, int):
                    BrokenPoolState.answered += 1
                    if BrokenPoolState.answered % 7 == 3:
                        result[i] = r ^ 1
        return result, changes


def _addr(a: int) -> str:
    return str(ipaddress.IPv4Address(a))


class Server:
    def __init__(self, rep: RaftReplica) -> None:
        self.rep = rep
        self.out_lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg) + "\n"
        with self.out_lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    async def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            body = await self.dispatch(req)
            self.send({"id": rid, "ok": True, **body})
        except PoolExhausted as e:
            self.send({"id": rid, "ok": False, "error": f"exhausted: {e}"})
        except ReplicaUnavailable as e:
            self.send({"id": rid, "ok": False, "error": f"unavailable: {e}"})
        except Exception as e:  # the harness records it as unknown and shows it
            log.exception("request %s failed", req)
            self.send({"id": rid, "ok": False, "error": f"{type(e).__name__}: {e}"})

    async def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        rep = self.rep
        if op == "checkout":
            return {"address": _addr(await rep.checkout(req["node"], req["domain"], (), 60.0))}
        if op == "lookup":
            hit = rep.lookup(req["node"], req["domain"])
            return {"address": None if hit is None else _addr(hit[0])}
        if op == "domain_for":
            return {"domain": rep.domain_for(req["node"], int(ipaddress.IPv4Address(req["address"])))}
        if op == "touch":
            t = (req["node"], int(ipaddress.IPv4Address(req["address"])), req["domain"], float(req["at"]))
            if req.get("flush"):
                # The replica's own write path with one touch: acknowledged once applied here.
                await rep._write(("touch_batch", (t,)))
                return {"applied": True}
            rep.touch(*t)
            return {"applied": False}
        if op == "status":
            st = rep.status()
            return {**{k: v for k, v in st.items() if isinstance(v, str | int | float | bool | list | None)},
                    "leader_self": rep.is_leader()}
        if op == "state":
            maps = [[m.node, m.domain, _addr(m.address)] for m in rep.mappings()]
            return {"digest": rep.digest(), "mappings": maps}
        raise ValueError(f"unknown op {op!r}")


async def amain(args: argparse.Namespace) -> int:
    cfg = config.Config()
    cfg = dataclasses.replace(
        cfg,
        pool=dataclasses.replace(cfg.pool, prefixes=tuple(args.prefixes.split(",")), reuse_after=args.reuse_after),
        cluster=dataclasses.replace(cfg.cluster, state_dir=args.state_dir),
    )
    if args.broken:
        replica_module.PoolState = BrokenPoolState  # type: ignore[misc]
    secret = Path(args.secret_file).read_text().strip() if args.secret_file else None
    peers = [p for p in args.peers.split(",") if p]
    tuning = RaftTuning()
    if args.compaction_entries:
        tuning = dataclasses.replace(tuning, compaction_min_entries=args.compaction_entries)
    rep = RaftReplica(cfg, args.self, peers, secret, tuning=tuning)
    try:
        await rep.start()
    except StateError as e:
        print(f"member {args.self}: refusing to start: {e}", file=sys.stderr, flush=True)
        return 2
    server = Server(rep)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    tasks: set[asyncio.Task[None]] = set()

    def on_line(line: str) -> None:
        try:
            req = json.loads(line)
        except ValueError:
            return
        task = loop.create_task(server.handle(req))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(on_line, line)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=reader, daemon=True).start()
    server.send({"id": 0, "ok": True, "ready": args.self})
    await done.wait()
    await rep.stop()
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--self", required=True)
    p.add_argument("--peers", default="")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--prefixes", default="100.64.1.0/24")
    p.add_argument("--reuse-after", type=float, default=48 * 3600.0)
    p.add_argument("--secret-file", default="")
    p.add_argument("--broken", action="store_true")
    p.add_argument("--compaction-entries", type=int, default=0, help="compact (write a full dump) this often")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
