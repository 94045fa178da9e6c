"""``RaftReplica``: the :mod:`~appconnector.pool.api` contracts (PoolAccess, ReplicaControl) on a Raft cluster.

The asyncio side of the pool. Writes become command tuples proposed through the Raft engine seam
(:class:`~appconnector.pool.engine.Engine`, pysyncobj's by default); they resolve when this member has
applied them, whichever member proposed them to the leader. Reads go to the local state under the state
lock, never through Raft.

* Concurrent checkouts are gathered into one ``checkout_batch`` entry (several entries in flight at once);
  each entry stays well below ``appendEntriesBatchSizeBytes``, because pysyncobj's chunked path for
  larger commands is unreliable and the journal guard does not cover it.
* Completion is seen on apply: each proposal carries a request id, and the apply hook resolves the
  waiting futures. pysyncobj was seen to drop callbacks and to report ``LEADER_CHANGED`` for writes that
  were applied (docs/design.md §6), so its callback is only used to retry sooner on errors; a proposal that
  has not been applied after ``retry_after`` is proposed again. Every command is idempotent, so a write
  applied twice gives the same answer.
* Time is pool time (:mod:`appconnector.pool.clock`): this member's reading of the replicated clock
  goes into commands, with ``reuse_deadline = now - reuse_window(pool.reuse_after)``; while leader, the
  replica proposes a ``tick`` of its reading every ``clock_tick(reuse_after)``. No wall clock is read.
* Touches are queued (newest time per mapping) and flushed as one ``touch_batch`` at least every second.
* Every command stays below the batch limit: checkouts and touches are batched to fit, ``forget`` and
  ``set_excluded`` are split; a command that still would not fit is refused, never proposed.
* Observers are called on the engine's apply thread after each apply, outside the state lock; a
  snapshot install from the leader gives them ``on_reset``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appconnector import metrics
from appconnector.fatal import EXIT_FAILURE, EXIT_UNTRUSTED
from appconnector.pool.api import (
    Address,
    Changes,
    MappingView,
    PoolAccess,
    PoolError,
    PoolObserver,
    PoolReader,
    ReplicaControl,
    ReplicaOverloaded,
    ReplicaUnavailable,
    Targets,
    clock_tick,
    reuse_window,
)
from appconnector.pool.clock import PoolClock
from appconnector.pool.engine import (
    MEMBER,
    BindError,
    Engine,
    EngineFactory,
    EngineHooks,
    EngineSpec,
    RaftTuning,
    StateMachine,
)
from appconnector.pool.pysyncobj_engine import open_engine
from appconnector.pool.report import publish, publish_stats
from appconnector.pool.settings import PoolSettings, RaftSettings
from appconnector.pool.state import PoolState
from appconnector.pool.storage import (
    RunLock,
    StateError,
    StateInUse,
    StatePaths,
    UntrustedState,
    mark_untrusted,
    untrusted_reason,
)
from appconnector.pool.touches import TouchQueue
from appconnector.ratelimit import RateLimitedLog
from appconnector.secrets_file import MEMBER_SECRET_FILE, ensure_secret_file, prepare_state_dir

log = logging.getLogger(__name__)

TOUCH_FLUSH_INTERVAL = 0.5
"""Queued touches go out at least this often (the contract says at least every second)."""
MAX_IN_FLIGHT = 4
"""checkout_batch entries proposed and not yet applied; more checkouts wait and join a later batch."""
RETRY_AFTER = 2.0
"""Propose again when a write was not applied in this time (dropped callback, lost leader)."""
CAUGHT_UP_ENTRIES = 64
"""Entries behind the leader's commit index a member may be and still count as caught up (in flight)."""


@dataclass
class _Proposal:
    rid: str
    command: tuple[Any, ...]
    futures: list[asyncio.Future[Any]]
    started: float
    attempts: int = 0
    timer: asyncio.TimerHandle | None = None
    done: bool = False
    kind: str = "write"
    extra: dict[str, Any] = field(default_factory=dict)


