"""Cluster membership in tailscale mode: who the members are, whether to join or bootstrap, and the
nftables filter that lets only members reach the Raft port.

Members are the nodes carrying ``cluster.tag``; a member's Raft address is its tailnet IPv4 and
``cluster.raft_port``. Split brain (upstream natc PRs #16570/#16879) is avoided by one rule, decided by
the pure :func:`decide`: a node with no Raft state of its own joins through any member whose Raft port
answers; only when none answers, ``follow_only`` is off and it has the lowest StableID among the
online tagged nodes does it bootstrap. A node that is waiting does not listen on the Raft port, so two
fresh nodes never mistake each other for a cluster: the lowest bootstraps, the other then sees it
answer and joins. A bootstrap decision must also hold for ``confirm_rounds`` probes in a row.

pysyncobj pickles its messages, so the Raft port must not be reachable by anyone else: the filter
(table ``inet appconnector_raft``, separate from the NAT table) accepts the port only from members'
tailnet IPv4s and drops (and counts) the rest; it is re-rendered whenever the netmap changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from appconnector.config import format_hostport
from appconnector.kernel.nftables import Command, transaction_runner
from appconnector.tailnet.api import NodeInfo
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.settings import TailnetSettings

log = logging.getLogger(__name__)

RAFT_TABLE = "appconnector_raft"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A tagged node as a possible cluster member."""

    node: str                 # StableID
    raft_addr: str | None     # "ipv4:port", None when the node has no tailnet IPv4
    online: bool


class Action(enum.Enum):
    RESUME = "resume"         # this node has Raft state: restart with its stored membership
    JOIN = "join"             # ask a member (``via``) to add us
    BOOTSTRAP = "bootstrap"   # start a new one-member cluster
    WAIT = "wait"             # nothing safe to do yet; probe again


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    via: tuple[str, ...] = ()  # JOIN/RESUME: Raft addresses of members that answered
    reason: str = ""


def raft_address(node: NodeInfo, port: int) -> str | None:
    return format_hostport(node.ipv4[0], port) if node.ipv4 else None


def candidates(nodes: Iterable[NodeInfo], tag: str, port: int) -> list[Candidate]:
    """Nodes carrying ``tag``, ordered by StableID."""
    return sorted((Candidate(n.node, raft_address(n, port), n.online) for n in nodes if tag in n.tags),
                  key=lambda c: c.node)


def decide(self_id: str, tagged: Sequence[Candidate], answering: Collection[str], *,
           follow_only: bool, has_state: bool) -> Decision:
    """What a starting node should do. ``tagged``: every node with the cluster tag (self included);
    ``answering``: Raft addresses of other tagged nodes whose Raft port accepted a connection."""
    me = next((c for c in tagged if c.node == self_id), None)
    others = sorted(a for a in answering if me is None or a != me.raft_addr)
    if has_state:
        return Decision(Action.RESUME, tuple(others), "local Raft state found: keeping its membership")
    if me is None:
        return Decision(Action.WAIT, (), "this node does not carry cluster.tag (check `tailscale up --advertise-tags`)")
    if me.raft_addr is None:
        return Decision(Action.WAIT, (), "this node has no tailnet IPv4 address yet")
    if others:
        return Decision(Action.JOIN, tuple(others), f"{len(others)} member(s) answer: joining their cluster")
    if follow_only:
        return Decision(Action.WAIT, (), "cluster.follow_only is set and no member answers yet")
    online = [c for c in tagged if (c.online or c.node == self_id) and c.raft_addr]
    lowest = min(c.node for c in online)
    if lowest != self_id:
        return Decision(Action.WAIT, (), f"waiting for {lowest} (lowest StableID among online tagged nodes) "
                        "to bootstrap the cluster")
    return Decision(Action.BOOTSTRAP, (), "no member answers and this node has the lowest StableID")


