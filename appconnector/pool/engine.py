"""The Raft engine behind :class:`~appconnector.pool.replica.RaftReplica`: pysyncobj 0.3.17, held to Raft.

This module is the only one that knows pysyncobj. The replica talks to it through :class:`Engine`
(propose a command, ask who leads, hand leadership away, stop), so another Raft library could replace it.

What it adds to pysyncobj, and why (docs/design.md §6):

* The journal guard (:mod:`appconnector.pool.raftlog`) in front of pysyncobj's ``append_entries``
  handling, so followers truncate only at a term conflict and commit only what the leader vouched for.
* Its own tick thread (``autoTick`` off) so the journal can be wrapped before anything runs, with an
  eventfd in pysyncobj's poller to wake it when a command is proposed, and an adaptive heartbeat: a short
  ``appendEntriesPeriod`` while entries flow, a long one when idle. pysyncobj's own loop polls at a fixed
  period, which costs either latency or idle CPU (measured in bench/README.md).
* The state lives in one ``SyncObjConsumer`` whose only replicated method applies a command tuple to the
  pure :class:`~appconnector.pool.state.PoolState`. The full dump keeps pysyncobj's forked writer (no custom
  serializer); the state goes into it as ``PoolState.to_bytes()`` behind our own format number.
* pysyncobj logs a corrupt dump and starts empty; :func:`validate_state_dir` reads the dump, journal and
  meta file first and refuses to start with a message naming the file.

pysyncobj's private attributes used here are listed in ``_PRIVATE`` and checked at start-up, so a
different pysyncobj version fails loudly instead of silently losing the guard.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pysyncobj
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, SyncObjException, replicated
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.poller import POLL_EVENT_TYPE

from appconnector.metrics import RAFT_TICK_FAILURES
from appconnector.pool.membership import MEMBER, STATUS_KEY
from appconnector.pool.raftlog import DivergenceWatch, GuardedJournal, plan_append
from appconnector.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

PYSYNCOBJ_VERSION = "0.3.17"
STATE_FORMAT = 1
"""Version of what the consumer puts into pysyncobj's full dump (bump when the layout changes)."""

# pysyncobj internals the guard reaches (checked at start-up against this exact version).
_RAFT_LOG = "_SyncObj__raftLog"
_TRANSPORT = "_SyncObj__transport"
_ON_MESSAGE = "_SyncObj__onMessageReceived"
_COMMIT_INDEX = "_SyncObj__raftCommitIndex"
_NEXT_APPEND = "_SyncObj__newAppendEntriesTime"
_LOAD_DUMP = "_SyncObj__loadDumpFile"
_PRIVATE = (_RAFT_LOG, _TRANSPORT, _ON_MESSAGE, _COMMIT_INDEX, _NEXT_APPEND, _LOAD_DUMP, "_poller")

ResultCallback = Callable[[Any, int], None]
"""pysyncobj's callback(result, fail_reason); fail_reason 0 is success."""


class StateError(RuntimeError):
    """The state directory cannot be used (corrupt dump, journal or meta file). The message names it."""


class BindError(RuntimeError):
    """The Raft port could not be bound (in use, or not an address of this machine)."""


class StateMachine(Protocol):
    """What the engine needs of the pure state (``PoolState``)."""

    def apply(self, command: tuple[Any, ...]) -> tuple[object, Any]: ...

    def to_bytes(self) -> bytes: ...