class RaftReplica:
    """The replicated pool on a Raft engine. One per process; construct, ``await start()``, use, ``await stop()``."""

    def __init__(self, pool: PoolSettings, raft: RaftSettings, *, tuning: RaftTuning | None = None,
                 guard: bool = True, on_fatal: Callable[[str, int], None] | None = None,
                 engine_factory: EngineFactory = open_engine) -> None:
        """``pool`` and ``raft`` come from :mod:`appconnector.pool.settings` (``from_config`` at the edge).
        ``engine_factory`` starts the Raft engine (:mod:`appconnector.pool.engine`; pysyncobj's by default).
        ``guard=False`` runs pysyncobj's append handling unguarded (only to show the regression test failing).
        ``on_fatal(reason, exit_code)`` (e.g. :meth:`appconnector.fatal.FatalReporter.report`) is called,
        from the Raft thread, when this member must stop: its state diverged or a snapshot would not install
        (``EXIT_UNTRUSTED``, after the marker is written), or the Raft tick keeps failing (``EXIT_FAILURE``)."""
        self_address = raft.self_address
        partners = [p for p in raft.partners if p != self_address]
        self._prefixes = pool.prefixes
        self._reuse_after = pool.reuse_after
        self._reuse_window = reuse_window(pool.reuse_after)
        self._tick_interval = clock_tick(pool.reuse_after)
        self._clock = PoolClock()
        self._tick_task: asyncio.Task[None] | None = None
        self._tick_in_flight = False
        self._caught_up = False  # see caught_up(): refreshed every tick interval
        self.largest_command = 0  # bytes: the largest command proposed (each must stay below the limit)
        self.self_address = self_address
        self.partners = partners
        self._secret = raft.secret
        self._bind = raft.bind_address
        self._tuning = tuning or RaftTuning()
        self._guard = guard
        self._dynamic = raft.dynamic_membership
        self._membership_state = MEMBER
        self._write_deadline = raft.write_deadline
        self._state_dir = raft.state_dir
        self._fsync = raft.fsync
        self._checkout_timeout = pool.checkout_timeout
        self._max_queued = pool.max_queued_checkouts
        self.paths = StatePaths.for_member(raft.state_dir, raft.bind_address or self_address)
        self._on_fatal = on_fatal
        self._lock = RunLock(self.paths.dir)
        self._errors = RateLimitedLog(log)
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._machine: StateMachine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observers: list[PoolObserver] = []
        self._observer_lock = threading.RLock()  # apply + observer calls in order; add_observer waits for it
        self._nonce = f"{os.getpid():x}.{time.time_ns():x}"
        self._rids = itertools.count(1)
        self._waiting: dict[str, _Proposal] = {}  # rid → proposal, read on the apply thread
        self._waiting_lock = threading.Lock()
        self._queue: list[tuple[tuple[str, str, Targets, float], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._in_flight = 0
        self._touches = TouchQueue()
        self._touch_task: asyncio.Task[None] | None = None
        self._stopped = True
        self._tick_probe: asyncio.Future[None] | None = None
        self.applied = 0
        self.started_info: dict[str, object] = {}

    # ---- lifecycle ----------------------------------------------------------------------------------

    def _restore(self, data: bytes) -> StateMachine:
        state = PoolState.from_bytes(data, self._prefixes)
        if state.load_report is not None:
            publish(state.load_report)
        return state

    async def start(self) -> None:
        """Validate the state directory (StateError names the bad file; :class:`UntrustedState` when an
        earlier run marked it untrusted), then join the cluster."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(prepare_state_dir, self._state_dir)
        try:
            self._lock.acquire()
        except StateInUse as e:
            raise StateError(str(e)) from None
        try:
            await self._start()
        except BaseException:
            self._lock.release()
            raise

    async def _start(self) -> None:
        assert self._loop is not None
        if (reason := untrusted_reason(self.paths.dir)) is not None:
            raise UntrustedState(reason)
        # pysyncobj unpickles what reaches its port unless it has a password: a lone member without a
        # configured secret (the demo, tailscale mode without cluster.tag) gets one of its own.
        secret = self._secret
        if not secret:
            own = Path(self._state_dir) / MEMBER_SECRET_FILE
            secret = await asyncio.to_thread(ensure_secret_file, "cluster.state_dir", own)
            log.info("raft: no cluster.secret_file: the Raft port takes only this member's own secret (%s)", own)
        spec = EngineSpec(self.self_address, tuple(self.partners), self.paths.dir, secret, self._tuning,
                          bind_address=self._bind, guard=self._guard, dynamic_membership=self._dynamic,
                          fsync=self._fsync)
        hooks = EngineHooks(on_applied=self._on_applied, on_replaced=self._on_replaced,
                            on_role_change=self._on_role_change, on_untrusted=self._on_untrusted,
                            on_fatal=lambda reason: self._report(reason, EXIT_FAILURE))
        self._machine = PoolState(self._prefixes)
        self._engine = await asyncio.to_thread(self._engine_factory, spec, self._machine, self._restore, hooks)
        self._engine.set_membership_state(self._membership_state)
        self.started_info = dict(self._engine.found)
        self._stopped = False
        self._touch_task = self._loop.create_task(self._touch_loop(), name="raft-touch-flush")
        self._tick_task = self._loop.create_task(self._tick_loop(), name="raft-pool-clock")
        log.info("raft: member %s started (partners %s, state %s, found %s)", self.self_address,
                 self.partners, self.paths.dir, self.started_info)

    async def stop(self) -> None:
        """Flush touches, hand leadership away if leader, stop the engine."""
        if self._stopped or self._engine is None:
            return
        for task in (self._touch_task, self._tick_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._flush_touches()
        engine = self._engine
        if engine.is_leader() and self.partners:
            await self._hand_leadership_away(engine)
        self._stopped = True
        await asyncio.to_thread(engine.close)
        self._lock.release()
        for p in list(self._waiting.values()):
            self._fail(p, ReplicaUnavailable("replica stopped"))

    async def _hand_leadership_away(self, engine: Engine) -> None:
        """Best effort before a planned stop, so the restart costs no election. An engine may deny a transfer
        while no follower's acknowledged index has reached the leader's last entry (pysyncobj does; under
        load, often the entry just written): ask again until a follower is caught up or the deadline passes."""
        old_leader = engine.leader()
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 2 * self._tuning.raft_max_timeout
        while time.monotonic() < deadline and engine.leader() == old_leader:
            answer: asyncio.Future[bool] = loop.create_future()

            def settle(ok: bool, answer: asyncio.Future[bool] = answer) -> None:
                if not answer.done():
                    answer.set_result(ok)

            def transferred(ok: bool, settle: Callable[[bool], None] = settle) -> None:
                loop.call_soon_threadsafe(settle, ok)

            engine.transfer_leadership(transferred)
            try:
                sent = await asyncio.wait_for(answer, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            # Sent: the follower starts an election at once; give it an election's time to win.
            wait_until = min(deadline, time.monotonic() + (self._tuning.raft_max_timeout if sent else 0.02))
            while engine.leader() == old_leader and time.monotonic() < wait_until:
                await asyncio.sleep(0.01)
        if engine.leader() not in (old_leader, None):
            log.info("raft: handed leadership to %s before stopping", engine.leader())
        else:
            log.warning("raft: could not hand leadership away before stopping (no caught-up follower)")

    def _on_untrusted(self, reason: str) -> None:
        """The engine found this member's state untrusted and left Raft (tick thread): persist the marker
        first (it must survive whatever comes next), then ask the process to stop with EXIT_UNTRUSTED."""
        metrics.STATE_UNTRUSTED.set(1)
        try:
            path = mark_untrusted(self.paths.dir, reason)
            log.critical("raft: this member's state is untrusted (%s); marked in %s: it will not serve again "
                         "until `appconnector state reset` (then it starts empty and receives a snapshot "
                         "from the leader)", reason, path)
        except OSError as e:
            log.critical("raft: this member's state is untrusted (%s), and the marker could not be written "
                         "in %s: %s", reason, self.paths.dir, e)
        self._report(reason, EXIT_UNTRUSTED)

    def _report(self, reason: str, exit_code: int) -> None:
        if self._on_fatal is not None:
            self._on_fatal(reason, exit_code)

    def _on_role_change(self) -> None:
        if self._engine is not None:
            leader = self._engine.is_leader()
            metrics.RAFT_ROLE.set(1 if leader else 0)
            if leader and self._loop is not None:
                # a new leader ticks at once: commands it commits before its first tick would stamp a
                # clock that stood still since the old leader's last one
                self._loop.call_soon_threadsafe(self._tick)

    # ---- the apply thread ---------------------------------------------------------------------------

    def _observe_clock(self) -> None:
        # the state as the hooks last left it: the engine applies its journal (and loads its dump) while the
        # factory is still building it, before self._engine is set
        if isinstance(self._machine, PoolState):
            self._clock.observe(self._machine.clock)

    def _on_applied(self, rid: str, command: tuple[Any, ...], result: object, changes: Any) -> None:
        self.applied += 1
        self._observe_clock()
        if isinstance(changes, Changes):
            publish(changes.report)  # the state reports; this member counts and logs
        if changes:
            with self._observer_lock:
                for obs in list(self._observers):
                    try:
                        obs.on_changes(changes)
                    except Exception:
                        log.exception("pool observer %r failed on changes", obs)
        with self._waiting_lock:
            proposal = self._waiting.pop(rid, None)
        if proposal is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._resolve, proposal, result)

    def _on_replaced(self, state: StateMachine) -> None:
        self._machine = state
        self._observe_clock()
        with self._observer_lock:
            for obs in list(self._observers):
                try:
                    obs.on_reset(self)
                except Exception:
                    log.exception("pool observer %r failed on reset", obs)

    # ---- proposals (event loop) ---------------------------------------------------------------------

    def _failure(self) -> str | None:
        """Why this replica's state can no longer be trusted (a full dump that would not load), or None."""
        return self._engine.failure if self._engine is not None else None

    def _check_open(self) -> Engine:
        if failure := self._failure():
            raise ReplicaUnavailable(f"replica failed: {failure}")
        if self._stopped or self._engine is None:
            raise ReplicaUnavailable("replica is not running")
        return self._engine

    def _budget(self) -> int:
        return self._tuning.batch_bytes // 2  # margin for pysyncobj's own framing of the entry

    def _propose(self, command: tuple[Any, ...], futures: list[asyncio.Future[Any]], kind: str,
                 size: int | None = None) -> _Proposal:
        rid = f"{self._nonce}:{next(self._rids)}"
        proposal = _Proposal(rid, command, futures, time.monotonic(), kind=kind)
        size = len(pickle.dumps(command, 2)) if size is None else size
        self.largest_command = max(self.largest_command, size)
        if size >= self._budget():
            # pysyncobj would take its chunked path, which the journal guard does not cover: never
            log.error("raft: refused a %s command of %d bytes (limit %d): it must be split", command[0], size,
                      self._budget())
            self._fail(proposal, PoolError(f"{command[0]} command too large ({size} bytes)"))
            return proposal
        with self._waiting_lock:
            self._waiting[rid] = proposal
        self._send(proposal)
        return proposal

    def _send(self, p: _Proposal) -> None:
        if p.done:
            return
        engine = self._engine
        loop = self._loop
        assert loop is not None
        if engine is None or self._stopped:
            self._fail(p, ReplicaUnavailable("replica is not running"))
            return
        # A checkout has a DNS client waiting: its deadline is short (pool.checkout_timeout), and it is
        # resent sooner so a dropped callback still leaves time for a retry.
        checkout = p.kind == "checkout"
        deadline = self._checkout_timeout if checkout else self._write_deadline
        left = deadline - (time.monotonic() - p.started)
        if left <= 0:
            self._fail(p, ReplicaUnavailable(f"write not committed within {deadline:g}s (no quorum or no leader?)"))
            return
        if p.attempts:
            metrics.RAFT_RETRIES.inc()
        p.attempts += 1
        if p.timer is not None:
            p.timer.cancel()
        retry = min(RETRY_AFTER, deadline / 3) if checkout else RETRY_AFTER
        p.timer = loop.call_later(min(retry, max(0.05, left)), self._send, p)

        def on_result(result: object, err: int) -> None:
            if err != 0 and not p.done:  # retry soon; an apply that still arrives resolves it first
                loop.call_soon_threadsafe(self._retry_soon, p)

        try:
            engine.propose(p.rid, p.command, on_result)
        except Exception as e:  # the engine raising here is a bug, not an outcome: fail loudly
            log.exception("raft: propose failed")
            self._fail(p, ReplicaUnavailable(f"propose failed: {e!r}"))

    def _retry_soon(self, p: _Proposal) -> None:
        if p.done or self._loop is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        p.timer = self._loop.call_later(0.05, self._send, p)

    def _finish(self, p: _Proposal) -> bool:
        if p.done:
            return False
        p.done = True
        if p.timer is not None:
            p.timer.cancel()
        with self._waiting_lock:
            self._waiting.pop(p.rid, None)
        if p.kind == "checkout":
            self._in_flight -= 1
            if self._queue:
                self._schedule_flush()
        metrics.RAFT_COMMIT_SECONDS.observe(time.monotonic() - p.started)
        return True

    def _resolve(self, p: _Proposal, result: object) -> None:
        if not self._finish(p):
            return
        if p.kind == "checkout":
            results = result if isinstance(result, list) else [result] * len(p.futures)
            for fut, r in zip(p.futures, results, strict=True):
                if fut.done():
                    continue
                if isinstance(r, BaseException):
                    fut.set_exception(r)
                else:
                    fut.set_result(r)
            return
        for fut in p.futures:
            if fut.done():
                continue
            if isinstance(result, PoolError):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def _fail(self, p: _Proposal, error: Exception) -> None:
        if not self._finish(p):
            return
        if p.kind == "checkout":
            metrics.POOL_CHECKOUTS.labels("error").inc(len(p.futures))
        for fut in p.futures:
            if not fut.done():
                fut.set_exception(error)

    # ---- checkouts ----------------------------------------------------------------------------------

    async def checkout(self, node: str, domain: str, targets: Targets, ttl: float) -> Address:
        """Raises ReplicaOverloaded at once when ``pool.max_queued_checkouts`` are already waiting, and
        ReplicaUnavailable when not applied within ``pool.checkout_timeout`` (no quorum, no leader):
        the caller answers SERVFAIL instead of leaving its client without an answer."""
        self._check_open()
        assert self._loop is not None
        if len(self._queue) >= self._max_queued:
            self._queue = [q for q in self._queue if not q[1].done()]  # drop the ones that gave up
            if len(self._queue) >= self._max_queued:
                metrics.POOL_CHECKOUTS_REFUSED.labels("queue_full").inc()
                raise ReplicaOverloaded(f"{len(self._queue)} checkouts already waiting "
                                        "(pool.max_queued_checkouts): no quorum, or too busy")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._queue.append(((node, domain, tuple(targets), float(ttl)), fut))
        self._schedule_flush()
        try:  # on timeout the future is cancelled: a flush skips it, an apply that still comes is kept
            address = await asyncio.wait_for(fut, self._checkout_timeout)
        except TimeoutError:
            metrics.POOL_CHECKOUTS_REFUSED.labels("timeout").inc()
            raise ReplicaUnavailable(f"checkout not committed within {self._checkout_timeout:g}s "
                                     "(pool.checkout_timeout): no quorum or no leader") from None
        assert isinstance(address, int)
        return address

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_checkouts)

    def _flush_checkouts(self) -> None:
        self._flush_scheduled = False
        budget = self._budget()
        while self._queue and self._in_flight < MAX_IN_FLIGHT:
            items: list[tuple[str, str, Targets, float]] = []
            futures: list[asyncio.Future[Any]] = []
            size = 64
            while self._queue:
                item, fut = self._queue[0]
                cost = len(item[0]) + len(item[1]) + 6 * len(item[2]) + 24
                if items and size + cost > budget:
                    break
                self._queue.pop(0)
                if fut.done():  # cancelled by its caller
                    continue
                items.append(item)
                futures.append(fut)
                size += cost
            if not items:
                continue
            now = self._clock.now()
            command = ("checkout_batch", tuple(items), now, now - self._reuse_window)
            size = len(pickle.dumps(command, 2))
            while size >= budget and len(items) > 1:
                half = len(items) // 2  # estimate was off (long names): put the second half back
                self._queue[0:0] = list(zip(items[half:], futures[half:], strict=True))
                items, futures = items[:half], futures[:half]
                command = ("checkout_batch", tuple(items), now, now - self._reuse_window)
                size = len(pickle.dumps(command, 2))
            self._in_flight += 1
            self._propose(command, futures, "checkout", size)

    # ---- other writes -------------------------------------------------------------------------------

    async def _write(self, command: tuple[Any, ...], size: int | None = None) -> object:
        self._check_open()
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._propose(command, [fut], "write", size)
        return await fut

    async def set_targets(self, domain: str, targets: Targets, ttl: float) -> None:
        await self._write(("set_targets", domain, tuple(targets), float(ttl), self._clock.now()))

    async def forget(self, nodes: Sequence[str]) -> None:
        for command, size in self._fitting(lambda part: ("forget", part, self._clock.now()), tuple(nodes)):
            await self._write(command, size)

    async def set_excluded(self, addresses: Iterable[Address]) -> None:
        wanted = tuple(sorted(set(addresses)))
        whole = ("set_excluded", wanted, self._clock.now())
        size = len(pickle.dumps(whole, 2))
        if size < self._budget():
            await self._write(whole, size)
            return
        # too many for one command: change the set in pieces, from what this member has applied (the
        # leader, normally; a stale base only costs a later round to correct it)
        with self._state_lock():
            current = set(self._pool().excluded())
        lifted = tuple(sorted(current.difference(wanted)))
        added = tuple(sorted(set(wanted) - current))
        pieces = [*self._fitting(lambda part: ("exclude", (), part, self._clock.now()), lifted),
                  *self._fitting(lambda part: ("exclude", part, (), self._clock.now()), added)]
        for command, size in pieces:
            await self._write(command, size)

    def _fitting(self, make: Callable[[tuple[Any, ...]], tuple[Any, ...]], items: tuple[Any, ...]
                 ) -> list[tuple[tuple[Any, ...], int]]:
        """``make(part)`` commands over consecutive parts of ``items``, each pickled below the batch limit
        (measured, not estimated: halved until it fits), with their sizes."""
        command = make(items)
        size = len(pickle.dumps(command, 2))
        if size < self._budget() or len(items) <= 1:
            return [(command, size)]
        half = len(items) // 2
        return self._fitting(make, items[:half]) + self._fitting(make, items[half:])

    # ---- the pool clock -----------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock.now()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_interval)
            self._caught_up = self._check_caught_up()
            self._tick()

    def caught_up(self) -> bool:
        return self._caught_up

    def _check_caught_up(self) -> bool:
        """Has this member applied (nearly) all the leader last said it committed? A member replaying or
        fetching a backlog applies ticks long after they were committed, so its reading of the pool
        clock is behind by that much; it must not vouch for a mapping's idle time until it is current.
        A cut-off member keeps the last commit index it heard, which it had applied live: still current."""
        engine = self._engine
        if engine is None or self._stopped or self._failure():
            return False
        status = engine.status()
        return status.leader_commit is not None and status.last_applied >= status.leader_commit - CAUGHT_UP_ENTRIES

    def _tick(self) -> None:
        """Propose this member's reading as the pool clock, while it leads (one tick in flight at most)."""
        if self._tick_in_flight or self._stopped or not self.is_leader() or self._failure():
            return
        self._tick_in_flight = True
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()

        def done(f: asyncio.Future[Any]) -> None:
            self._tick_in_flight = False
            f.exception()  # a lost tick is only a later one

        fut.add_done_callback(done)
        self._propose(("tick", self._clock.now()), [fut], "tick")

    async def release(self, pairs: Sequence[tuple[str, str]]) -> None:
        # as forget: each entry pickled below the batch limit whatever the number of pairs
        pairs_t = tuple((node, domain) for node, domain in pairs)
        for command, size in self._fitting(lambda part: ("release_batch", part, self._clock.now()), pairs_t):
            await self._write(command, size)

    # ---- touches ------------------------------------------------------------------------------------

    def touch(self, node: str, address: Address, domain: str, at: float) -> None:
        self._touches.add(node, address, domain, at)

    def _flush_touches(self) -> int:
        if self._engine is None or self._loop is None:
            return 0
        batch = self._touches.take()
        if not batch:
            return 0
        for command, size in self._fitting(lambda part: ("touch_batch", part), tuple(batch)):
            self._propose_touches(command, size)
        metrics.POOL_TOUCHES.inc(len(batch))
        return len(batch)

    def _propose_touches(self, command: tuple[Any, ...], size: int) -> None:
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        fut.add_done_callback(lambda f: f.exception())  # a lost touch batch only delays a last-used mark
        metrics.POOL_TOUCH_BATCHES.inc()
        self._propose(command, [fut], "touch", size)

    async def _touch_loop(self) -> None:
        while True:
            await asyncio.sleep(TOUCH_FLUSH_INTERVAL)
            try:
                self._flush_touches()
                self._publish()
            except Exception:
                self._errors.exception("touch", "raft: touch flush failed")

    def _publish(self) -> None:
        engine = self._engine
        if engine is None:
            return
        metrics.RAFT_ROLE.set(1 if engine.is_leader() else 0)
        status = engine.status()
        metrics.RAFT_TERM.set(status.term)
        if status.leader_commit is not None:
            metrics.RAFT_COMMIT_LAG.set(max(0, status.leader_commit - status.last_applied))
        state = self._state()
        with self._state_lock():
            stats = state.stats() if isinstance(state, PoolState) else None
        if stats is not None:
            publish_stats(stats)

    # ---- reads --------------------------------------------------------------------------------------

    def _state(self) -> StateMachine:
        if self._engine is None:
            raise ReplicaUnavailable("replica is not started")
        return self._engine.state

    def _state_lock(self) -> threading.Lock:
        if self._engine is None:
            raise ReplicaUnavailable("replica is not started")
        return self._engine.state_lock

    def _pool(self) -> PoolState:
        state = self._state()
        assert isinstance(state, PoolState)
        return state

    def lookup(self, node: str, domain: str) -> tuple[Address, float] | None:
        with self._state_lock():
            return self._pool().lookup(node, domain)

    def domain_for(self, node: str, address: Address) -> str | None:
        with self._state_lock():
            return self._pool().domain_for(node, address)

    def targets(self, domain: str) -> Targets:
        with self._state_lock():
            return self._pool().targets(domain)

    def target_info(self, domain: str) -> tuple[Targets, float, float] | None:
        with self._state_lock():
            return self._pool().target_info(domain)

    def mappings(self) -> Iterator[MappingView]:
        with self._state_lock():
            copy = list(self._pool().mappings())
        return iter(copy)

    def node_mappings(self, node: str) -> list[MappingView]:
        with self._state_lock():
            return self._pool().node_mappings(node)

    def stats(self) -> dict[str, int | float]:
        with self._state_lock():
            return self._pool().stats()

    def digest(self) -> str:
        with self._state_lock():
            return self._pool().digest()

    # ---- membership ---------------------------------------------------------------------------------

    async def add_member(self, address: str) -> None:
        """Add a member through Raft (dynamic membership only); start it with the current members as
        partners. One change at a time: pysyncobj refuses a second until the first is applied."""
        await self._change_members("add", address)

    async def remove_member(self, address: str) -> None:
        """Remove a member through Raft (dynamic membership only). Not this member itself."""
        if address == self.self_address:
            raise ValueError("a member cannot remove itself: ask another member")
        await self._change_members("remove", address)

    async def _change_members(self, action: str, address: str) -> None:
        engine = self._check_open()
        if not self._dynamic:
            raise PoolError("static membership: the members are cluster.peers; change them on every member")
        if action == "remove" and address not in self.members():
            raise PoolError(f"{address} is not a member (members: {', '.join(self.members())})")
        if action == "remove" and address == engine.leader():
            # pysyncobj's leader cannot drop itself (its followers would, and the membership would split)
            raise PoolError(f"{address} is the leader: stop it (SIGTERM hands leadership to another member), "
                            "then remove it through the new leader")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[bool, str]] = loop.create_future()

        def done(ok: bool, why: str) -> None:
            loop.call_soon_threadsafe(lambda: None if fut.done() else fut.set_result((ok, why)))

        engine.change_members(action, address, done)
        try:
            ok, why = await asyncio.wait_for(fut, self._write_deadline)
        except TimeoutError:
            raise ReplicaUnavailable(f"{action} {address}: not committed within {self._write_deadline:g}s") from None
        if not ok:
            raise ReplicaUnavailable(f"{action} {address}: refused by Raft ({why})")
        log.warning("raft: member %s %s", address, "added" if action == "add" else "removed")

    @property
    def membership_state(self) -> str:
        """What this member tells peers about itself: ``joining``, ``member`` or ``removed``
        (see :mod:`appconnector.pool.membership`; a leader adds only ``joining`` peers)."""
        return self._membership_state

    def set_membership_state(self, state: str) -> None:
        self._membership_state = state
        if self._engine is not None:
            self._engine.set_membership_state(state)

    @property
    def dynamic_membership(self) -> bool:
        return self._dynamic

    def members(self) -> list[str]:
        """This member and the partners it currently knows (the stored membership when dynamic)."""
        engine = self._engine
        if engine is None:
            return sorted([self.self_address, *self.partners])
        return list(engine.status().members)

    # ---- observers, status ----------------------------------------------------------------------------

    def add_observer(self, observer: PoolObserver) -> None:
        with self._observer_lock:  # no apply between the reset and the first change it sees
            self._observers.append(observer)
            reader: PoolReader = self
            observer.on_reset(reader)

    def is_leader(self) -> bool:
        return self._engine is not None and self._engine.is_leader()

    async def tick_alive(self, timeout: float) -> bool:
        """True when a call through the Raft tick thread came back to the event loop within ``timeout``
        (the systemd watchdog's proof of life). One probe at a time: a hung tick does not pile them up."""
        engine = self._engine
        if engine is None or self._stopped:
            return False
        if self._tick_probe is None or self._tick_probe.done():
            loop = asyncio.get_running_loop()
            probe: asyncio.Future[None] = loop.create_future()
            self._tick_probe = probe

            def answer() -> None:  # on the tick thread; the loop may be closed by now
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(lambda: None if probe.done() else probe.set_result(None))
            engine.call_on_tick(answer)
        try:
            await asyncio.wait_for(asyncio.shield(self._tick_probe), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, object]:
        engine = self._engine
        if engine is None:
            return {"role": "stopped"}
        st = engine.status()
        return {
            "role": st.role,
            "term": st.term,
            "leader": st.leader,
            "commit_index": st.commit_index,
            "applied_index": st.last_applied,
            "leader_commit_index": st.leader_commit,
            "log_length": st.log_length,
            "self": self.self_address,
            "members": list(st.members),
            "membership": self._membership_state if self._dynamic else "static",
            "connected": list(st.connected),
            # as the leader sees them (empty on followers); seconds since each peer was last heard from
            "match_index": dict(st.match_index),
            "last_heard": {p: round(time.monotonic() - t, 1) for p, t in engine.last_heard().items()},
            "queued_touches": len(self._touches),
            "pool_clock": self._clock.now(),
            "caught_up": self._caught_up,
            "largest_command_bytes": self.largest_command,
            "in_flight": self._in_flight,
            "queued_checkouts": len(self._queue),
            **engine.engine_details(),  # "engine" (its name) and its own figures, e.g. the journal guard's
            "failure": self._failure(),
        }


def _conforms_access(replica: RaftReplica) -> PoolAccess:
    return replica  # mypy checks here that RaftReplica implements the PoolAccess protocol


def _conforms_control(replica: RaftReplica) -> ReplicaControl:
    return replica  # ... and the ReplicaControl protocol


__all__ = ["BindError", "RaftReplica", "RaftTuning", "StateError", "UntrustedState"]
