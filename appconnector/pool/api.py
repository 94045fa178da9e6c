"""Contracts of the pool: what DNS, NAT and the app may rely on, whatever engine sits behind it.

Addresses are IPv4 addresses as ``int`` (``int(IPv4Address)``) everywhere inside the product; they are
turned into text or bytes only at the edges (DNS wire, nftables JSON, logs). Nodes are strings: the
tailscale ``Node.StableID`` in tailscale mode, the client IP text in standalone mode. Domains are
normalised by :func:`appconnector.pool.names.normalise_domain` before they reach the pool. Times are
pool time (``float`` seconds): the replicated pool clock, read on a member by ``PoolAccess.now()`` (see
:mod:`appconnector.pool.clock`); it starts near unix time but no member's wall clock moves it. Every
time a caller hands the pool (``touch``'s ``at``) and every last-used it reads is pool time. The state
machine never reads a clock.

The contract is two protocols: :class:`PoolAccess` (what DNS, NAT and the leader's duties use) and
:class:`ReplicaControl` (what operations use: start, stop, status, membership). Two implementations of
both exist: ``pool.local.LocalPool`` (one process, no Raft: unit
tests of DNS and NAT, and a single-machine mode) and ``pool.replica.RaftReplica`` (pysyncobj).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

Address = int
"""An IPv4 address as an integer."""

Targets = tuple[Address, ...]
"""The real addresses of a domain, as resolved upstream, sorted ascending: IPv4 integers, then IPv6 ones
(above 2**32; ``addresses.V4_MAX``)."""


def touch_refresh(reuse_after: float) -> float:
    """How old a mapping's stored last-used may get before use (a DNS hit, traffic seen by NAT) sends a
    touch: min(5 min, reuse_after / 8) (docs/design.md §3; upstream natc uses a fixed 5 min). One rule for
    every toucher: DNS's limit on answering from local state relies on it."""
    return min(300.0, reuse_after / 8)


def clock_tick(reuse_after: float) -> float:
    """How often the leader ticks the pool clock, and so how far a last-used stamp can lag the use:
    a tenth of the touch refresh interval, at most 1 s and at least 50 ms (reached at the smallest
    accepted ``pool.reuse_after``, ``config.MIN_REUSE_AFTER``: a smaller one is refused, since the
    tick would then no longer be well below the refresh interval)."""
    return min(1.0, max(0.05, touch_refresh(reuse_after) / 10))


def reuse_window(reuse_after: float) -> float:
    """The reuse window a proposer asks for: ``reuse_after`` plus one tick, since a stamp of the pool
    clock may be up to one tick older than the use it records. Never less than ``reuse_after``."""
    return reuse_after + clock_tick(reuse_after)


class PoolError(Exception):
    """Base of errors a pool operation reports to its caller (on any replica, intact)."""


class PoolExhausted(PoolError):
    """No never-used address and no address idle past the reuse deadline for this node."""

    def __init__(self, node: str, domain: str) -> None:
        self.node = node
        self.domain = domain
        super().__init__(f"pool exhausted for node {node!r} (domain {domain!r})")


class ReplicaUnavailable(PoolError):
    """The write could not be committed in time (no leader, partition, shutting down). Retry later."""


class ReplicaOverloaded(ReplicaUnavailable):
    """Too many checkouts are already waiting (``pool.max_queued_checkouts``): refused at once."""


@dataclass(frozen=True, slots=True)
class MappingView:
    """One (node, domain) ↔ address mapping as seen in local state."""

    node: str
    domain: str
    address: Address
    last_used: float


CHECKOUT_RESULTS = ("hit", "new", "reused", "exhausted", "error")
"""What a checkout request can come to, in the order :attr:`Report.checkouts` counts them (the ``result``
label of ``appconnector_pool_checkouts``)."""

LogLine = tuple[str, tuple[object, ...]]
"""A log message template and its arguments (kept apart: the status page groups warnings by template)."""


@dataclass(slots=True)
class Report:
    """What applying one command (or loading a snapshot) did that operators see in metrics and logs.

    The state machine runs identically on every member and neither counts nor logs (docs/design.md §3):
    it fills this in, and the replica that applied the command publishes it
    (:func:`appconnector.pool.report.publish`)."""

    checkouts: list[int] = field(default_factory=lambda: [0] * len(CHECKOUT_RESULTS))  # by CHECKOUT_RESULTS
    invalid: int = 0  # malformed commands, requests and entries ignored
    clock_skew: int = 0  # command times too far ahead of the pool clock (state.SKEW_LIMIT)
    warnings: list[LogLine] = field(default_factory=list)
    infos: list[LogLine] = field(default_factory=list)


@dataclass(slots=True)
class Changes:
    """What one applied command changed; handed to observers on the apply thread.

    ``added`` and ``removed`` are (node, address, domain). An address reassigned from one domain to
    another appears in ``removed`` (old domain) and in ``added`` (new). ``targets`` maps a domain to
    its new real addresses. Touches (last-used updates) are not reported: they change nothing the
    dataplane needs. ``report`` is for the replica (metrics, log), not for observers, and does not
    count as a change.
    """

    added: list[tuple[str, Address, str]] = field(default_factory=list)
    removed: list[tuple[str, Address, str]] = field(default_factory=list)
    targets: dict[str, Targets] = field(default_factory=dict)
    report: Report = field(default_factory=Report)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.targets)


