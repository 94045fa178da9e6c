"""Leader decisions (pure): forget only after continuous absence; exclude node addresses inside the pool."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

from appconnector import config
from appconnector.leader import AbsenceTracker, LeaderDuties, LeaderSettings, excluded_addresses
from appconnector.pool.local import LocalPool
from appconnector.tailnet.api import NodeInfo
from tests.replicas import start_replica


def test_excluded_addresses_are_node_ips_inside_the_pool() -> None:
    pool = config.pool_networks(("100.64.1.0/24",))
    nodes = [NodeInfo("n1", "a", ("100.64.1.7",)), NodeInfo("n2", "b", ("100.101.2.3",))]
    assert excluded_addresses(nodes, pool) == {int(ipaddress.IPv4Address("100.64.1.7"))}


def test_a_node_is_forgotten_only_after_continuous_absence() -> None:
    t = AbsenceTracker(reuse_after=100)
    holders = {"n1", "n2"}
    assert t.observe(holders, {"n1", "n2"}, now=0) == []
    assert t.observe(holders, {"n1"}, now=10) == []          # n2 leaves at t=10
    assert t.observe(holders, {"n1", "n2"}, now=70) == []    # back briefly (an ACL edit): the clock restarts
    assert t.observe(holders, {"n1"}, now=80) == []
    assert t.observe(holders, {"n1"}, now=170) == [], "80 → 170 is 90 s, not yet 100"
    assert t.observe(holders, {"n1"}, now=180) == ["n2"]
    assert t.observe(holders - {"n2"}, {"n1"}, now=400) == [], "forgotten once, then not tracked"


def test_nodes_without_mappings_are_not_tracked() -> None:
    t = AbsenceTracker(reuse_after=1)
    assert t.observe(set(), set(), now=0) == []
    assert t.observe({"n3"}, set(), now=5) == [] and t.observe({"n3"}, set(), now=6) == ["n3"]


def test_leader_rounds_in_standalone_mode_propose_nothing() -> None:
    """The pool clock is the replica's job now (no set_excluded heartbeat): with no node list a round
    changes nothing, however long the pool stays idle."""
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone"})

    async def scenario() -> None:
        now = [10_000.0]
        pool = LocalPool(cfg.pool.prefixes, reuse_after=cfg.pool.reuse_after, clock=lambda: now[0])
        await pool.start()
        duties = LeaderDuties(LeaderSettings.from_config(cfg), pool, None, clock=lambda: now[0])
        await pool.checkout("100.101.0.2", "a.example", (), 60)
        applied = pool.status()["applied_index"]
        for _ in range(360):  # an idle hour of leader rounds every 10 s
            now[0] += 10
            await duties.round()
        assert pool.status()["applied_index"] == applied
        await pool.checkout("100.101.0.2", "b.example", (), 60)
        found = pool.lookup("100.101.0.2", "b.example")
        assert found is not None and found[1] == now[0] == pool.now(), "the checkout's last-used is pool time now"
        await pool.stop()

    asyncio.run(scenario())


class _Directory:
    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.list = nodes

    def nodes(self) -> dict[str, NodeInfo]:
        return {n.node: n for n in self.list}

    def subscribe(self, callback: object) -> None:
        pass


def test_leader_excludes_node_addresses_and_forgets_absent_nodes_on_either_replica(
        tmp_path: Path, replica_kind: str) -> None:
    """The same duties against LocalPool and a one-member RaftReplica: a tailnet node's address inside
    the pool is dropped and skipped; a node gone for reuse_after (on the duties' own clock) is forgotten."""
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_POOL_REUSE_AFTER": "60s"})
    held = NodeInfo("held", "h", ("100.64.1.1",))
    stay, leaver = NodeInfo("stay", "s", ("100.101.0.2",)), NodeInfo("leaver", "l", ("100.101.0.3",))

    async def scenario() -> None:
        pool = await start_replica(replica_kind, cfg, str(tmp_path / "raft"))
        try:
            now = [0.0]
            directory = _Directory([held, stay, leaver])
            duties = LeaderDuties(LeaderSettings.from_config(cfg), pool, directory, clock=lambda: now[0])
            first = await pool.checkout("stay", "a.example", (), 60)
            assert first == int(ipaddress.IPv4Address("100.64.1.1"))
            await duties.round()
            assert pool.lookup("stay", "a.example") is None, "the node-held address was dropped"
            assert await pool.checkout("stay", "a.example", (), 60) != first
            assert await pool.checkout("leaver", "b.example", (), 60) != first
            directory.list = [held, stay]  # leaver leaves
            await duties.round()
            now[0] = 59.0
            await duties.round()
            assert pool.lookup("leaver", "b.example") is not None, "not yet reuse_after"
            now[0] = 61.0
            await duties.round()
            assert pool.lookup("leaver", "b.example") is None and pool.lookup("stay", "a.example") is not None
        finally:
            await pool.stop()

    asyncio.run(scenario())
