"""The one pool member harness: one Raft member in a process of its own, driven by JSON lines. Tests
(tests/pool, tests/faults, tests/ops) and benchmarks (bench/bench_raft.py) use it; the product never does.

    python -m tests.member --self 127.0.0.1:7001 --partner 127.0.0.1:7002 \\
        --partner 127.0.0.1:7003 --state-dir /tmp/s --secret-file /tmp/secret [--control PATH]

(from the repository root, or with it on ``PYTHONPATH``: :class:`MemberProcess` does both). It hosts one
:class:`~appconnector.pool.replica.RaftReplica` and reads one JSON object per line from stdin (or from
each client of the unix socket ``--control``), answering one line each:
``{"id": 1, "op": "checkout", "node": "n1", "domain": "a.example", "targets": [16843009], "ttl": 60}`` →
``{"id": 1, "ok": true, "address": 1681915905}``. Addresses are IPv4 integers both ways. Errors come back
as ``{"ok": false, "error": "PoolExhausted", "message": ...}`` (the exception's class name; a harness
bug is ``"error": "Internal"``, logged with its traceback). Ops: checkout, touch (``at``: pool time,
default this member's; ``flush: true`` proposes it at once as its own ``touch_batch`` and answers once
applied), set_targets, forget, set_excluded, add_member, remove_member, lookup, domain_for, mappings
(every mapping and the digest), status, wait_applied, load (many concurrent checkouts from inside the
process), verify_acked, latency (sequential checkouts), stop.
The first line on stdout is ``{"event": "ready", ...}``, or ``{"event": "error", ...}`` and exit code 2 when
the state directory is refused (1 when the Raft port cannot be bound); a fatal error (see
appconnector/fatal.py) ends it with its exit code (3: untrusted state, 1: runtime failure). Logs go to
stderr. SIGTERM or the end of stdin stop it gracefully.

``--no-guard`` runs pysyncobj's append handling unguarded (only to show the regression test failing);
``--broken`` plants :class:`BrokenPoolState`, a deliberately wrong state machine (every seventh address
it hands out is its neighbour's), so the fault suite can show its history checker catches it.

:class:`MemberProcess` starts one and talks to it; :func:`free_ports` picks loopback ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from appconnector.config import ConfigError, PoolConfig
from appconnector.fatal import FatalReporter
from appconnector.pool import replica as replica_module
from appconnector.pool.api import Changes, PoolError, PoolReader
from appconnector.pool.engine import BindError, RaftTuning
from appconnector.pool.replica import RaftReplica
from appconnector.pool.settings import PoolSettings, RaftSettings
from appconnector.pool.state import PoolState
from appconnector.pool.storage import StateError
from appconnector.secrets_file import read_secret_file

log = logging.getLogger("tests.member")

DEFAULT_PREFIX = "100.64.0.0/12"
REPO = Path(__file__).resolve().parents[1]
"""The repository root: ``python -m tests.member`` runs from there."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.member", description=__doc__.split("\n")[0])
    p.add_argument("--self", dest="self_address", required=True, help="this member's Raft address ip:port")
    p.add_argument("--bind", default=None, help="listen here instead (when --self is a proxy in front)")
    p.add_argument("--partner", action="append", default=[], help="another member's Raft address (repeat)")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--secret-file", default="")
    p.add_argument("--prefix", action="append", default=[], help=f"pool prefix (repeat; default {DEFAULT_PREFIX})")
    p.add_argument("--reuse-after", type=float, default=48 * 3600.0)
    p.add_argument("--tuning", choices=("ours", "defaults"), default="ours",
                   help="'defaults': pysyncobj's own timing (benchmark reference)")
    p.add_argument("--compact-every", type=int, default=None,
                   help="log compaction (full dump) after this many entries (default 5000)")
    p.add_argument("--dynamic-membership", action="store_true",
                   help="members change through Raft (add_member/remove_member); the stored list wins")
    p.add_argument("--write-deadline", type=float, default=15.0,
                   help="seconds before a write that was not committed fails with ReplicaUnavailable")
    p.add_argument("--checkout-timeout", type=float, default=None,
                   help="seconds before a checkout fails (pool.checkout_timeout; default: --write-deadline)")
    p.add_argument("--max-queued-checkouts", type=int, default=PoolConfig.max_queued_checkouts,
                   help="checkouts waiting to be proposed before more are refused (pool.max_queued_checkouts)")
    p.add_argument("--no-fsync", action="store_true",
                   help="cluster.fsync = false (the durability benchmark's and power-cut test's comparison)")
    p.add_argument("--no-guard", action="store_true",
                   help="run pysyncobj's append handling unguarded (ONLY to show the regression test fails)")
    p.add_argument("--broken", action="store_true",
                   help="plant BrokenPoolState, a wrong state machine (the fault suite's checker must catch it)")
    p.add_argument("--control", default=None, help="serve JSON lines on this unix socket instead of stdin")
    p.add_argument("--log-level", default="INFO")
    return p


