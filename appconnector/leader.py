"""Duties only the Raft leader performs, driven by the tailnet's node list (docs/design.md §3).

* ``forget``: a node that has mappings but has been absent from the netmap for ``reuse_after``
  continuously loses them (nodes vanish briefly on ACL edits and key expiry, so absence is timed).
  Absence is timed by this leader's own observation: a new leader starts the clock again, which only
  ever delays a forget, never hastens it.
* ``set_excluded``: addresses that tailnet nodes hold inside the pool are skipped by the allocator
  (the default pool sits in Tailscale's CGNAT range); proposed when the set changes (and once per term),
  with a warning. Standalone mode has no directory: nothing to exclude or forget.

The pool's clock is not kept here: the replica ticks it while it leads (``pool/clock.py``), so the
60 s ``set_excluded`` heartbeat that used to drag a high-water mark along is gone. Absence is timed on
this process's monotonic clock, so a wall clock set forward cannot forget nodes early either.

Every member runs the loop; it acts only while ``replica.is_leader()``. The pure decisions are
``AbsenceTracker`` and ``excluded_addresses`` tested without a cluster.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from appconnector.config import Config, pool_networks
from appconnector.periodic import Periodic
from appconnector.pool.api import Address, PoolAccess, PoolError
from appconnector.tailnet.api import NodeDirectory, NodeInfo

log = logging.getLogger(__name__)


def excluded_addresses(nodes: Iterable[NodeInfo], pool: list[ipaddress.IPv4Network]) -> frozenset[Address]:
    """The tailnet IPv4 addresses of ``nodes`` that fall inside the pool."""
    out = set()
    for node in nodes:
        for ip in node.ipv4:
            addr = ipaddress.IPv4Address(ip)
            if any(addr in net for net in pool):
                out.add(int(addr))
    return frozenset(out)


class AbsenceTracker:
    """Times each node's continuous absence from the netmap (pure: the caller passes ``now``)."""

    def __init__(self, reuse_after: float) -> None:
        self.reuse_after = reuse_after
        self.absent_since: dict[str, float] = {}

    def observe(self, with_mappings: Iterable[str], present: Container[str], now: float) -> list[str]:
        """Record one look at the netmap; return the nodes (sorted) absent for ``reuse_after`` without a
        break, which are then no longer tracked (the caller forgets them)."""
        holders = set(with_mappings)
        for node in list(self.absent_since):
            if node not in holders or node in present:
                del self.absent_since[node]
        for node in holders:
            if node not in present:
                self.absent_since.setdefault(node, now)
        gone = sorted(n for n, since in self.absent_since.items() if now - since >= self.reuse_after)
        for node in gone:
            del self.absent_since[node]
        return gone

    def clear(self) -> None:
        self.absent_since.clear()


@dataclass(frozen=True)
class LeaderSettings:
    """What the leader's duties depend on, derived once from the config at start."""

    reuse_after: float                         # pool.reuse_after: absence before a node is forgotten
    pool: tuple[ipaddress.IPv4Network, ...]    # pool.prefixes: node addresses inside are excluded

    @classmethod
    def from_config(cls, cfg: Config) -> LeaderSettings:
        return cls(reuse_after=cfg.pool.reuse_after, pool=tuple(pool_networks(cfg.pool.prefixes)))


class LeaderDuties:
    """Periodic leader-only proposals. ``interval`` seconds between rounds."""

    def __init__(self, settings: LeaderSettings, replica: PoolAccess, directory: NodeDirectory | None, *,
                 interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.replica = replica
        self.directory = directory
        self.interval = interval
        self.clock = clock
        self.reuse_after = settings.reuse_after
        self._pool = list(settings.pool)
        self._absence = AbsenceTracker(settings.reuse_after)
        self._excluded: frozenset[Address] | None = None
        self._loop = Periodic("leader duties", interval, self.round, retried=(PoolError,))

    async def start(self) -> None:  # async like every part's (the app starts them alike)
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def round(self) -> None:
        if not self.replica.is_leader():
            self._absence.clear()
            self._excluded = None  # a new term re-proposes what it sees
            return
        if self.directory is None:
            return  # standalone: no node list, nothing to exclude or forget
        now = self.clock()
        nodes = self.directory.nodes()
        excluded = excluded_addresses(nodes.values(), self._pool)
        if excluded != self._excluded:
            if excluded:
                log.warning("tailnet nodes hold %d address(es) inside the pool; the allocator skips them "
                            "(choose pool.prefixes outside the addresses Tailscale assigns)", len(excluded))
            await self.replica.set_excluded(sorted(excluded))
            self._excluded = excluded
        # copying every mapping takes ~0.5 s per 300k: off the event loop, so DNS keeps answering
        holders = await asyncio.to_thread(lambda: {m.node for m in self.replica.mappings()})
        gone = self._absence.observe(holders, nodes, now)
        if gone:
            log.info("forgetting %d node(s) absent from the tailnet for %.0fs: %s", len(gone), self.reuse_after,
                     ", ".join(gone[:10]))
            try:
                await self.replica.forget(gone)
            except PoolError:
                for node in gone:  # not committed: they are still absent, try again next round
                    self._absence.absent_since[node] = now - self.reuse_after
                raise