class Engine(Protocol):
    """The small interface the replica uses; everything Raft-specific stays behind it."""

    def propose(self, request_id: str, command: tuple[Any, ...], callback: ResultCallback) -> None: ...

    def is_leader(self) -> bool: ...

    def leader(self) -> str | None: ...

    def status(self) -> dict[str, object]: ...

    def transfer_leadership(self, done: Callable[[bool], None]) -> None: ...

    def call_on_tick(self, fn: Callable[[], None]) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RaftTuning:
    """pysyncobj timing. Defaults are ours; :meth:`pysyncobj_defaults` gives the library's for comparison.

    Latency through a follower is about two heartbeat periods plus round trips (entry out, commit index
    out), so the busy period sets it; idle CPU is mostly heartbeats, so the idle period sets that.
    """

    busy_period: float = 0.002
    idle_period: float = 0.05
    busy_window: float = 0.25  # stay on the short period this long after the last new entry
    raft_min_timeout: float = 0.4
    raft_max_timeout: float = 1.0
    leader_fallback: float = 1.5  # pysyncobj default 30 s of stale leadership after a cut-off
    connection_timeout: float = 3.5
    connection_retry: float = 0.3  # pysyncobj default 5 s between reconnects
    batch_bytes: int = 1 << 16  # appendEntriesBatchSizeBytes; the replica keeps commands below it
    compaction_min_entries: int = 5000
    compaction_min_time: float = 300.0
    adaptive: bool = True
    library_defaults: bool = False
    bind_wait: float = 5.0  # a restarted member may find its port held a moment (see _close_inherited_fds)
    tick_failure_limit: float = 10.0  # ticks failing this long (no quiet gap) is fatal: ~10 election timeouts

    @classmethod
    def pysyncobj_defaults(cls) -> RaftTuning:
        """pysyncobj's own timing (autoTick at 50 ms, 100 ms heartbeats): the benchmark's reference."""
        return cls(busy_period=0.1, idle_period=0.1, raft_min_timeout=0.4, raft_max_timeout=1.4,
                   leader_fallback=30.0, connection_retry=5.0, adaptive=False, library_defaults=True)


@dataclass(frozen=True)
class StatePaths:
    """One member's files inside ``cluster.state_dir``."""

    dir: Path

    @classmethod
    def for_member(cls, state_dir: str | Path, self_address: str) -> StatePaths:
        safe = self_address.replace("[", "").replace("]", "").replace(":", "_")
        return cls(Path(state_dir) / f"raft-{safe}")

    @property
    def journal(self) -> Path:
        return self.dir / "journal"

    @property
    def meta(self) -> Path:
        return self.dir / "journal.meta"

    @property
    def dump(self) -> Path:
        return self.dir / "dump"


# --- the state inside pysyncobj's full dump ------------------------------------------------------------


class _DumpedState:
    """Pickles as (format, PoolState bytes). Built in the parent, pickled in pysyncobj's forked writer."""

    __slots__ = ("data", "format", "state")

    def __init__(self, fmt: int, data: bytes | None = None, state: StateMachine | None = None) -> None:
        self.format = fmt
        self.data = data
        self.state = state

    def __reduce__(self) -> tuple[Any, tuple[int, bytes]]:
        data = self.data if self.data is not None else self.state.to_bytes()  # type: ignore[union-attr]
        return (_DumpedState, (self.format, data))


class PoolConsumer(SyncObjConsumer):  # type: ignore[misc]
    """Holds the state machine; its one replicated method applies a command."""

    def __init__(self, state: StateMachine, restore: Callable[[bytes], StateMachine],
                 on_applied: Callable[[str, tuple[Any, ...], object, Any], None],
                 on_replaced: Callable[[StateMachine], None]) -> None:
        super().__init__()
        self._state = state
        self._restore = restore
        self._on_applied = on_applied
        self._on_replaced = on_replaced
        self.lock = threading.Lock()
        self.failure: str | None = None
        self.loads = 0  # full dumps loaded (start-up and snapshot installs): the engine checks each install

    @property
    def state(self) -> StateMachine:
        return self._state

    @replicated  # type: ignore[untyped-decorator]
    def apply(self, request_id: str, command: tuple[Any, ...]) -> object:
        """Runs on every member, in log order, on the tick thread."""
        with self.lock:
            result, changes = self._state.apply(command)
        self._on_applied(request_id, command, result, changes)
        return result

    def _serialize(self) -> dict[str, Any]:
        return {"pool": _DumpedState(STATE_FORMAT, state=self._state)}

    def _deserialize(self, data: dict[str, Any]) -> None:
        # Start-up (after validate_state_dir) and snapshot installs from the leader land here.
        try:
            dumped = data["pool"]
            if dumped.format != STATE_FORMAT:
                raise StateError(f"state format {dumped.format}, this version reads {STATE_FORMAT}")
            state = self._restore(dumped.data)
        except Exception as e:
            # pysyncobj would log this and go on with the old state; the engine sees the load did not happen
            # (consumer.loads) and fail-stops the member (PoolSyncObj.distrust).
            self.failure = f"cannot load the pool state from a full dump: {e!r}"
            log.critical(self.failure)
            raise
        with self.lock:
            self._state = state
        self.loads += 1
        self._on_replaced(state)