class PoolReader(Protocol):
    """Local, lock-protected reads of the replicated state. Never blocks on Raft; safe from any thread."""

    def lookup(self, node: str, domain: str) -> tuple[Address, float] | None:
        """The node's address for ``domain`` and its last-used time, or None if not mapped."""

    def domain_for(self, node: str, address: Address) -> str | None:
        """The domain the node's ``address`` currently means, or None."""

    def targets(self, domain: str) -> Targets:
        """The replicated real addresses of ``domain`` (empty if never resolved)."""

    def mappings(self) -> Iterator[MappingView]:
        """Every mapping, in no particular order. Takes a consistent copy first (do not hold it long)."""


class PoolObserver(Protocol):
    """Gets every change as it is applied, on every replica (the NAT mirror is one).

    Called on the replica's apply thread with the state lock released; must not block for long
    (one nftables transaction is fine) and must not propose commands itself.
    """

    def on_changes(self, changes: Changes) -> None:
        """``changes`` were applied to local state (never empty)."""

    def on_reset(self, reader: PoolReader) -> None:
        """State was replaced wholesale (start-up, snapshot install): rebuild from ``reader``."""


class MembershipUnsupported(PoolError):
    """This replica has no cluster membership to change (``LocalPool``: one process, no Raft)."""


class PoolAccess(PoolReader, Protocol):
    """The replicated pool as DNS, NAT and the leader's duties use it (asyncio side): local reads,
    checkouts, last-used marks, the few pool writes, and change observers. Nothing here starts, stops
    or reports on the replica: that is :class:`ReplicaControl`.

    Writes are proposed through Raft (or applied directly by LocalPool) and resolve once applied
    locally; they may be retried safely: every command is idempotent. Errors raised: PoolExhausted,
    ReplicaUnavailable.
    """

    async def checkout(self, node: str, domain: str, targets: Targets, ttl: float) -> Address:
        """The node's address for ``domain``, allocating one if needed; ``targets`` (with their TTL,
        seconds) are recorded for the domain when it has none yet. Concurrent calls are gathered into
        one ``checkout_batch`` command. The mapping is applied (and observers called) before this
        returns."""

    def touch(self, node: str, address: Address, domain: str, at: float) -> None:
        """Queue a last-used mark at pool time ``at`` (from :meth:`now`); queued marks are flushed as
        one ``touch_batch`` at least every second. Never blocks, never raises: a mark whose ``at`` is
        not a finite non-negative number is dropped with a log line and a metric
        (``appconnector_pool_invalid_commands``); a mark for an unknown or reassigned mapping is a no-op."""

    def now(self) -> float:
        """Pool time on this member (:class:`appconnector.pool.clock.PoolClock`): compare last-used
        times with it, and stamp touches with it. Never the wall clock."""

    def caught_up(self) -> bool:
        """False while this member may be behind the cluster (replaying or fetching a backlog after a
        restart, or not yet told the leader's commit index): its state and its reading of the pool clock
        may then both be stale, so nothing may be answered from local state on the strength of an idle
        time (DNS confirms through the pool instead). LocalPool: always True."""

    async def set_targets(self, domain: str, targets: Targets, ttl: float) -> None:
        """Replace the replicated real addresses of ``domain`` (leader's TTL refresh)."""

    async def forget(self, nodes: Sequence[str]) -> None:
        """Drop every mapping of these nodes (they left the tailnet for ``reuse_after``). Any number of
        nodes: split into commands each below the engine's batch limit."""

    async def set_excluded(self, addresses: Iterable[Address]) -> None:
        """Addresses the allocator must skip (held by tailnet nodes themselves). Any number: a set too
        large for one command is changed in pieces (``exclude`` commands), each below the batch limit."""

    def node_mappings(self, node: str) -> list[MappingView]:
        """Every mapping of one node (a copy; no scan of the pool)."""

    async def release(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Drop these (node, domain) mappings (the node lost access to their app); proposed in
        ``release_batch`` commands each below the Raft batch size."""

    def add_observer(self, observer: PoolObserver) -> None:
        """Register a mirror; it gets ``on_reset`` at once with the current state."""

    def is_leader(self) -> bool:
        """True when this member proposes directly (LocalPool: always): leader-only duties (target
        refresh, access sweeps, forget/exclude) act only while it holds."""


class ReplicaControl(Protocol):
    """The replica as operations use it: its lifecycle, its role and status, its membership. The app
    starts and stops it; the status and admin listeners report on it and change its membership."""

    async def start(self) -> None:
        """Open state (restore snapshot and journal) and join the cluster. Raises on corrupt state."""

    async def stop(self) -> None:
        """Flush queued touches, hand leadership away if leader, close files."""

    def is_leader(self) -> bool:
        """True when this member leads (LocalPool: always)."""

    def status(self) -> dict[str, object]:
        """Role, term, leader, commit and applied indexes, member list: for /status and /metrics."""

    def stats(self) -> dict[str, int | float]:
        """Pool counts without per-node data (mappings, nodes, pool size, ...): for /status and the page."""

    async def remove_member(self, address: str) -> None:
        """Remove the member at ``address`` (``ip:port``) from the cluster. Raises MembershipUnsupported
        when there is no cluster (LocalPool), PoolError/ValueError/KeyError when it cannot be done."""
