"""The pysyncobj 0.3.17 implementation of the engine seam (:mod:`appconnector.pool.engine`), held to Raft.

With :mod:`appconnector.pool.storage` (its files), the only module that imports pysyncobj. The replica
sees it as an :class:`~appconnector.pool.engine.Engine` built by :func:`open_engine`; pysyncobj's status
dict is translated here into :class:`~appconnector.pool.engine.EngineStatus`, for this member and for a
peer asked over the network (:func:`peer_status`).

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
* pysyncobj logs a corrupt dump and starts empty; :func:`~appconnector.pool.storage.validate_state_dir`
  reads the dump, journal and meta file first and refuses to start with a message naming the file.

pysyncobj's private attributes used here are listed in ``_PRIVATE`` and checked at start-up, so a
different pysyncobj version fails loudly instead of silently losing the guard.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pysyncobj
import pysyncobj.serializer
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, SyncObjException, replicated
from pysyncobj.encryptor import getEncryptor
from pysyncobj.journal import FileJournal, MetaStorer
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.pickle import dumps as pysyncobj_dumps
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.utility import TcpUtility, UtilityException

from appconnector.metrics import RAFT_TICK_FAILURES
from appconnector.pool.engine import (
    CANDIDATE,
    FOLLOWER,
    LEADER,
    MEMBER,
    BindError,
    EngineHooks,
    EngineSpec,
    EngineStatus,
    RaftTuning,
    ResultCallback,
    StateMachine,
)
from appconnector.pool.raftlog import DivergenceWatch, GuardedJournal, plan_append
from appconnector.pool.storage import (
    PYSYNCOBJ_VERSION,
    STATE_FORMAT,
    Durability,
    StateError,
    StatePaths,
    _DumpedState,
    fsync_dir,
    validate_state_dir,
    write_journal,
)
from appconnector.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

# pysyncobj internals the guard reaches (checked at start-up against this exact version).
_RAFT_LOG = "_SyncObj__raftLog"
_TRANSPORT = "_SyncObj__transport"
_ON_MESSAGE = "_SyncObj__onMessageReceived"
_COMMIT_INDEX = "_SyncObj__raftCommitIndex"
_NEXT_APPEND = "_SyncObj__newAppendEntriesTime"
_LOAD_DUMP = "_SyncObj__loadDumpFile"
_PRIVATE = (_RAFT_LOG, _TRANSPORT, _ON_MESSAGE, _COMMIT_INDEX, _NEXT_APPEND, _LOAD_DUMP, "_poller")

STATUS_KEY = "appconnector_membership"
"""The field this engine adds to pysyncobj's status (what a member says of itself, pool.membership)."""
_NEEDS_NO_SYNC = ("append_entries", "apply_command_response")
_PARTNER = "partner_node_status_server_"
_MATCH = "match_idx_server_"


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


class SyncedMetaStorer(MetaStorer):  # type: ignore[misc]
    """pysyncobj's meta file (term, vote, commit index), written the same way (a pickled dict to a temporary
    name, then renamed) but through :meth:`Durability.replace`: pysyncobj renames it unsynced, once a
    second, so a directory sync for anything else could make the new name durable over empty contents."""

    def __init__(self, path: str, durability: Durability) -> None:
        super().__init__(path)
        self._path = path
        self._durability = durability

    def storeMeta(self, meta: dict[str, Any]) -> None:  # pysyncobj's name
        tmp = self._path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(pysyncobj_dumps(meta))
        self._durability.replace(tmp, self._path)


_META_STORER = "_FileJournal__metaStorer"
_JOURNAL_FILE = "_FileJournal__journalFile"
_JOURNAL_FILE_OBJECT = "_ResizableFile__f"
_DUMP_DURABILITY: Durability | None = None


def _use_synced_meta(journal: Any, durability: Durability) -> None:
    """Give a FileJournal our meta storer (same file, same format, synced renames)."""
    old = getattr(journal, _META_STORER, None)
    if not isinstance(old, MetaStorer):
        raise RuntimeError(f"pysyncobj internals changed ({_META_STORER} missing): the meta file cannot be synced")
    setattr(journal, _META_STORER, SyncedMetaStorer(old.getPath(), durability))


