"""Queued last-used marks: the one ``Replica.touch`` both replicas share (same checks, same coalescing).

A mark is ``(node, address, domain, at)`` with ``at`` in pool time. Marks are coalesced to the newest
time per mapping until the replica flushes them as ``touch_batch`` commands. A mark that is not well
formed is dropped here, counted and logged, and never raises: ``touch`` is called from DNS's and NAT's
hot paths, where an exception would cost an answer.
"""

from __future__ import annotations

import logging
import math
import threading

from appconnector import metrics
from appconnector.pool.api import Address
from appconnector.pool.state import Touch

log = logging.getLogger(__name__)


class TouchQueue:
    """Thread-safe: ``add`` from any thread, ``take`` from the flusher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._marks: dict[tuple[str, Address, str], float] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._marks)

    def add(self, node: str, address: Address, domain: str, at: float) -> None:
        if (type(node) is not str or type(domain) is not str or type(address) is not int
                or not 0 <= address <= 0xFFFFFFFF or isinstance(at, bool) or not isinstance(at, int | float)
                or not math.isfinite(at) or at < 0):
            self.dropped += 1
            metrics.POOL_INVALID_COMMANDS.inc()
            if self.dropped & (self.dropped - 1) == 0:  # the 1st, 2nd, 4th, ... only
                log.warning("pool: dropped a malformed touch %r (dropped so far: %d)",
                            (node, address, domain, at), self.dropped)
            return
        key = (node, address, domain)
        at = float(at)
        with self._lock:
            if at > self._marks.get(key, -1.0):
                self._marks[key] = at

    def take(self) -> list[Touch]:
        """Every queued mark (the queue is then empty)."""
        with self._lock:
            marks, self._marks = self._marks, {}
        return [(node, address, domain, at) for (node, address, domain), at in marks.items()]
