"""``AccessGuard``: keeps granted access current and takes back mappings a node may no longer use.

Every ``tailnet.access_recheck`` (and soon after a netmap change, at most once a second) it asks
whois again for the cached sources (``NodeIdentity.refresh``). For each node whose grants changed,
the DNS fast path is cleared (its next query goes through the access check) and this member releases,
through Raft (``release_batch``), the node's mappings of apps it may no longer use. The leader also
sweeps the whole pool when it becomes leader (which caches every node that holds mappings, so later
changes of those nodes are seen by its refresh) and every ``FULL_SWEEP_EVERY`` rounds as a safety
net. NAT treats the removals like reassignments: steer elements go and the conntrack entries of those
(node IP, pool address) pairs are deleted. A revoked node's flows so stop within about one recheck
interval plus a commit (docs/design.md §4, per-app access).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

from appconnector.dns.access import AppAccess
from appconnector.metrics import ACCESS_REVOKED
from appconnector.pool.api import PoolAccess, PoolError
from appconnector.ratelimit import RateLimitedLog
from appconnector.tailnet.api import NodeDirectory, NodeIdentity, NodeInfo, TailnetUnavailable

log = logging.getLogger(__name__)

FULL_SWEEP_EVERY = 30  # rounds between the leader's sweeps of the whole pool (5 min at the default 10 s)
MIN_GAP = 1.0  # seconds between rounds however often the netmap changes (each round asks whois for all)


class AccessGuard:
    """See the module docstring. A node is asked about at its own address when the identity says the
    node is the source IP (standalone mode); else the directory says a node's IP (without one nothing
    is released: there is no way to ask who a node is)."""

    def __init__(self, access: AppAccess, replica: PoolAccess, identity: NodeIdentity,
                 directory: NodeDirectory | None, interval: float, on_change: Callable[[], None]) -> None:
        self.access = access
        self.replica = replica
        self.identity = identity
        self.directory = directory
        self.interval = interval
        self.on_change = on_change
        self._wake = asyncio.Event()
        self._errors = RateLimitedLog(log)
        self._rounds = 0
        self._was_leader = False
        if directory is not None:
            directory.subscribe(self._wake.set)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # the interval bounds how stale access may get
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.round()
            except Exception:  # the next round tries again; a crash here would end revocation for good
                self._errors.exception("guard", "access: re-check failed")
            await asyncio.sleep(MIN_GAP)  # a rate limit, not a poll: a netmap change waiting sets _wake

    async def round(self) -> int:
        """One re-check; returns how many mappings this member asked to release.

        Nodes whose grants changed here are checked at once by this member, leader or not (the node
        may have been served by it alone; ``release_batch`` is idempotent, so several members asking
        is harmless). The leader also sweeps the whole pool when it becomes leader and every
        ``FULL_SWEEP_EVERY`` rounds, for nodes no member has cached (e.g. after restarts)."""
        self._rounds += 1
        changed = await self.identity.refresh()
        if changed:
            self.on_change()
        leader = self.replica.is_leader()
        sweep = leader and (not self._was_leader or self._rounds % FULL_SWEEP_EVERY == 0)
        self._was_leader = leader
        if sweep:
            by_node = await asyncio.to_thread(self._by_node)
        elif changed:
            by_node = {node: [m.domain for m in self.replica.node_mappings(node)] for node in changed}
        else:
            return 0
        pairs = await self.revoked(by_node)
        if not pairs:
            return 0
        try:
            await self.replica.release(pairs)
        except PoolError as e:
            self._errors.warning("release", "access: could not release %d mappings: %s", len(pairs), e)
            return 0
        ACCESS_REVOKED.inc(len(pairs))
        log.info("access: released %d mappings of nodes that lost access to their app", len(pairs))
        return len(pairs)

    def _by_node(self) -> dict[str, list[str]]:
        by_node: dict[str, list[str]] = defaultdict(list)
        for m in self.replica.mappings():
            by_node[m.node].append(m.domain)
        return by_node

    async def revoked(self, by_node: dict[str, list[str]]) -> list[tuple[str, str]]:
        """(node, domain) mappings of ``by_node`` whose node may not use the domain's app now."""
        nodes = self.directory.nodes() if self.directory is not None else {}
        pairs: list[tuple[str, str]] = []
        for node, domains in by_node.items():
            if not domains:
                continue
            found = await self._whois(node, nodes)
            if found is None:
                continue  # not a node now (or whois failed): the leader forgets departed nodes itself
            info, ip = found
            allowed = self.access.allowed_apps(info, ip)
            pairs.extend((node, d) for d in domains if self.access.refused_app(d, allowed) is not None)
        return pairs

    async def _whois(self, node: str, nodes: dict[str, NodeInfo]) -> tuple[NodeInfo, str] | None:
        if self.identity.node_is_source_ip:
            ip: str | None = node
        else:
            ip = next(iter(nodes[node].ipv4), None) if node in nodes else None
        if ip is None:
            return None
        try:
            info = self.identity.cached(ip) or await self.identity.whois(ip)
        except TailnetUnavailable as e:
            self._errors.warning("whois", "access: cannot ask tailscaled who %s is: %s", ip, e)
            return None
        if info is None or info.node != node:
            return None
        return info, ip