def _fdatasync_journal(journal: Any) -> None:
    """fdatasync of the journal's file: it writes back the pages pysyncobj dirtied through its shared
    mapping, as msync(MS_SYNC) would, but Python's mmap.flush holds the GIL for the whole msync (5-14 ms
    seen: every thread of the member, the DNS loop among them, stood still), os.fdatasync releases it.
    The file object is looked up at each call: pysyncobj reopens it when the journal grows."""
    f = getattr(getattr(journal, _JOURNAL_FILE), _JOURNAL_FILE_OBJECT)
    os.fdatasync(f.fileno())


def _dump_replace(tmp: str, path: str) -> None:
    """pysyncobj's serializer renames a written dump (or a received snapshot) over the old one with this."""
    if _DUMP_DURABILITY is None:
        os.replace(tmp, path)
    else:
        _DUMP_DURABILITY.replace(tmp, path)


def check_pysyncobj() -> None:
    """Refuse to run on a pysyncobj whose internals the guard was not written against."""
    version = getattr(pysyncobj.syncobj, "VERSION", None)
    if version != PYSYNCOBJ_VERSION:
        raise RuntimeError(f"pysyncobj {version} found; the journal guard is written for {PYSYNCOBJ_VERSION}")
    if not __debug__:
        raise RuntimeError("python -O strips pysyncobj's replay checks (asserts): run without -O")
    if not hasattr(pysyncobj.serializer, "atomicReplace"):
        raise RuntimeError("pysyncobj internals changed (serializer.atomicReplace missing): dumps cannot be synced")


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


_DUMP_WRITER_NICE = 19
"""The forked dump writer's niceness: it yields the CPU to every member's tick thread. At 1M mappings
known-name p99 during dumps was 10 / 2.3 ms at 19 against 29 ms at 10 (bench/README.md, "scale"). The
price: on a host saturated by other work the writer starves (7 s of CPU in 6 minutes at load average 25
on 2 cores), and pysyncobj sends no snapshot to a joining member while its writer runs."""
_PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: no dynamic loading in a forked child


def _in_dump_writer() -> None:
    """In a child forked by pysyncobj's log compaction (from a tick thread): hold none of the parent's
    descriptors, run at the lowest priority, and die with the tick thread that forked it.

    The child only writes the dump file, which it opens itself; left open, its copies of the listening
    socket and peer connections would keep the port bound after a kill -9 of the parent (a restart then
    cannot listen) and hide the parent's death from its peers, and its stdin/stdout would keep a
    supervisor's pipes open. At 1M mappings it is seconds of CPU (serialising, pickling, gzip at level 9),
    and the members compact within moments of each other (same log length): at normal priority three
    writers took the cores from the members' tick threads and answers stalled (bench/README.md, "scale").
    A late dump costs a longer journal (and pysyncobj sends no snapshot meanwhile); a writer outliving
    its member could rename an old dump over the one a restarted member writes (both use ``dump.tmp``),
    so it is killed with it."""
    if threading.get_ident() in _TICK_THREADS:
        os.closerange(3, 65536)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.nice(_DUMP_WRITER_NICE)


os.register_at_fork(after_in_child=_in_dump_writer)


# --- the SyncObj -----------------------------------------------------------------------------------------


