"""Cluster membership changes in tailscale mode (dynamic Raft membership through pysyncobj).

One loop on every member, every ``interval`` seconds:

* **The leader admits** tagged, online peers that are not members and whose Raft port says they are
  ``joining`` (a connector that started with the JOIN decision): ``add_member``, one per round (pysyncobj
  takes one change at a time), logged. A tagged node that runs no connector, or one that was removed with
  ``cluster remove`` (it says ``removed``), is not added: a dead member would only cost quorum.
* **Every member checks itself** against the leader's membership (``pool.membership.judge``): a joining
  member becomes a member when the leader lists it; a member the leader no longer lists (two rounds in
  a row) was removed. Removal is final for this state directory: ``membership.json`` says ``removed``
  (with who and when), so a restart keeps it out; emptying the state directory and starting again joins
  afresh.
* The last membership seen is kept in ``membership.json`` for the partner list of the next restart.

Only ``cluster remove`` removes a member: losing the tag or going offline never does (a node drops out of
the netmap briefly on ACL edits and key expiry; the leader must not shrink the cluster on a blip).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from appconnector import metrics
from appconnector.periodic import Periodic
from appconnector.pool.api import PoolError
from appconnector.pool.membership import (
    JOINING,
    MEMBER,
    REMOVED,
    MembershipRecord,
    fetch_statuses,
    judge,
    leader_status,
)
from appconnector.tailnet.cluster import raft_address
from appconnector.tailnet.directory import TailnetDirectory

log = logging.getLogger(__name__)

OnRemoved = Callable[[str], Awaitable[None] | None]
CONFIRM_REMOVED = 2
"""Rounds in a row a leader must leave this member out before it stops serving: pysyncobj's leader drops
a member when it proposes the removal, so a removal that never commits (the leader fails first) would
otherwise stop a member that is still in the cluster."""


class MembershipReplica(Protocol):
    """What membership needs of the replica (``pool.replica.RaftReplica`` is one): this member's Raft
    address, the members it knows, its role, and the one change it proposes."""

    @property
    def self_address(self) -> str:
        """This member's Raft address ("ip:port")."""

    def members(self) -> list[str]:
        """This member and the partners it currently knows, sorted."""

    def is_leader(self) -> bool: ...

    def status(self) -> dict[str, object]:
        """Its ``"leader"`` is the leader's Raft address when one is known."""

    def set_membership_state(self, state: str) -> None:
        """What this member tells peers about itself (``joining``, ``member``, ``removed``)."""

    async def add_member(self, address: str) -> None:
        """Add a member through Raft; raises ``PoolError`` when the change is refused or not committed."""


async def join_partners(via: tuple[str, ...], secret: str | None) -> list[str]:
    """The members of the cluster that ``via`` (answering members) belong to, as the leader reports
    them; ``via`` itself when no member answers the status question."""
    statuses = await fetch_statuses(via, secret)
    best = leader_status(statuses) or next(iter(statuses.values()), None)
    return list(best.members) if best is not None else sorted(via)


