"""The leader keeps each active domain's real addresses fresh, by TTL, through the replicated state.

Replicas never steer by their own lookups (docs/design.md §3): the leader re-resolves every domain that has
mappings when its TTL runs out and proposes ``set_targets`` only when the sorted address set changed,
so a steady domain costs no Raft entry. A failed or empty refresh keeps the last addresses and retries
after ``min_ttl``. On becoming leader the first refreshes are spread over ``min_ttl`` by a hash of the
domain, so a leader change does not fire every lookup at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from appconnector.periodic import Periodic
from appconnector.pool.api import Address, PoolAccess, PoolError

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[tuple[Sequence[Address], float]]]
"""``async (domain) -> (real IPv4 addresses as ints, ttl seconds)``: the DNS upstream resolver."""


def _spread(domain: str, span: float) -> float:
    h = int.from_bytes(hashlib.blake2b(domain.encode(), digest_size=4).digest(), "big")
    return span * h / 2**32


class TargetRefresher:
    """Runs on every member; acts only while ``replica.is_leader()``."""

    def __init__(self, replica: PoolAccess, resolver: Resolver, domains: Callable[[], Iterable[str]], *,
                 min_ttl: float = 30.0, max_ttl: float = 3600.0, concurrency: int = 8,
                 tick: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.replica = replica
        self.resolver = resolver
        self.domains = domains
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.tick = tick
        self.clock = clock
        self._due: dict[str, float] = {}
        self._sem = asyncio.Semaphore(concurrency)
        self.proposals = 0  # set_targets commands proposed (for status and tests)
        self._loop = Periodic("nat target refresh", tick, self.round, retried=(PoolError,))

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def round(self) -> None:
        """Refresh every domain that is due (leader only)."""
        if not self.replica.is_leader():
            self._due.clear()
            return
        now = self.clock()
        active = set(self.domains())
        for gone in set(self._due) - active:
            del self._due[gone]
        for domain in active - set(self._due):
            self._due[domain] = now + _spread(domain, self.min_ttl)
        due = [d for d, t in self._due.items() if t <= now]
        if due:
            await asyncio.gather(*(self.refresh(d) for d in due))

    async def refresh(self, domain: str) -> None:
        async with self._sem:
            now = self.clock()
            try:
                found, ttl = await self.resolver(domain)
            except Exception as e:
                log.info("nat: refresh of %s failed (%s); keeping its last addresses", domain, e)
                self._due[domain] = now + self.min_ttl
                return
            targets = tuple(sorted(set(found)))
            self._due[domain] = now + min(max(ttl, self.min_ttl), self.max_ttl)
            if not targets or targets == self.replica.targets(domain):
                return
            try:
                await self.replica.set_targets(domain, targets, ttl)
                self.proposals += 1
            except PoolError as e:
                log.info("nat: set_targets for %s not committed (%s); retrying", domain, e)
                self._due[domain] = now + self.min_ttl