# --- validating the files before pysyncobj opens them -------------------------------------------------

_JOURNAL_NAME = b"PYSYNCOBJ"
_JOURNAL_HEADER = 24 + 8 + 4 + 4  # name, version, format, last-record offset


def read_journal(path: Path) -> list[tuple[int, int, bytes]]:
    """(index, term, command) of every record in a pysyncobj journal file; StateError when corrupt."""
    raw = path.read_bytes()
    if len(raw) < _JOURNAL_HEADER or not raw[:24].startswith(_JOURNAL_NAME):
        raise StateError(f"{path}: not a pysyncobj journal (bad header)")
    fmt, end = struct.unpack_from("<II", raw, 32)
    if fmt != 1:
        raise StateError(f"{path}: journal format {fmt}, expected 1")
    if not _JOURNAL_HEADER <= end <= len(raw):
        raise StateError(f"{path}: journal end offset {end} outside the file ({len(raw)} bytes)")
    out: list[tuple[int, int, bytes]] = []
    pos = _JOURNAL_HEADER
    while pos < end:
        if pos + 4 > end:
            raise StateError(f"{path}: truncated record at offset {pos}")
        (size,) = struct.unpack_from("<I", raw, pos)
        if size < 17 or pos + 8 + size > end:
            raise StateError(f"{path}: record at offset {pos} has a bad length {size}")
        (trailer,) = struct.unpack_from("<I", raw, pos + 4 + size)
        if trailer != size:
            raise StateError(f"{path}: record at offset {pos}: length {size} but trailer {trailer}")
        idx, term = struct.unpack_from("<QQ", raw, pos + 4)
        command = raw[pos + 20:pos + 4 + size]
        if out and (idx != out[-1][0] + 1 or term < out[-1][1]):
            raise StateError(f"{path}: record at offset {pos}: index {idx} term {term} does not follow "
                             f"index {out[-1][0]} term {out[-1][1]}")
        if command[0] > 3:
            raise StateError(f"{path}: record {idx}: unknown command type {command[0]}")
        if command[0] == 0:
            try:
                pickle.loads(command[1:])
            except Exception as e:
                raise StateError(f"{path}: record {idx}: command does not decode ({e!r})") from None
        out.append((idx, term, command))
        pos += 8 + size
    return out


def read_dump(path: Path) -> tuple[Any, tuple[bytes, int, int], tuple[bytes, int, int], Any]:
    """The (data, last entry, entry before it, cluster) tuple of a full dump; StateError when corrupt."""
    try:
        with gzip.open(path, "rb") as f:
            dump = pickle.load(f)
    except Exception as e:
        raise StateError(f"{path}: full dump does not decode ({e!r})") from None
    if not (isinstance(dump, tuple) and len(dump) == 4 and isinstance(dump[0], list) and len(dump[0]) == 2):
        raise StateError(f"{path}: full dump has an unexpected layout")
    consumer = dump[0][1]
    if not isinstance(consumer, dict) or not isinstance(consumer.get("pool"), _DumpedState):
        raise StateError(f"{path}: full dump holds no pool state")
    if consumer["pool"].format != STATE_FORMAT:
        raise StateError(f"{path}: pool state format {consumer['pool'].format}, this version reads {STATE_FORMAT}")
    return dump


