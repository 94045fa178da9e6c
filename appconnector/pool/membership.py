"""Cluster membership as one member sees it: another member's answer on the Raft port, this member's
own record of whether it is in the cluster, and the pure rule that moves between the two.

* ``fetch_statuses(addresses, secret)`` asks members' Raft ports for their
  :class:`~appconnector.pool.engine.EngineStatus` (the engine's ``peer_status``: authenticated with the
  cluster secret, so only members and holders of the secret can ask). Its ``membership`` says what the
  member says of itself: ``joining`` (started to join, waiting to be added), ``member`` or ``removed``. A
  leader adds only peers that say ``joining``; so a member removed with ``cluster remove`` (which says
  ``removed`` from then on, even after a restart with its state) is never added back until its state
  directory is emptied.
* ``MembershipRecord`` is ``membership.json`` in the member's state directory: the state above, who
  removed it, and the last membership seen (the partner list for a restart: pysyncobj replays membership
  changes from the journal onto the partners it is started with, so they must be the real members).
* ``judge`` decides from the leader's status whether this member was added, is still waiting, or was
  removed. A member is only ever judged removed on a leader's word, and only after it has been a member.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from appconnector.pool.engine import JOINING as JOINING
from appconnector.pool.engine import MEMBER as MEMBER
from appconnector.pool.engine import REMOVED as REMOVED
from appconnector.pool.engine import EngineStatus
from appconnector.pool.pysyncobj_engine import peer_status

log = logging.getLogger(__name__)

RECORD_FILE = "membership.json"

PeerQuery = Callable[[str, str | None, float], EngineStatus | None]
"""(address, secret, timeout) → the member's status, or None when it does not answer (blocking)."""


async def fetch_statuses(addresses: Iterable[str], secret: str | None, timeout: float = 2.0, *,
                         query: PeerQuery = peer_status) -> dict[str, EngineStatus]:
    """The status of several members at once (asked with ``query``); those that answered."""
    addrs = sorted(set(addresses))
    results = await asyncio.gather(*(asyncio.to_thread(query, a, secret, timeout) for a in addrs))
    return {a: r for a, r in zip(addrs, results, strict=True) if r is not None}


def leader_status(statuses: Mapping[str, EngineStatus]) -> EngineStatus | None:
    """Of the answers, the one from a member that says it is the leader (the highest term wins)."""
    leaders = [s for s in statuses.values() if s.claims_leadership()]
    if not leaders:
        return None
    return max(leaders, key=lambda s: s.term)


@dataclass
class MembershipRecord:
    """What this member knows about its own membership; kept in ``membership.json``."""

    state: str = JOINING
    members: list[str] = field(default_factory=list)
    removed_by: str | None = None
    removed_at: float | None = None

    @classmethod
    def load(cls, state_dir: Path) -> MembershipRecord | None:
        path = state_dir / RECORD_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("cluster: %s unreadable (%s); treating this member as not yet added", path, e)
            return None
        if not isinstance(doc, dict) or doc.get("state") not in (JOINING, MEMBER, REMOVED):
            log.warning("cluster: %s holds no membership state; treating this member as not yet added", path)
            return None
        members = doc.get("members")
        return cls(state=doc["state"], members=[str(m) for m in members] if isinstance(members, list) else [],
                   removed_by=_text_or_none(doc.get("removed_by")), removed_at=_time_or_none(doc.get("removed_at")))

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / RECORD_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), sort_keys=True) + "\n")
        os.replace(tmp, path)


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _time_or_none(value: object) -> float | None:
    """A hand-edited file may hold anything here: only a finite number is a time."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        return None
    return float(value)


@dataclass(frozen=True)
class Verdict:
    state: str
    reason: str = ""
    by: str | None = None  # REMOVED: the leader whose membership no longer lists this member


def judge(me: str, recorded: str, leader: EngineStatus | None, *, is_leader: bool) -> Verdict | None:
    """This member's membership from the leader's status; None when there is no evidence either way.

    ``recorded`` is the state so far. Removed is final (until the state directory is emptied). A member
    the leader does not list was removed only if it had been a member; a joining one is still waiting."""
    if recorded == REMOVED:
        return None
    if is_leader:
        return Verdict(MEMBER, "this member is the leader") if recorded != MEMBER else None
    if leader is None:
        return None
    leader_addr = leader.self_address or "?"
    listed = me in leader.members
    if listed:
        return Verdict(MEMBER, f"the leader {leader_addr} lists this member") if recorded != MEMBER else None
    if recorded == MEMBER:
        return Verdict(REMOVED, f"removed from the cluster by the leader {leader_addr} (its membership "
                       f"{', '.join(leader.members)} no longer lists {me})", by=leader_addr)
    return None

