"""Leader decisions (pure): forget only after continuous absence; exclude node addresses inside the pool."""

from __future__ import annotations

import ipaddress

from appconnector import config
from appconnector.leader import AbsenceTracker, excluded_addresses
from appconnector.tailnet.api import NodeInfo


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