class BrokenPoolState(PoolState):
    """A deliberately wrong state machine (``--broken``; here and nowhere in the product): every 7th
    address it returns belongs to the next offset. Its state stays the same as a correct member's."""

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


class CountingObserver:
    """Counts what the replica tells its observers (the NAT mirror's view), for status."""

    def __init__(self) -> None:
        self.resets = 0
        self.changes = 0
        self.mappings_at_last_reset = 0

    def on_changes(self, changes: Changes) -> None:
        self.changes += 1

    def on_reset(self, reader: PoolReader) -> None:
        self.resets += 1
        self.mappings_at_last_reset = sum(1 for _ in reader.mappings())


class Member:
    """The command handlers around one replica."""

    def __init__(self, replica: RaftReplica) -> None:
        self.replica = replica
        self.observer = CountingObserver()
        replica.add_observer(self.observer)
        self.stopping = asyncio.Event()
        self.acked: list[tuple[str, str, int]] = []  # every checkout `load` got an answer for

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        handler: Callable[[dict[str, Any]], Any] | None = getattr(self, f"op_{op}", None)
        if handler is None:
            return {"ok": False, "error": "BadRequest", "message": f"unknown op {op!r}"}
        try:
            out = await handler(req)
        except PoolError as e:
            return {"ok": False, "error": type(e).__name__, "message": str(e)}
        except (KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": "BadRequest", "message": repr(e)}
        except Exception as e:  # a harness bug: answered (the client sees it), and logged in full
            log.exception("request %s failed", req)
            return {"ok": False, "error": "Internal", "message": f"{type(e).__name__}: {e}"}
        return {"ok": True, **out}

    async def op_checkout(self, req: dict[str, Any]) -> dict[str, Any]:
        address = await self.replica.checkout(req["node"], req["domain"], tuple(req.get("targets", ())),
                                              float(req.get("ttl", 60)))
        return {"address": address}

    async def op_touch(self, req: dict[str, Any]) -> dict[str, Any]:
        # "at" defaults to this member's pool time (a client's own clock is not pool time)
        touch = (str(req["node"]), int(req["address"]), str(req["domain"]), float(req.get("at", self.replica.now())))
        if req.get("flush"):
            # the replica's own write path with this one touch: answered once applied here
            await self.replica._write(("touch_batch", (touch,)))
            return {"applied": True}
        self.replica.touch(*touch)
        return {"applied": False}

    async def op_set_targets(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.replica.set_targets(req["domain"], tuple(req["targets"]), float(req.get("ttl", 60)))
        return {}

    async def op_forget(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.replica.forget(list(req["nodes"]))
        return {}

    async def op_set_excluded(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.replica.set_excluded([int(a) for a in req["addresses"]])
        return {}

    async def op_add_member(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.replica.add_member(req["member"])
        return {}

    async def op_remove_member(self, req: dict[str, Any]) -> dict[str, Any]:
        await self.replica.remove_member(req["member"])
        return {}

    async def op_lookup(self, req: dict[str, Any]) -> dict[str, Any]:
        found = self.replica.lookup(req["node"], req["domain"])
        return {"address": found[0] if found else None, "last_used": found[1] if found else None}

    async def op_domain_for(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"domain": self.replica.domain_for(req["node"], int(req["address"]))}

    async def op_mappings(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"mappings": sorted([m.node, m.domain, m.address] for m in self.replica.mappings()),
                "digest": self.replica.digest()}

    async def op_status(self, req: dict[str, Any]) -> dict[str, Any]:
        status = self.replica.status()
        if req.get("digest"):  # O(state): only when asked
            status["digest"] = self.replica.digest()
        stats = self.replica.stats()
        status["mapping_count"] = stats["mappings"]
        status["excluded_count"] = stats["excluded"]
        status["observer"] = {"resets": self.observer.resets, "changes": self.observer.changes,
                              "mappings_at_last_reset": self.observer.mappings_at_last_reset}
        status["pid"] = os.getpid()
        return {"status": status}

    async def op_wait_applied(self, req: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + float(req.get("timeout", 10))
        index = int(req["index"])
        while time.monotonic() < deadline:
            applied = self.replica.status().get("applied_index")
            if isinstance(applied, int) and applied >= index:
                return {"applied_index": applied}
            await asyncio.sleep(0.01)
        return {"applied_index": self.replica.status().get("applied_index"), "timeout": True}

    async def op_load(self, req: dict[str, Any]) -> dict[str, Any]:
        """``count`` checkouts (or as many as fit in ``seconds``) with ``concurrency`` in flight; each
        (node, domain) pair is new. Returns the acknowledged ones."""
        count = int(req["count"])
        until = time.monotonic() + float(req["seconds"]) if "seconds" in req else None
        concurrency = int(req.get("concurrency", 100))
        nodes = int(req.get("nodes", 50))
        node_prefix = str(req.get("node_prefix", "node"))
        domain_prefix = str(req.get("domain_prefix", "d"))
        pad_len = int(req.get("pad", 0))  # longer names → bigger log entries (labels of ≤ 50 characters)
        pad = "".join("." + "x" * min(50, pad_len - k) for k in range(0, pad_len, 50))
        targets = tuple(req.get("targets", (16843009,)))
        # shared_domains: request i maps domain i // nodes, so every node maps the same domains (nodes ×
        # names, as a tailnet does); record=false keeps no per-checkout list (scale runs: millions)
        shared = bool(req.get("shared_domains", False))
        record = bool(req.get("record", True))
        acked: list[list[Any]] = []
        acked_count = 0
        errors: dict[str, int] = {}
        # ack_file: one JSON line per acknowledged checkout, written as it is acknowledged, so a test
        # that kills this process mid-load still knows what was acknowledged.
        ack_file = open(req["ack_file"], "a", buffering=1) if req.get("ack_file") else None  # noqa: SIM115
        next_i = iter(range(count))

        async def worker() -> None:
            nonlocal acked_count
            for i in next_i:
                if until is not None and time.monotonic() > until:
                    return
                node = f"{node_prefix}{i % nodes}"
                domain = f"{domain_prefix}{i // nodes if shared else i}{pad}.example"
                try:
                    address = await self.replica.checkout(node, domain, targets, 60.0)
                except PoolError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                acked_count += 1
                if not record:
                    continue
                acked.append([node, domain, address])
                self.acked.append((node, domain, address))
                if ack_file is not None:
                    ack_file.write(json.dumps([node, domain, address]) + "\n")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        if ack_file is not None:
            ack_file.close()
        return {"acked": acked if req.get("return_acked", True) and record else acked_count, "errors": errors,
                "seconds": seconds, "rate": acked_count / seconds if seconds else 0.0}

    async def op_verify_acked(self, req: dict[str, Any]) -> dict[str, Any]:
        """Every checkout ``load`` acknowledged in this process, looked up in the local state now."""
        missing = []
        for node, domain, address in self.acked:
            found = self.replica.lookup(node, domain)
            if found is None or found[0] != address:
                missing.append([node, domain, address, found[0] if found else None])
        return {"checked": len(self.acked), "missing_count": len(missing), "missing": missing[:10]}

    async def op_latency(self, req: dict[str, Any]) -> dict[str, Any]:
        """Sequential new checkouts from one client: per-checkout latency in milliseconds."""
        count = int(req["count"])
        node = str(req.get("node", "lat"))
        domain_prefix = str(req.get("domain_prefix", "lat"))
        samples: list[float] = []
        for i in range(count):
            t0 = time.perf_counter()
            await self.replica.checkout(node, f"{domain_prefix}{i}.example", (16843009,), 60.0)
            samples.append((time.perf_counter() - t0) * 1000)
        samples.sort()
        return {"p50": statistics.median(samples), "p99": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
                "mean": statistics.fmean(samples), "max": samples[-1]}

    async def op_memory(self, req: dict[str, Any]) -> dict[str, Any]:
        """This process's memory: /proc status lines, Python's allocated blocks and, when started with
        PYTHONTRACEMALLOC, the ``top`` allocation sites (for finding what a mapping costs)."""
        with open("/proc/self/status") as f:
            proc = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
        out: dict[str, Any] = {"proc": proc, "allocated_blocks": sys.getallocatedblocks()}
        if tracemalloc.is_tracing():
            snap = tracemalloc.take_snapshot()
            out["traced"] = tracemalloc.get_traced_memory()[0]
            out["top"] = [[str(s.traceback), s.size, s.count]
                          for s in snap.statistics("lineno")[:int(req.get("top", 15))]]
        return out

    async def op_stop(self, req: dict[str, Any]) -> dict[str, Any]:
        self.stopping.set()
        return {}


_LINE_LIMIT = 16 << 20
"""Bytes in one request line: a forget of 20,000 nodes is about 1 MB of JSON."""


async def _serve_stream(member: Member, reader: asyncio.StreamReader, write: Callable[[str], None]) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def one(line: bytes) -> None:
        try:
            req = json.loads(line)
        except ValueError as e:
            write(json.dumps({"ok": False, "error": "BadRequest", "message": f"not JSON: {e}"}))
            return
        resp = await member.handle(req)
        if isinstance(req, dict) and "id" in req:
            resp["id"] = req["id"]
        write(json.dumps(resp))

    while not member.stopping.is_set():
        line = await reader.readline()
        if not line:
            break
        if line.strip():
            t = asyncio.get_running_loop().create_task(one(line))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=5)


async def run(args: argparse.Namespace) -> int:
    timeout = args.write_deadline if args.checkout_timeout is None else args.checkout_timeout
    pool = PoolSettings(prefixes=tuple(args.prefix or [DEFAULT_PREFIX]), reuse_after=args.reuse_after,
                        checkout_timeout=timeout, max_queued_checkouts=args.max_queued_checkouts)
    tuning = RaftTuning.pysyncobj_defaults() if args.tuning == "defaults" else RaftTuning()
    if args.compact_every:
        tuning = dataclasses.replace(tuning, compaction_min_entries=args.compact_every)
    out = sys.stdout

    def write(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    if args.broken:
        replica_module.PoolState = BrokenPoolState  # type: ignore[attr-defined]
    fatal = FatalReporter()
    try:
        # the product's secret-file reader: a file others can read is refused (exit 2) as `run` refuses it
        secret = read_secret_file("--secret-file", Path(args.secret_file)) if args.secret_file else None
        raft = RaftSettings(args.state_dir, args.self_address, tuple(args.partner), secret, bind_address=args.bind,
                            dynamic_membership=args.dynamic_membership, write_deadline=args.write_deadline,
                            fsync=not args.no_fsync)
        replica = RaftReplica(pool, raft, tuning=tuning, guard=not args.no_guard, on_fatal=fatal.report)
        await replica.start()
    except (StateError, ConfigError, BindError) as e:
        log.error("refusing to start: %s", e)
        write(json.dumps({"event": "error", "error": type(e).__name__, "message": str(e)}))
        return 1 if isinstance(e, BindError) else 2
    member = Member(replica)
    loop = asyncio.get_running_loop()
    fatal_wait = loop.create_task(fatal.wait())  # as `appconnector run`: a fatal error ends the member
    fatal_wait.add_done_callback(lambda _: member.stopping.set())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, member.stopping.set)
    write(json.dumps({"event": "ready", "pid": os.getpid(), "self": args.self_address}))

    if args.control:
        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            def send(line: str) -> None:
                writer.write(line.encode() + b"\n")
            await _serve_stream(member, reader, send)
            writer.close()

        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.control)
        server = await asyncio.start_unix_server(client, path=args.control, limit=_LINE_LIMIT)
        await member.stopping.wait()
        server.close()
    else:
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        serve = loop.create_task(_serve_stream(member, reader, write))
        stop = loop.create_task(member.stopping.wait())
        await asyncio.wait({serve, stop}, return_when=asyncio.FIRST_COMPLETED)
        member.stopping.set()
        serve.cancel()
    await replica.stop()
    fatal_wait.cancel()
    if (failed := fatal.reported) is not None:
        log.critical("fatal: %s; stopping (exit %d)", failed.reason, failed.exit_code)
        return failed.exit_code
    log.info("member %s stopped", args.self_address)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    return asyncio.run(run(args))


# --- the driver side (tests, bench) ------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback TCP ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MemberError(RuntimeError):
    """The member answered ok=false, refused to start, or did not answer in time."""

    def __init__(self, message: str, response: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.response = response or {}


class MemberProcess:
    """A member process and its JSON-lines pipe. ``call`` may be used from several threads at once.
    ``env`` is added to the environment (the fault suite's clock skew), ``preexec_fn`` runs in the child
    (its group id, for the nemesis). Each start appends a ``---- start`` line to the log."""

    def __init__(self, self_address: str, partners: Sequence[str], state_dir: str | Path, *,
                 secret_file: str | Path | None = None, bind: str | None = None,
                 prefixes: Sequence[str] = (DEFAULT_PREFIX,), log_path: str | Path | None = None,
                 extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.self_address = self_address
        self.partners = list(partners)
        self.state_dir = Path(state_dir)
        self.log_path = Path(log_path) if log_path else self.state_dir / f"member-{self_address.replace(':', '_')}.log"
        args = [sys.executable, "-m", "tests.member", "--self", self_address,
                "--state-dir", str(state_dir)]
        for p in partners:
            args += ["--partner", p]
        for p in prefixes:
            args += ["--prefix", p]
        if secret_file:
            args += ["--secret-file", str(secret_file)]
        if bind:
            args += ["--bind", bind]
        self.args = args + list(extra)
        self.env = dict(env or {})
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()
        self._responses: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._log: IO[bytes] | None = None

    def start(self) -> MemberProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log.write(f"---- start {time.time():.3f}\n".encode())
        self._log.flush()
        self._events = queue.Queue()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
               **self.env}
        # a session of its own: kill() ends its process group, a compaction child forked by pysyncobj included
        # (a preexec_fn starts its own: the fault suite's does, and a second setsid would fail)
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     cwd=REPO, env=env, preexec_fn=self.preexec_fn,
                                     start_new_session=self.preexec_fn is None)
        # this process's events go to this start's queue: a previous run's reader may still be finishing
        threading.Thread(target=self._read, args=(self.proc, self._events), daemon=True).start()
        return self

    def _read(self, proc: subprocess.Popen[bytes], events: queue.Queue[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "event" in msg:
                events.put(msg)
                continue
            with self._lock:
                q = self._responses.get(msg.get("id", -1))
            if q is not None:
                q.put(msg)
        events.put({"event": "exit"})
        with self._lock:  # the process is gone: answer every caller waiting on it now (not a restarted one's)
            for q in self._responses.values() if self.proc is proc else ():
                q.put({"ok": False, "error": "MemberExited", "message": f"exit code {proc.wait()}"})

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            raise MemberError(f"{self.self_address}: not ready after {timeout}s") from None
        if event.get("event") != "ready":
            raise MemberError(f"{self.self_address}: {event.get('message', event)}", event)
        return event

    def call(self, op: str, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
        """The answer to ``op``; MemberError when it is ``ok: false`` or does not come."""
        resp = self.request(op, timeout, **kw)
        if not resp.get("ok"):
            raise MemberError(f"{self.self_address}: {op}: {resp.get('error')}: {resp.get('message')}", resp)
        return resp

    def request(self, op: str, timeout: float = 30.0, **kw: Any) -> dict[str, Any]:
        """The answer to ``op`` as it came (``ok`` true or false; ``MemberExited`` when the process ended
        first); MemberError when it is not running or does not answer within ``timeout``."""
        if self.proc is None or self.proc.stdin is None or self.proc.poll() is not None:
            raise MemberError(f"{self.self_address}: not running")
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            rid = next(self._ids)
            self._responses[rid] = q
            try:
                self.proc.stdin.write((json.dumps({"id": rid, "op": op, **kw}) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:  # the process ended meanwhile
                self._responses.pop(rid, None)
                raise MemberError(f"{self.self_address}: pipe closed ({e})") from None
        try:
            resp = q.get(timeout=timeout)
        except queue.Empty:
            raise MemberError(f"{self.self_address}: no answer to {op} in {timeout}s") from None
        finally:
            with self._lock:
                self._responses.pop(rid, None)
        return resp

    def status(self, timeout: float = 10.0, digest: bool = False) -> dict[str, Any]:
        status: dict[str, Any] = self.call("status", timeout=timeout, digest=digest)["status"]
        return status

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to its process group: no flush, no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close_log()

    def stop(self, timeout: float = 15.0) -> int | None:
        """Graceful stop (hands leadership away); SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(MemberError):
                self.call("stop", timeout=5)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


if __name__ == "__main__":
    sys.exit(main())
