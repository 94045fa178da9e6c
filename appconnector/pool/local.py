"""``LocalPool``: the :mod:`~appconnector.pool.api` contracts (PoolAccess, ReplicaControl) in one process, without Raft.

The same :class:`~appconnector.pool.state.PoolState` and command tuples the Raft replica uses, applied
directly under a lock. DNS and NAT unit tests run against it, and it is the single-machine pool. It is
the proposer and the only member, so it is also the leader that ticks the pool clock: before every
timed command it ticks to its reading (:class:`~appconnector.pool.clock.PoolClock` over ``clock``, a
monotonic source by default), so its stamps are exact and it needs no extra tick in the reuse window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from appconnector import metrics
from appconnector.pool.api import (
    Address,
    Changes,
    MappingView,
    MembershipUnsupported,
    PoolAccess,
    PoolError,
    PoolObserver,
    PoolReader,
    ReplicaControl,
    ReplicaUnavailable,
    Targets,
)
from appconnector.pool.clock import PoolClock
from appconnector.pool.report import publish, publish_stats
from appconnector.pool.state import PoolState
from appconnector.pool.touches import TouchQueue

log = logging.getLogger("appconnector.pool.local")

DEFAULT_REUSE_AFTER = 48 * 3600.0
TOUCH_FLUSH_INTERVAL = 1.0
"""Queued touches are flushed as one ``touch_batch`` at least this often (docs/design.md §3)."""


class LocalPool:
    """One-process pool. Reads are safe from any thread; writes are applied in call order."""

    def __init__(self, prefixes: Sequence[str], *, reuse_after: float = DEFAULT_REUSE_AFTER,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] | None = None,
                 touch_flush_interval: float = TOUCH_FLUSH_INTERVAL,
                 state: PoolState | None = None) -> None:
        if reuse_after <= 0:
            raise ValueError(f"pool.reuse_after must be above zero, not {reuse_after!r}")
        self._state = state if state is not None else PoolState(prefixes)
        if self._state.load_report is not None:
            publish(self._state.load_report)
        self._reuse_after = reuse_after
        # tests pass one fake clock for both: pool time then equals it (for a fresh pool)
        self._clock = PoolClock(clock, wall if wall is not None else (time.time if clock is time.monotonic else clock))
        self._clock.observe(self._state.clock)
        self._flush_interval = touch_flush_interval
        self._state_lock = threading.Lock()  # guards PoolState: every read and every apply
        self._write_lock = threading.RLock()  # orders apply + observer calls, so observers see apply order
        self._observers: list[PoolObserver] = []
        self._touches = TouchQueue()
        self._applied = 0
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False

    # ---- writes -------------------------------------------------------------------------------------

    def apply(self, command: tuple[Any, ...]) -> object:
        """Apply one command tuple (as the Raft replica would on commit) and notify observers."""
        with self._write_lock:
            with self._state_lock:
                result, changes = self._state.apply(command)
                self._applied += 1
                self._clock.observe(self._state.clock)
            publish(changes.report)  # the state reports; the pool counts and logs
            if changes:
                self._notify(changes)
        return result

    def _notify(self, changes: Changes) -> None:
        for observer in list(self._observers):
            try:
                observer.on_changes(changes)
            except Exception:
                log.exception("pool observer %r failed on changes", observer)

    def now(self) -> float:
        return self._clock.now()

    def caught_up(self) -> bool:
        return True  # the only member: nothing to catch up with

    def tick(self) -> float:
        """Tick the pool clock to this pool's reading; returns it."""
        now = self._clock.now()
        self.apply(("tick", now))
        return now

    async def checkout(self, node: str, domain: str, targets: Targets, ttl: float) -> Address:
        self._check_open()
        now = self.tick()
        results = self.apply(("checkout_batch", ((node, domain, tuple(targets), ttl),), now,
                              now - self._reuse_after))
        if isinstance(results, PoolError):
            raise results
        assert isinstance(results, list)
        result = results[0]
        if isinstance(result, PoolError):
            raise result
        assert isinstance(result, int)
        return result

    def touch(self, node: str, address: Address, domain: str, at: float) -> None:
        self._touches.add(node, address, domain, at)

    def flush_touches(self) -> int:
        """Apply the queued touches now as one ``touch_batch``; returns how many were sent."""
        batch = tuple(self._touches.take())
        if not batch:
            return 0
        self.tick()
        self.apply(("touch_batch", batch))
        metrics.POOL_TOUCHES.inc(len(batch))
        metrics.POOL_TOUCH_BATCHES.inc()
        return len(batch)

    async def set_targets(self, domain: str, targets: Targets, ttl: float) -> None:
        self._check_open()
        self._raise_invalid(self.apply(("set_targets", domain, tuple(targets), ttl, self.tick())))

    async def forget(self, nodes: Sequence[str]) -> None:
        self._check_open()
        self._raise_invalid(self.apply(("forget", tuple(nodes), self.tick())))

    async def set_excluded(self, addresses: Iterable[Address]) -> None:
        self._check_open()
        self._raise_invalid(self.apply(("set_excluded", tuple(addresses), self.tick())))

    async def release(self, pairs: Sequence[tuple[str, str]]) -> None:
        self._check_open()
        self._raise_invalid(self.apply(("release_batch", tuple(pairs), self.tick())))

    @staticmethod
    def _raise_invalid(result: object) -> None:
        if isinstance(result, PoolError):
            raise result

    def _check_open(self) -> None:
        if self._stopped:
            raise ReplicaUnavailable("pool is stopped")

    # ---- reads --------------------------------------------------------------------------------------

    def lookup(self, node: str, domain: str) -> tuple[Address, float] | None:
        with self._state_lock:
            return self._state.lookup(node, domain)

    def domain_for(self, node: str, address: Address) -> str | None:
        with self._state_lock:
            return self._state.domain_for(node, address)

    def targets(self, domain: str) -> Targets:
        with self._state_lock:
            return self._state.targets(domain)

    def target_info(self, domain: str) -> tuple[Targets, float, float] | None:
        with self._state_lock:
            return self._state.target_info(domain)

    def mappings(self) -> Iterator[MappingView]:
        with self._state_lock:
            copy = list(self._state.mappings())
        return iter(copy)

    def node_mappings(self, node: str) -> list[MappingView]:
        with self._state_lock:
            return self._state.node_mappings(node)

    def stats(self) -> dict[str, int | float]:
        with self._state_lock:
            return self._state.stats()

    def digest(self) -> str:
        with self._state_lock:
            return self._state.digest()

    def snapshot(self) -> bytes:
        with self._state_lock:
            return self._state.to_bytes()

    # ---- lifecycle ----------------------------------------------------------------------------------

    def add_observer(self, observer: PoolObserver) -> None:
        with self._write_lock:  # no apply between the reset and the first change it sees
            self._observers.append(observer)
            reader: PoolReader = self
            observer.on_reset(reader)

    def is_leader(self) -> bool:
        return True

    def status(self) -> dict[str, object]:
        return {"engine": "local", "role": "leader", "term": 0, "leader": "local",
                "commit_index": self._applied, "applied_index": self._applied, "members": ["local"],
                "queued_touches": len(self._touches)}

    async def remove_member(self, address: str) -> None:
        raise MembershipUnsupported("this replica has no cluster membership to change (one process, no Raft)")

    async def start(self) -> None:
        self._stopped = False
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="pool-touch-flush")

    async def stop(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        self.flush_touches()
        self._stopped = True

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                self.flush_touches()
                with self._state_lock:
                    stats = self._state.stats()
                publish_stats(stats)
            except Exception:  # keep flushing: one bad batch must not stop last-used marks for good
                log.exception("pool: touch flush failed")


def _conforms_access(pool: LocalPool) -> PoolAccess:
    return pool  # mypy checks here that LocalPool implements the PoolAccess protocol


def _conforms_control(pool: LocalPool) -> ReplicaControl:
    return pool  # ... and the ReplicaControl protocol