class ClusterMembership:
    """See the module docstring. ``start()`` after the replica started; ``stop()`` before it stops."""

    def __init__(self, replica: MembershipReplica, directory: TailnetDirectory, tag: str, raft_port: int,
                 secret: str | None, record: MembershipRecord, on_removed: OnRemoved, *, state_dir: Path,
                 interval: float = 2.0) -> None:
        self.replica = replica
        self.directory = directory
        self.tag = tag
        self.raft_port = raft_port
        self.secret = secret
        self.record = record
        self.on_removed = on_removed
        self.interval = interval
        self.state_dir = state_dir  # where membership.json is kept
        self._skipped: dict[str, str] = {}  # tagged non-member → why it was not added (logged on change)
        self._loop = Periodic("cluster membership", interval, self.round, retried=(PoolError,))
        self._unlisted = 0  # rounds in a row the leader did not list this member
        replica.set_membership_state(record.state)
        metrics.CLUSTER_REMOVED.set(1 if record.state == REMOVED else 0)

    @property
    def removed_reason(self) -> str | None:
        if self.record.state != REMOVED:
            return None
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.record.removed_at or 0))
        return f"removed from the cluster by {self.record.removed_by or 'the leader'} at {when}"

    def check(self) -> tuple[bool, str]:
        """Readiness: a removed or not yet added member is not ready."""
        if self.record.state == REMOVED:
            return False, f"{self.removed_reason}; not serving (empty the state directory to join again)"
        if self.record.state == JOINING:
            return False, "waiting for the leader to add this member"
        return True, f"member of {len(self.replica.members())}"

    async def start(self) -> None:
        if self.record.state == REMOVED:
            await self._call_removed(f"{self.removed_reason} (recorded in {self.state_dir}/membership.json)")
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def round(self) -> None:
        await self._check_self()
        if self.record.state == MEMBER:
            members = self.replica.members()
            if members != self.record.members:
                self.record.members = members
                self.record.save(self.state_dir)
            if self.replica.is_leader():
                await self._admit()

    # ---- every member ---------------------------------------------------------------------------------

    async def _check_self(self) -> None:
        if self.record.state == REMOVED:
            return
        me = self.replica.self_address
        if self.replica.is_leader():
            verdict = judge(me, self.record.state, None, is_leader=True)
        else:
            leader = self.replica.status().get("leader")
            ask = {leader} if isinstance(leader, str) and leader != me else set(self.replica.members()) - {me}
            verdict = judge(me, self.record.state, leader_status(await fetch_statuses(ask, self.secret)),
                            is_leader=False)
        if verdict is not None and verdict.state == REMOVED:
            self._unlisted += 1
            if self._unlisted < CONFIRM_REMOVED:
                log.info("cluster: the leader %s does not list %s; checking again before stopping", verdict.by, me)
                return
        else:
            self._unlisted = 0
        if verdict is None:
            return
        if verdict.state == MEMBER:
            log.info("cluster: %s is a member now (%s)", me, verdict.reason)
            self.record.state = MEMBER
            self.record.members = self.replica.members()
        elif verdict.state == REMOVED:
            self.record.state = REMOVED
            self.record.removed_by = f"the leader {verdict.by}"
            self.record.removed_at = time.time()
        self.record.save(self.state_dir)
        self.replica.set_membership_state(self.record.state)
        if verdict.state == REMOVED:
            metrics.CLUSTER_REMOVED.set(1)
            await self._call_removed(verdict.reason)

    async def _call_removed(self, reason: str) -> None:
        result = self.on_removed(reason)
        if inspect.isawaitable(result):
            await result

    # ---- the leader -----------------------------------------------------------------------------------

    async def _admit(self) -> None:
        members = set(self.replica.members())
        waiting = {a: n for n in self.directory.tagged(self.tag)
                   if n.online and (a := raft_address(n, self.raft_port)) and a not in members}
        if not waiting:
            return
        statuses = await fetch_statuses(waiting, self.secret, timeout=1.5)
        for addr in sorted(waiting):
            said = statuses[addr].membership if addr in statuses else None
            if said == JOINING:
                node = waiting[addr]
                log.warning("cluster: adding %s (%s, tagged %s, asks to join) to the members %s", addr,
                            node.name or node.node, self.tag, ", ".join(sorted(members)))
                await self.replica.add_member(addr)
                metrics.CLUSTER_MEMBERS_ADDED.inc()
                self._skipped.pop(addr, None)
                return  # one change at a time
            why = ("it was removed with `cluster remove` (empty its state directory and restart it to "
                   "let it join again)" if said == REMOVED else
                   "no connector answers on its Raft port" if addr not in statuses else
                   f"it says {said!r}, not joining")
            if self._skipped.get(addr) != why:
                self._skipped[addr] = why
                log.info("cluster: not adding tagged node %s (%s): %s", addr, waiting[addr].name or
                         waiting[addr].node, why)
