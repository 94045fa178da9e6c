"""A member's reading of the replicated pool clock.

The pool clock lives in the replicated state and only ``tick`` commands move it (see
:mod:`appconnector.pool.state`). Each member reads it as the newest value it has applied plus the
*monotonic* time elapsed on this host since it applied that value; the leader proposes exactly that
reading as the next tick. So the clock advances by time one member measured with a clock no setting
of the wall clock moves, and a new leader continues from the replicated value. No member's wall clock,
however far off, ages a mapping; the wall clock is read once at most, for a fresh pool's first value.

Why this is safe for a follower's reads: a tick's value is an older replicated value plus time that
passed since it was committed, so the clock never runs ahead of real time between two commits. A
member's reading is therefore behind the cluster's clock by at most how late it applied its newest
value (its apply lag), and DNS's local-answer limit leaves room for that (``dns.service.local_answer_age``).
A whole-cluster outage is not counted (nobody measured it): addresses then become reusable later, never
sooner.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class PoolClock:
    """``observe`` every applied clock value (any thread); ``now()`` is this member's pool time."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._base: float | None = None  # pool time at self._at (monotonic), None before any value
        self._at = 0.0

    def observe(self, value: float) -> None:
        """The replicated clock is ``value`` (just applied). A reading never goes back: the newest of
        every value seen plus the time since it was seen."""
        if not value > 0.0:
            return  # a fresh pool has no clock yet
        at = self._monotonic()
        with self._lock:
            if self._base is not None:
                value = max(value, self._base + (at - self._at))
            self._base, self._at = value, at

    def now(self) -> float:
        """Pool time now, as this member reads it. Before any value was seen (a fresh pool), the wall
        clock: the first time a fresh pool sees becomes its clock's start."""
        with self._lock:
            base, at = self._base, self._at
        if base is None:
            return self._wall()
        return base + (self._monotonic() - at)
