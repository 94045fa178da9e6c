"""The Raft engine seam: what :class:`~appconnector.pool.replica.RaftReplica` needs of a Raft library.

The replica is typed against :class:`Engine` and builds one with an :class:`EngineFactory`; it sees typed
values (:class:`EngineStatus`), never a library's fields or status keys. The one implementation is
pysyncobj 0.3.17 held to Raft (:mod:`appconnector.pool.pysyncobj_engine`), whose files are handled by
:mod:`appconnector.pool.storage`; those two modules are the only ones that import pysyncobj (checked by
``tests/pool/test_engine_seam.py``). Another Raft library would be another factory (docs/design.md §6).

Threads: the engine runs its own thread (the "tick thread") on which it applies entries and calls every
hook; the methods below may be called from any thread unless their comment says otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Full dumps written before storage.py existed name the pickled state class by this module's path.
from appconnector.pool.storage import _DumpedState as _DumpedState

ResultCallback = Callable[[Any, int], None]
"""callback(result, fail_reason) of a proposal; fail_reason 0 is success. Called on the tick thread, maybe
never (the replica resolves writes on apply, and uses this only to retry sooner on an error)."""

LEADER, FOLLOWER, CANDIDATE = "leader", "follower", "candidate"
JOINING, MEMBER, REMOVED = "joining", "member", "removed"
"""What a member says of its own membership (:mod:`appconnector.pool.membership`)."""


class BindError(RuntimeError):
    """The Raft port could not be bound (in use, or not an address of this machine)."""


class StateMachine(Protocol):
    """What the engine needs of the pure state (``PoolState``)."""

    def apply(self, command: tuple[Any, ...]) -> tuple[object, Any]: ...

    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class EngineStatus:
    """One member's Raft state as the engine reports it (for this member, or a peer asked over the network)."""

    self_address: str
    role: str
    """:data:`LEADER`, :data:`FOLLOWER` (a leader is known) or :data:`CANDIDATE` (none is)."""
    leader: str | None
    term: int
    commit_index: int
    last_applied: int
    leader_commit: int | None
    """The leader's commit index as this member last heard it; None before it heard one."""
    log_length: int | None
    members: tuple[str, ...]
    """Sorted: this member and the partners it currently knows (the stored membership when dynamic)."""
    connected: tuple[str, ...]
    """The partners it has a live connection to, sorted."""
    match_index: Mapping[str, int] = field(default_factory=dict)
    """Per follower, the last index it acknowledged (known on the leader only, empty elsewhere)."""
    membership: str | None = None
    """What the member says of itself: :data:`JOINING`, :data:`MEMBER` or :data:`REMOVED`."""

    def claims_leadership(self) -> bool:
        return self.leader is not None and self.leader == self.self_address


@dataclass(frozen=True)
class EngineSpec:
    """Where and how to run one member."""

    self_address: str
    partners: tuple[str, ...]
    member_dir: Path
    """The member's own directory (``storage.StatePaths.for_member``); the engine's files go there."""
    secret: str
    """Authenticates every Raft message; never empty (messages are pickles)."""
    tuning: RaftTuning
    bind_address: str | None = None
    guard: bool = True
    dynamic_membership: bool = False
    fsync: bool = True
    """``cluster.fsync``: journal, term/vote and snapshots durable before Raft relies on them."""


@dataclass(frozen=True)
class EngineHooks:
    """What the engine tells the replica; every hook runs on the tick thread and must not block for long."""

    on_applied: Callable[[str, tuple[Any, ...], object, Any], None]
    """(request id, command, result, changes) after each entry is applied, in log order."""
    on_replaced: Callable[[StateMachine], None]
    """The state was replaced wholesale (a snapshot from the leader): no on_applied for what it holds."""
    on_role_change: Callable[[], None]
    """This member became leader or stopped being one."""
    on_untrusted: Callable[[str], None]
    """(reason) The state can no longer be trusted; the engine has already left Raft. Once."""
    on_fatal: Callable[[str], None]
    """(reason) The engine cannot go on (its tick kept failing). Once."""