class PoolSyncObj(SyncObj):  # type: ignore[misc]
    """pysyncobj's SyncObj with the journal guard, its own tick thread and adaptive heartbeats."""

    def __init__(self, self_address: str, partners: Sequence[str], consumer: PoolConsumer,
                 paths: StatePaths, secret: str, tuning: RaftTuning, *, bind_address: str | None = None,
                 guard: bool = True,
                 dynamic_membership: bool = False,
                 fsync: bool = True,
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
        if fsync:  # the member directory's name (made here or by the run lock): without it a cut loses it all
            fsync_dir(paths.dir.parent)
        _wait_port_free(bind_address or self_address, tuning.bind_wait)
        self._tuning = tuning
        # before SyncObj's constructor: it reads every attribute (the properties below among them)
        self.consumer = consumer
        self._found: Mapping[str, object] = {}
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
        self.guarded = guard
        self._on_untrusted = on_untrusted
        self._on_fatal = on_fatal
        self.untrusted: str | None = None
        self.durability = Durability(paths, fsync)
        self._paths = paths
        _use_synced_meta(getattr(self, _RAFT_LOG), self.durability)
        if not hasattr(getattr(getattr(self, _RAFT_LOG), _JOURNAL_FILE, None), _JOURNAL_FILE_OBJECT):
            raise RuntimeError(f"pysyncobj internals changed ({_JOURNAL_FILE} missing): the journal cannot be synced")
        # the full dump (written by the forked child) and a received snapshot are renamed into place by
        # pysyncobj's serializer: through Durability.replace (one engine per process; the child inherits it)
        global _DUMP_DURABILITY
        _DUMP_DURABILITY = self.durability
        pysyncobj.serializer.atomicReplace = _dump_replace
        self.journal = GuardedJournal(getattr(self, _RAFT_LOG), lambda: int(self.raftLastApplied), self.distrust,
                                      self.durability, self._trim_journal if fsync else None,
                                      flush=_fdatasync_journal)
        self._handle_message = getattr(self, _ON_MESSAGE)
        if guard:
            setattr(self, _RAFT_LOG, self.journal)
            transport = getattr(self, _TRANSPORT)
            transport.setOnMessageReceivedCallback(self._guarded_message)
            # Durable before acknowledged: every message pysyncobj sends that reflects the journal (an
            # append's answer, a vote) goes out after the journal changes are synced.
            self._transport_send = transport.send
            transport.send = self._send_synced
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
        self._heard: dict[str, float] = {}  # peer id → monotonic time of its last message (status page)
        # told to peers in the utility status (pool.membership): "joining" | "member" | "removed"
        self._membership_state = MEMBER
        self._self_address = self_address
        self._partners = tuple(partners)
        self._thread = threading.Thread(target=self._tick_loop, name=f"raft-{self_address}", daemon=True)
        self._thread.start()
        # pysyncobj pickles every SyncObj attribute it did not create itself into the full dump; ours (locks,
        # threads, the journal) cannot be pickled, so every dump failed ("Failed to store full dump").
        self._SyncObj__properies.update(self.__dict__)

    # --- the guard -----------------------------------------------------------------------------------

    def _guarded_message(self, node: Any, message: Any) -> None:
        self._heard[str(getattr(node, "id", node))] = time.monotonic()
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

    def _trim_journal(self, inner: Any, position: int) -> Any:
        """After a compaction: the journal from ``position`` on, written aside, synced and renamed over the
        old one. pysyncobj rewrites its file in place from the start (clear, then add each kept entry), so a
        power cut inside that rewrite could leave neither the old journal nor the new one on disk."""
        kept = [(int(idx), int(term), bytes(command)) for command, idx, term in inner[position:]]
        inner.onOneSecondTimer()  # the meta file holds what the journal object has unsaved: the new one reads it
        write_journal(self._paths.journal, kept)
        inner._destroy()
        journal = FileJournal(str(self._paths.journal))
        _use_synced_meta(journal, self.durability)
        return journal

    def _send_synced(self, node: Any, message: Any) -> Any:
        # Two kinds of message vouch for nothing on this member's disk: a leader's entries to its followers
        # (Raft lets the leader write its log in parallel; it counts itself for them only at a later
        # tick's commit, after the tick-end sync) and the leader telling a follower where its forwarded
        # command went (without this exemption, one sync per forwarded command instead of one per tick).
        # Everything else (an append's answer, a vote) reflects the journal and waits for it.
        unsynced = isinstance(message, dict) and message.get("type") in _NEEDS_NO_SYNC
        if not unsynced and not self._sync_journal():
            return False  # not sent: the member stops (what it would say may not be on disk)
        return self._transport_send(node, message)

    def _sync_journal(self) -> bool:
        try:
            self.journal.sync()
        except OSError as e:
            # after a failed sync the kernel may have dropped the dirty pages: what is on disk is unknown
            self.distrust(f"the journal could not be synced ({e}): acknowledged entries may not be on disk")
            return False
        return True

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

    def _compact_if_large(self) -> None:
        """Ask pysyncobj for a full dump when the journal outgrew ``compaction_min_bytes`` and the last dump
        (tick thread; O(entries), and pysyncobj keeps them below ``compaction_min_entries``)."""
        limit = self._tuning.compaction_min_bytes
        if not limit:
            return
        journal = self.journal
        size = sum(len(journal[i][0]) for i in range(len(journal)))
        if size < limit:
            return
        with contextlib.suppress(OSError):  # no dump yet: the byte limit alone
            limit = max(limit, os.stat(self._paths.dump).st_size)
        if size >= limit:
            self.forceLogCompaction()

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
                # The leader counts itself in the majority for what it appended in this tick at its next
                # tick's commit: synced before then (one sync for the tick's whole batch).
                self._sync_journal()
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
                self._compact_if_large()
        try:
            self._doDestroy()
        except Exception:
            log.exception("raft shutdown failed")
        _TICK_THREADS.discard(threading.get_ident())

    # --- the Engine interface (appconnector.pool.engine.Engine: contracts there) ------------------------

    @property
    def state(self) -> StateMachine:
        return self.consumer.state

    @property
    def state_lock(self) -> threading.Lock:
        return self.consumer.lock

    @property
    def failure(self) -> str | None:
        return self.consumer.failure

    @property
    def found(self) -> Mapping[str, object]:
        return self._found

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

    def status(self) -> EngineStatus:
        raw = self._status
        leader = self.leader()
        members = _members(raw) if raw else tuple(sorted({self._self_address, *self._partners}))
        return EngineStatus(
            self_address=self._self_address,
            role=LEADER if self.is_leader() else (FOLLOWER if leader else CANDIDATE),
            leader=leader,
            term=int(self.raftCurrentTerm),
            commit_index=int(self.raftCommitIndex),
            last_applied=int(self.raftLastApplied),
            leader_commit=_int_or_none(raw.get("leader_commit_idx")),
            log_length=_int_or_none(raw.get("log_len")),
            members=members,
            connected=_connected(raw),
            match_index=_match_index(raw),
            membership=self._membership_state,
        )

    def engine_details(self) -> Mapping[str, object]:
        return {
            "engine": "pysyncobj",
            "guard": self.guarded,
            "appends_rewritten": self.appends_rewritten,
            "tails_held": self.tails_held,
            "truncations_refused": self.journal.refused,
            "diverged": self.divergence.count + self.journal.truncated_applied,
            "fsync": self.durability.enabled,
            "syncs": self.durability.syncs,
        }

    def last_heard(self) -> Mapping[str, float]:
        return dict(self._heard)

    def set_membership_state(self, state: str) -> None:
        self._membership_state = state

    def getStatus(self) -> dict[str, Any]:  # pysyncobj's name: its utility "status" calls it
        status: dict[str, Any] = super().getStatus()
        status[STATUS_KEY] = self._membership_state
        return status

    def change_members(self, action: str, address: str, done: Callable[[bool, str], None]) -> None:
        def result(res: object, err: int) -> None:
            done(err == 0, "" if err == 0 else f"pysyncobj reason {err}: no leader, or another membership "
                 "change is still in progress")

        def run() -> None:
            try:
                change = self.addNodeToCluster if action == "add" else self.removeNodeFromCluster
                change(address, callback=result)
            except Exception as e:
                log.exception("raft: %s %s failed", action, address)
                done(False, f"{type(e).__name__}: {e}")
        self.call_on_tick(run)

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


# --- building one, and pysyncobj's status dict as an EngineStatus -----------------------------------------


def open_engine(spec: EngineSpec, initial: StateMachine, restore: Callable[[bytes], StateMachine],
                hooks: EngineHooks) -> PoolSyncObj:
    """The :class:`~appconnector.pool.engine.EngineFactory` for pysyncobj: validate (and repair) the
    member's files, then start the member."""
    paths = StatePaths(spec.member_dir)
    validated: list[tuple[bytes, StateMachine]] = []

    def check(data: bytes) -> StateMachine:
        state = restore(data)
        validated.append((data, state))
        return state

    def restore_once(data: bytes) -> StateMachine:
        # pysyncobj loads the dump validate_state_dir just restored: the same bytes give the same state,
        # so it is used once instead of being built again (a second O(state) load at start)
        if validated and validated[0][0] == data:
            return validated.pop()[1]
        validated.clear()
        return restore(data)

    found = validate_state_dir(paths, check)
    members = found.get("dump_members")
    wanted = sorted([spec.self_address, *spec.partners])
    if members is not None and members != wanted:
        # PySyncObj #133: with dynamic membership the dump's member list wins over the configured one.
        if spec.dynamic_membership:
            log.warning("raft: members stored in the dump %s differ from the configured %s; the stored "
                        "membership is used (change it with `cluster remove`/joins)", members, wanted)
        else:
            log.warning("raft: members stored in the dump %s differ from the configured %s; static "
                        "membership: the configured members are used", members, wanted)
    consumer = PoolConsumer(initial, restore_once, hooks.on_applied, hooks.on_replaced)
    engine = PoolSyncObj(spec.self_address, spec.partners, consumer, paths, spec.secret, spec.tuning,
                         bind_address=spec.bind_address, guard=spec.guard,
                         dynamic_membership=spec.dynamic_membership, fsync=spec.fsync,
                         on_leader_change=hooks.on_role_change,
                         on_untrusted=hooks.on_untrusted, on_fatal=hooks.on_fatal)
    engine._found = found
    return engine


def _node_address(value: object) -> str | None:
    """A pysyncobj node (or its address string) as ``ip:port``."""
    if value is None:
        return None
    return str(getattr(value, "address", value))


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _members(raw: Mapping[str, Any]) -> tuple[str, ...]:
    me = _node_address(raw.get("self"))
    others = [k.removeprefix(_PARTNER) for k in raw if k.startswith(_PARTNER)]
    return tuple(sorted({*others, *([me] if me else [])}))


def _connected(raw: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k.removeprefix(_PARTNER) for k, v in raw.items() if k.startswith(_PARTNER) and v == 2))