async def probe_tcp(addr: str, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection on ``addr`` ("ip:port")."""
    host, _, port = addr.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class ClusterDiscovery:
    """The I/O around :func:`decide`: reads the directory, probes tagged peers' Raft ports, repeats
    until the decision is not WAIT (and a BOOTSTRAP held for ``confirm_rounds`` probes)."""

    def __init__(self, directory: TailnetDirectory, settings: TailnetSettings, has_state: bool,
                 probe: Callable[[str], Any] = probe_tcp, interval: float = 2.0, confirm_rounds: int = 2) -> None:
        self.directory = directory
        self.settings = settings
        self.has_state = has_state
        self.probe = probe
        self.interval = interval
        self.confirm_rounds = confirm_rounds

    def members(self) -> list[Candidate]:
        return candidates(self.directory.nodes().values(), self.settings.cluster_tag, self.settings.raft_port)

    def self_address(self) -> str | None:
        me = self.directory.self_node()
        return raft_address(me, self.settings.raft_port) if me else None

    async def once(self) -> Decision:
        me = self.directory.self_node()
        tagged = self.members()
        others = [c.raft_addr for c in tagged if c.raft_addr and (me is None or c.node != me.node)]
        results = await asyncio.gather(*(self.probe(a) for a in others))
        answering = [a for a, ok in zip(others, results, strict=True) if ok]
        return decide(me.node if me else "", tagged, answering,
                      follow_only=self.settings.follow_only, has_state=self.has_state)

    async def decide(self) -> Decision:
        bootstrap_votes = 0
        last_reason = ""
        while True:
            d = await self.once()
            if d.action is Action.BOOTSTRAP:
                bootstrap_votes += 1
                if bootstrap_votes >= self.confirm_rounds:
                    log.info("cluster: bootstrapping (%s)", d.reason)
                    return d
            elif d.action is Action.WAIT:
                bootstrap_votes = 0
                if d.reason != last_reason:
                    log.info("cluster: %s", d.reason)
                    last_reason = d.reason
            else:
                log.info("cluster: %s %s", d.reason, ", ".join(d.via))
                return d
            await asyncio.sleep(self.interval)


# ---- the Raft-port filter -----------------------------------------------------------------------


def render_raft_filter(port: int, allowed_ipv4: Iterable[str]) -> list[Command]:
    """libnftables JSON commands replacing table ``inet appconnector_raft`` atomically: TCP ``port``
    is accepted only from ``allowed_ipv4`` and dropped (counted) from everywhere else."""
    t = {"family": "inet", "table": RAFT_TABLE}
    elems = sorted(set(allowed_ipv4))
    dport = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": port}}
    cmds: list[Command] = [
        {"add": {"table": {"family": "inet", "name": RAFT_TABLE}}},
        {"delete": {"table": {"family": "inet", "name": RAFT_TABLE}}},
        {"add": {"table": {"family": "inet", "name": RAFT_TABLE}}},
        {"add": {"set": {**t, "name": "members4", "type": "ipv4_addr"}}},
        {"add": {"chain": {**t, "name": "input", "type": "filter", "hook": "input", "prio": -10,
                           "policy": "accept"}}},
        {"add": {"rule": {**t, "chain": "input", "comment": "raft from cluster members", "expr": [
            dport,
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@members4"}},
            {"accept": None}]}}},
        {"add": {"rule": {**t, "chain": "input", "comment": "raft from anyone else", "expr": [
            dport, {"counter": {"packets": 0, "bytes": 0}}, {"drop": None}]}}},
    ]
    if elems:
        cmds.insert(4, {"add": {"element": {**t, "name": "members4", "elem": elems}}})
    return cmds


def render_raft_filter_removal() -> list[Command]:
    return [{"add": {"table": {"family": "inet", "name": RAFT_TABLE}}},
            {"delete": {"table": {"family": "inet", "name": RAFT_TABLE}}}]


class RaftFilter:
    """Keeps the Raft-port filter equal to the current members' tailnet IPv4s. nftables runs in a
    worker thread (``asyncio.to_thread``), never on the event loop that answers DNS."""

    def __init__(self, port: int, apply: Callable[[Sequence[Command]], None] | None = None) -> None:
        self.port = port
        self._apply = apply or transaction_runner()
        self.allowed: frozenset[str] | None = None
        self._wanted: frozenset[str] | None = None
        self._sync: asyncio.Task[None] | None = None

    def update(self, allowed_ipv4: Iterable[str]) -> bool:
        """Re-render when the member set changed (blocking: nftables). Returns True when the kernel was changed."""
        allowed = frozenset(allowed_ipv4)
        if allowed == self.allowed:
            return False
        self._apply(render_raft_filter(self.port, allowed))
        self.allowed = allowed
        log.info("Raft port %d open to %d member address(es): %s", self.port, len(allowed),
                 ", ".join(sorted(allowed)) or "none")
        return True

    async def follow(self, directory: TailnetDirectory, tag: str) -> None:
        """Apply now (returns once in place) and after every netmap change (tagged nodes' IPv4s, online
        or not): one transaction at a time off the loop, the latest member set wins."""
        loop = asyncio.get_running_loop()

        def wanted() -> frozenset[str]:
            return frozenset(ip for n in directory.tagged(tag) for ip in n.ipv4)

        def refresh() -> None:
            self._wanted = wanted()
            if self._sync is None or self._sync.done():
                self._sync = loop.create_task(self._catch_up(), name="raft-filter")

        directory.subscribe(refresh)
        self._wanted = wanted()
        await self._catch_up()

    async def _catch_up(self) -> None:
        while self._wanted is not None and self._wanted != self.allowed:
            try:
                await asyncio.to_thread(self.update, self._wanted)
            except Exception:  # the next netmap change tries again
                log.exception("could not refresh the Raft-port filter")
                return

    async def remove(self) -> None:
        self._wanted = None
        if self._sync is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync
        await asyncio.to_thread(self._apply, render_raft_filter_removal())
        self.allowed = None