def write_journal(path: Path, records: Sequence[tuple[int, int, bytes]]) -> None:
    """Write (index, term, command) records as a pysyncobj journal file, atomically (tmp + rename)."""
    body = bytearray()
    for idx, term, command in records:
        size = 16 + len(command)
        body += struct.pack("<IQQ", size, idx, term) + command + struct.pack("<I", size)
    header = (_JOURNAL_NAME.ljust(24, b"\0") + PYSYNCOBJ_VERSION.encode().ljust(8, b"\0")
              + struct.pack("<II", 1, _JOURNAL_HEADER + len(body)))
    tmp = path.with_name(path.name + ".repair")
    with open(tmp, "wb") as f:
        f.write(header + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair_interrupted_compaction(paths: StatePaths) -> int:
    """Trim a journal that still starts before the full dump; returns the entries trimmed.

    pysyncobj writes the dump in a forked child, and only on a later tick rewrites the journal to start
    at the dump's last two entries. Killed in between, it finds a journal that does not start with those
    two and *clears* it down to them, dropping every entry after the dump that the journal held (on all
    members at once if they compacted together, which they tend to: same log length). Trimming the
    front instead keeps those entries.
    """
    if not (paths.dump.exists() and paths.journal.exists()):
        return 0
    dump = read_dump(paths.dump)
    last, before = (dump[1][1], dump[1][2], bytes(dump[1][0])), (dump[2][1], dump[2][2], bytes(dump[2][0]))
    records = read_journal(paths.journal)
    if len(records) >= 2 and records[0] == before and records[1] == last:
        return 0
    for k in range(1, len(records) - 1):
        if records[k] == before and records[k + 1] == last:
            write_journal(paths.journal, records[k:])
            log.warning("raft: %s still started %d entries before the full dump (compaction interrupted); "
                        "trimmed them, kept the %d after it", paths.journal, k, len(records) - k - 2)
            return k
    return 0


def validate_state_dir(paths: StatePaths, restore: Callable[[bytes], object]) -> dict[str, object]:
    """Read the dump, journal and meta file as pysyncobj would and refuse (StateError) if any is corrupt.

    Returns what was found (for the start-up log line): entries, dump index, stored cluster members.
    """
    found: dict[str, object] = {"journal_entries": 0, "dump_index": None, "dump_members": None}
    if paths.dump.exists():
        dump = read_dump(paths.dump)
        try:
            restore(dump[0][1]["pool"].data)
        except Exception as e:
            raise StateError(f"{paths.dump}: pool state does not restore ({e!r})") from None
        found["dump_index"] = dump[1][1]
        found["dump_members"] = sorted(str(getattr(n, "address", n)) for n in dump[3])
    if paths.journal.exists():
        found["journal_entries"] = len(read_journal(paths.journal))
    if paths.dump.exists() and paths.journal.exists():
        found["journal_trimmed"] = repair_interrupted_compaction(paths)
    if paths.meta.exists():
        try:
            meta = pickle.loads(paths.meta.read_bytes())
        except Exception as e:
            raise StateError(f"{paths.meta}: journal meta file does not decode ({e!r})") from None
        if not isinstance(meta, dict):
            raise StateError(f"{paths.meta}: journal meta file holds {type(meta).__name__}, not a dict")
        found["term"] = meta.get("currentTerm")
    return found


def check_pysyncobj() -> None:
    """Refuse to run on a pysyncobj whose internals the guard was not written against."""
    version = getattr(pysyncobj.syncobj, "VERSION", None)
    if version != PYSYNCOBJ_VERSION:
        raise RuntimeError(f"pysyncobj {version} found; the journal guard is written for {PYSYNCOBJ_VERSION}")
    if not __debug__:
        raise RuntimeError("python -O strips pysyncobj's replay checks (asserts): run without -O")


def _wait_port_free(address: str, timeout: float) -> None:
    """Wait (sleeping, not spinning as pysyncobj's bind retries do) until ``address`` can be bound."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    while True:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, int(port)))
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise BindError(f"cannot listen for Raft on {address}: {e.strerror}") from None
        time.sleep(0.1)


_TICK_THREADS: set[int] = set()
_TICK_BACKOFF_MIN = 0.01
_TICK_BACKOFF_MAX = 0.5  # below an election timeout: a tick that recovers still keeps the term
_TICK_QUIET = 5.0
"""Seconds without a failed tick that end a run of failures (it was transient)."""
_TICK_LOG_INTERVAL = 5.0


def _close_inherited_fds() -> None:
    """In a child forked by pysyncobj's log compaction (from a tick thread): close every inherited
    descriptor above stderr. The child only writes the dump file, which it opens itself; left open, its
    copies of the listening socket and peer connections would keep the port bound after a kill -9 of
    the parent (a restart then cannot listen) and hide the parent's death from its peers."""
    if threading.get_ident() in _TICK_THREADS:
        os.closerange(3, 65536)


os.register_at_fork(after_in_child=_close_inherited_fds)


# --- the SyncObj -----------------------------------------------------------------------------------------


class PoolSyncObj(SyncObj):  # type: ignore[misc]
    """pysyncobj's SyncObj with the journal guard, its own tick thread and adaptive heartbeats."""

    def __init__(self, self_address: str, partners: Sequence[str], consumer: PoolConsumer,
                 paths: StatePaths, secret: str, tuning: RaftTuning, *, bind_address: str | None = None,
                 guard: bool = True,
                 dynamic_membership: bool = False,
                 on_leader_change: Callable[[], None] | None = None,
                 on_untrusted: Callable[[str], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        """``on_untrusted(reason)``: the state can no longer be trusted (a conflict over applied entries, a
        full dump that would not load); the engine has stopped taking part in Raft when it is called.
        ``on_fatal(reason)``: the tick kept failing for ``tuning.tick_failure_limit`` seconds. Both are
        called once, on the tick thread."""
        check_pysyncobj()
        if not secret:
            # Without a password pysyncobj unpickles whatever reaches its port: code execution for anyone
            # who can connect. With one, every frame's Fernet HMAC is checked before it is unpickled.
            raise ValueError("the Raft engine needs a secret (pysyncobj password)")
        paths.dir.mkdir(parents=True, exist_ok=True)
        _wait_port_free(bind_address or self_address, tuning.bind_wait)
        self._tuning = tuning
        conf = SyncObjConf(
            password=secret,
            autoTick=False,
            appendEntriesUseBatch=True,  # never off: see docs/design.md §6
            appendEntriesPeriod=tuning.busy_period,
            raftMinTimeout=tuning.raft_min_timeout,
            raftMaxTimeout=tuning.raft_max_timeout,
            leaderFallbackTimeout=tuning.leader_fallback,
            connectionTimeout=tuning.connection_timeout,
            connectionRetryTime=tuning.connection_retry,
            appendEntriesBatchSizeBytes=tuning.batch_bytes,
            logCompactionMinEntries=tuning.compaction_min_entries,
            logCompactionMinTime=tuning.compaction_min_time,
            journalFile=str(paths.journal),
            fullDumpFile=str(paths.dump),
            bindAddress=bind_address or self_address,  # pysyncobj binds 0.0.0.0 otherwise
            maxBindRetries=3,
            bindRetryTime=0.2,
            dynamicMembershipChange=dynamic_membership,
            onStateChanged=(lambda old, new: on_leader_change()) if on_leader_change else None,
        )
        try:
            super().__init__(self_address, list(partners), conf, consumers=[consumer])
        except SyncObjException as e:
            if e.errorCode == "BindError":
                raise BindError(f"cannot listen for Raft on {bind_address or self_address}: the port is in use "
                                "or the address is not one of this machine's") from None
            raise
        for name in _PRIVATE:
            if not hasattr(self, name):
                raise RuntimeError(f"pysyncobj internals changed ({name} missing): the journal guard cannot run")
        self.consumer = consumer
        self.guarded = guard
        self._on_untrusted = on_untrusted
        self._on_fatal = on_fatal
        self.untrusted: str | None = None
        self.journal = GuardedJournal(getattr(self, _RAFT_LOG), lambda: int(self.raftLastApplied), self.distrust)
        self._handle_message = getattr(self, _ON_MESSAGE)
        if guard:
            setattr(self, _RAFT_LOG, self.journal)
            getattr(self, _TRANSPORT).setOnMessageReceivedCallback(self._guarded_message)
        self.divergence = DivergenceWatch(self._distrust_if_mine)
        logging.getLogger("pysyncobj").addHandler(self.divergence)
        # pysyncobj loads a snapshot from the leader (and the dump at start) in a private method that logs
        # any failure and goes on with the old state; an instance attribute shadows it, to see the outcome.
        self._load_dump = getattr(self, _LOAD_DUMP)
        setattr(self, _LOAD_DUMP, self._checked_load_dump)
        self.tick_failures = 0
        self._tick_errors = RateLimitedLog(log, _TICK_LOG_INTERVAL)
        self._failing_since: float | None = None
        self._last_failure = 0.0
        self._backoff = _TICK_BACKOFF_MIN
        self._fatal_reported = False
        self.appends_rewritten = 0
        self.tails_held = 0
        self._busy_until = 0.0
        self._calls: list[Callable[[], None]] = []
        self._calls_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poller.subscribe(self._wake_fd, self._on_wake, POLL_EVENT_TYPE.READ)
        self._stopping = threading.Event()
        self._status: dict[str, object] = {}
        self._status_at = 0.0
        self.last_heard: dict[str, float] = {}  # peer id → monotonic time of its last message (status page)
        # told to peers in the utility status (pool.membership): "joining" | "member" | "removed"
        self.membership_state = MEMBER
        self._thread = threading.Thread(target=self._tick_loop, name=f"raft-{self_address}", daemon=True)
        self._thread.start()
        # pysyncobj pickles every SyncObj attribute it did not create itself into the full dump; ours (locks,
        # threads, the journal) cannot be pickled, so every dump failed ("Failed to store full dump").
        self._SyncObj__properies.update(self.__dict__)

    # --- the guard -----------------------------------------------------------------------------------

    def _guarded_message(self, node: Any, message: Any) -> None:
        self.last_heard[str(getattr(node, "id", node))] = time.monotonic()
        if (not isinstance(message, dict) or message.get("type") != "append_entries"
                or message.get("term", -1) < self.raftCurrentTerm):
            self._handle_message(node, message)
            return
        plan = plan_append(message, self.journal)
        if plan is None:
            self._handle_message(node, message)
            return
        if plan.dropped or plan.hold_after is not None or plan.message["commit_index"] != message["commit_index"]:
            self.appends_rewritten += 1
        commit_before = int(getattr(self, _COMMIT_INDEX))
        if plan.hold_after is not None:
            self.tails_held += 1
            self.journal.hold_tail(plan.hold_after)
        self.journal.begin_append()
        try:
            self._handle_message(node, plan.message)
        finally:
            self.journal.end_append()
            if plan.hold_after is not None:
                self.journal.release_tail()
                # pysyncobj clamps its commit index to the (held) log end; the tail is back, so is the index.
                if int(getattr(self, _COMMIT_INDEX)) < commit_before <= self.journal.last_index():
                    setattr(self, _COMMIT_INDEX, commit_before)
                    self.journal.setRaftCommitIndex(commit_before)

    def _checked_load_dump(self, clearJournal: bool) -> None:
        loads = self.consumer.loads
        self._load_dump(clearJournal)
        if self.consumer.loads == loads:
            why = self.consumer.failure or "the full dump does not decode (pysyncobj's error is logged above)"
            self.distrust(f"{'snapshot install from the leader' if clearJournal else 'loading the full dump'} "
                          f"failed: {why}; the state it would have replaced is stale")

    def _distrust_if_mine(self, reason: str) -> None:
        # pysyncobj's logger is shared by every engine in the process: its line is this engine's when it
        # was logged on this engine's tick thread
        if threading.current_thread() is self._thread:
            self.distrust(reason)

    def distrust(self, reason: str) -> None:
        """This member's state can no longer be trusted: stop taking part in Raft at once (no more applies,
        votes or acknowledgements from it) and tell the replica. Tick thread; once."""
        if self.untrusted is not None:
            return
        self.untrusted = reason
        self.consumer.failure = reason
        self._stopping.set()
        log.critical("raft: untrusted state: %s", reason)
        if self._on_untrusted is not None:
            self._on_untrusted(reason)

    def deliver(self, node: Any, message: Any, done: Callable[[], None]) -> None:
        """Hand ``message`` from ``node`` to the engine on the tick thread as the transport would (tests)."""
        def run() -> None:
            try:
                (self._guarded_message if self.guarded else self._handle_message)(node, message)
            finally:
                done()
        self.call_on_tick(run)

    # --- the tick thread -----------------------------------------------------------------------------

    def _on_wake(self, fd: int, event: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake_fd)

    def wake(self) -> None:
        """Make the tick thread run now (a proposal or a call is waiting)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def call_on_tick(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the tick thread (pysyncobj is not thread-safe)."""
        with self._calls_lock:
            self._calls.append(fn)
        self.wake()

    def mark_busy(self) -> None:
        self._busy_until = time.monotonic() + self._tuning.busy_window

    def _next_wait(self) -> float:
        t = self._tuning
        if not t.adaptive:
            return 0.05 if t.library_defaults else t.busy_period
        now = time.monotonic()
        busy = now < self._busy_until or self.journal.last_index() > self.raftLastApplied
        period = t.busy_period if busy else t.idle_period
        if self.conf.appendEntriesPeriod != period:
            self.conf.appendEntriesPeriod = period
            if busy:
                setattr(self, _NEXT_APPEND, 0.0)  # send the new entries now, not at the idle beat
        if not self._isLeader():
            return t.idle_period
        # pysyncobj's own clock (CLOCK_MONOTONIC_RAW here), not time.monotonic(): they drift apart.
        return float(max(0.0, min(period, float(getattr(self, _NEXT_APPEND)) - raft_clock())))

    def _tick_failed(self, error: Exception) -> None:
        """A tick raised: log (rate-limited), back off, and report fatal when it keeps failing."""
        self.tick_failures += 1
        RAFT_TICK_FAILURES.inc()
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        self._last_failure = now
        self._tick_errors.exception("tick", "raft tick failed (%d so far; retrying with backoff)", self.tick_failures)
        failing_for = now - self._failing_since
        if failing_for >= self._tuning.tick_failure_limit and not self._fatal_reported:
            self._fatal_reported = True
            reason = (f"raft tick failing for {failing_for:.0f}s ({self.tick_failures} failures), last: "
                      f"{type(error).__name__}: {error}")
            if self._on_fatal is not None:
                self._on_fatal(reason)
            else:
                log.critical("%s", reason)
        self._stopping.wait(self._backoff)
        self._backoff = min(_TICK_BACKOFF_MAX, self._backoff * 2)

    def _tick_loop(self) -> None:
        _TICK_THREADS.add(threading.get_ident())
        last_index = self.journal.last_index()
        while not self._stopping.is_set():
            with self._calls_lock:
                calls, self._calls = self._calls, []
            for fn in calls:
                try:
                    fn()
                except Exception:
                    log.exception("raft call failed")
            try:
                self.doTick(self._next_wait())
            except Exception as e:
                self._tick_failed(e)
            else:
                self._backoff = _TICK_BACKOFF_MIN
                if self._failing_since is not None and time.monotonic() - self._last_failure > _TICK_QUIET:
                    self._failing_since = None  # a quiet spell ends the run of failures
            index = self.journal.last_index()
            if index != last_index:
                last_index = index
                self.mark_busy()
            now = time.monotonic()
            if now - self._status_at > 0.5:
                self._status_at = now
                self._status = self.getStatus()
        try:
            self._doDestroy()
        except Exception:
            log.exception("raft shutdown failed")
        _TICK_THREADS.discard(threading.get_ident())

    # --- the Engine interface ------------------------------------------------------------------------

    def propose(self, request_id: str, command: tuple[Any, ...], callback: ResultCallback) -> None:
        self.mark_busy()
        self.consumer.apply(request_id, command, callback=callback)
        if not self._tuning.library_defaults:  # the reference waits for its next tick, as autoTick does
            self.wake()

    def is_leader(self) -> bool:
        return bool(self._isLeader())

    def leader(self) -> str | None:
        node = self._getLeader()
        return None if node is None else str(node.address)

    def status(self) -> dict[str, object]:
        return dict(self._status)

    def getStatus(self) -> dict[str, Any]:  # pysyncobj's name: its utility "status" calls it
        status: dict[str, Any] = super().getStatus()
        status[STATUS_KEY] = self.membership_state
        return status

    def transfer_leadership(self, done: Callable[[bool], None]) -> None:
        def run() -> None:
            self.transferLeadership(callback=lambda res, err: done(err == 0))
        self.call_on_tick(run)

    def close(self) -> None:
        self._stopping.set()
        self.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        logging.getLogger("pysyncobj").removeHandler(self.divergence)
        with contextlib.suppress(OSError):
            os.close(self._wake_fd)