class Engine(Protocol):
    """A running Raft member holding one state machine. Everything Raft-library-specific stays behind it."""

    @property
    def state(self) -> StateMachine:
        """The state machine as last applied (a snapshot install replaces the object): read it under
        :attr:`state_lock`, which the engine holds while it applies."""
        ...

    @property
    def state_lock(self) -> threading.Lock: ...

    @property
    def failure(self) -> str | None:
        """Why the state can no longer be trusted, once it cannot (then the engine has left Raft)."""
        ...

    @property
    def found(self) -> Mapping[str, object]:
        """What the engine found in its files at start (for the start-up log line)."""
        ...

    def propose(self, request_id: str, command: tuple[Any, ...], callback: ResultCallback) -> None:
        """Propose ``command`` (forwarded to the leader when this member is not). Promises nothing about
        commit: the entry is applied on every member, with ``request_id``, through ``on_applied``, or never
        (lost with a leader), and may be applied twice when proposed again. Any thread; does not block."""
        ...

    def is_leader(self) -> bool:
        """This member leads now (it may have been deposed without knowing it yet)."""
        ...

    def leader(self) -> str | None:
        """The address of the member this one believes leads, or None."""
        ...

    def status(self) -> EngineStatus:
        """This member's Raft state; term, indexes, role and leader are current, the member and
        connection lists may be up to half a second old. Cheap; any thread."""
        ...

    def engine_details(self) -> Mapping[str, object]:
        """Library-specific figures for the status output (e.g. the journal guard's counters)."""
        ...

    def last_heard(self) -> Mapping[str, float]:
        """Per peer, the monotonic time its last message arrived."""
        ...

    def set_membership_state(self, state: str) -> None:
        """What this member tells peers about itself from now on (pool.membership)."""
        ...

    def change_members(self, action: str, address: str, done: Callable[[bool, str], None]) -> None:
        """Propose adding (``action`` "add") or removing ("remove") ``address`` (dynamic membership only).
        ``done(ok, why)`` on the tick thread once the change is committed or refused; maybe never."""
        ...

    def transfer_leadership(self, done: Callable[[bool], None]) -> None:
        """Ask a caught-up follower to take over; ``done(sent)`` on the tick thread (True: it was asked)."""
        ...

    def call_on_tick(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the tick thread soon (for the watchdog probe, tests). Any thread."""
        ...

    def close(self) -> None:
        """Leave Raft and stop the tick thread (waits for it, unless called on it). Blocking; once."""
        ...


class EngineFactory(Protocol):
    """Starts one member: validates its files (``storage.StateError`` names a bad one, ``BindError`` when
    the port cannot be had) and returns it running. Blocking: call it off the event loop."""

    def __call__(self, spec: EngineSpec, initial: StateMachine, restore: Callable[[bytes], StateMachine],
                 hooks: EngineHooks) -> Engine: ...


@dataclass(frozen=True)
class RaftTuning:
    """Raft timing. Defaults are ours; :meth:`pysyncobj_defaults` gives the library's for comparison.

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
    # also compact when the journal holds this many bytes and more than the last full dump: pysyncobj
    # counts entries, and an entry carries up to ~500 checkouts, so 5,000 of them were millions to replay
    # at a restart; a journal no larger than the dump keeps a restart within ~2 loads of the dump
    compaction_min_bytes: int = 4 << 20
    adaptive: bool = True
    library_defaults: bool = False
    bind_wait: float = 5.0  # a restarted member may find its port held a moment (see pysyncobj_engine)
    tick_failure_limit: float = 10.0  # ticks failing this long (no quiet gap) is fatal: ~10 election timeouts

    @classmethod
    def pysyncobj_defaults(cls) -> RaftTuning:
        """pysyncobj's own timing (autoTick at 50 ms, 100 ms heartbeats): the benchmark's reference."""
        return cls(busy_period=0.1, idle_period=0.1, raft_min_timeout=0.4, raft_max_timeout=1.4,
                   leader_fallback=30.0, connection_retry=5.0, adaptive=False, library_defaults=True)