def _match_index(raw: Mapping[str, Any]) -> dict[str, int]:
    return {k.removeprefix(_MATCH): v for k, v in raw.items() if k.startswith(_MATCH) and isinstance(v, int)}


def status_from_pysyncobj(raw: Mapping[str, Any]) -> EngineStatus:
    """pysyncobj's ``getStatus()`` dict (as a peer answers it) as an :class:`EngineStatus`."""
    me = _node_address(raw.get("self")) or ""
    leader = _node_address(raw.get("leader"))
    membership = raw.get(STATUS_KEY)
    return EngineStatus(
        self_address=me,
        role=LEADER if leader is not None and leader == me else (FOLLOWER if leader else CANDIDATE),
        leader=leader,
        term=_int_or_none(raw.get("raft_term")) or 0,
        commit_index=_int_or_none(raw.get("commit_idx")) or 0,
        last_applied=_int_or_none(raw.get("last_applied")) or 0,
        leader_commit=_int_or_none(raw.get("leader_commit_idx")),
        log_length=_int_or_none(raw.get("log_len")),
        members=_members(raw),
        connected=_connected(raw),
        match_index=_match_index(raw),
        membership=membership if isinstance(membership, str) else None,
    )


@functools.lru_cache(maxsize=4)
def _encryptor(secret: str) -> Any:
    # derived once: pysyncobj's key derivation (PBKDF2, 100k rounds) costs ~0.1 s of CPU per utility object
    return getEncryptor(secret)


def peer_status(address: str, secret: str | None, timeout: float = 2.0) -> EngineStatus | None:
    """The status of the member at ``address``, asked on its Raft port with pysyncobj's utility protocol
    (blocking), or None when it does not answer. Without a secret there is no status: the answer is a
    pickle, and only an authenticated one is read."""
    if not secret:
        return None
    utility = TcpUtility(password=None, timeout=timeout)
    utility._TcpUtility__connection.encryptor = _encryptor(secret)  # pysyncobj has no setter
    try:
        result = utility.executeCommand(address, ["status"])
    except (UtilityException, OSError, EOFError, ValueError):
        return None
    return status_from_pysyncobj(result) if isinstance(result, dict) else None
