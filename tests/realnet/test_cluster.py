"""Three tagged connectors started together find each other in the real status and form ONE Raft
cluster (exactly one bootstraps); the Raft port answers only them: a client and an untagged node
running the connector are refused."""

from __future__ import annotations

from tests.realnet.tailnet import RAFT_PORT, Node, Tailnet, wait_for

CONNECTORS = ("c1", "c2", "c3")


def _members(node: Node) -> dict[str, object]:
    code, doc = node.http_get("/cluster/members")
    assert code == 200, code
    return dict(doc)


def _raft_set(doc: dict[str, object]) -> set[str]:
    members = doc.get("members") or []
    assert isinstance(members, list)
    return {str(doc["self"]), *(str(m) for m in members)}


def test_three_tagged_connectors_form_one_cluster(shared: Tailnet) -> None:
    conns = [shared.nodes[c] for c in CONNECTORS]
    want = {f"{c.ip4()}:{RAFT_PORT}" for c in conns}

    def one_cluster() -> bool:
        docs = [_members(c) for c in conns]
        return all(_raft_set(d) == want for d in docs) and len({d.get("leader") for d in docs}) == 1 \
            and docs[0].get("leader") in want
    wait_for(one_cluster, 30, lambda: f"one cluster of {sorted(want)}: {[_members(c) for c in conns]}")
    bootstraps = [c.name for c in conns if "cluster: bootstrapping" in c.connector_log()]
    assert len(bootstraps) == 1, bootstraps


def test_the_raft_port_answers_members_only(shared: Tailnet) -> None:
    c1, c2, cl1 = shared.nodes["c1"], shared.nodes["c2"], shared.nodes["cl1"]
    assert c2.tcp_connects(c1.ip4(), RAFT_PORT)  # a member's connection gets through
    for c in CONNECTORS:
        assert not cl1.tcp_connects(shared.nodes[c].ip4(), RAFT_PORT, timeout=2), f"a client reached {c}'s Raft port"


def test_an_untagged_node_running_the_connector_is_refused(shared: Tailnet) -> None:
    c1 = shared.nodes["c1"]
    before = _raft_set(_members(c1))
    u1 = shared.connector("u1", tagged=False)
    try:
        shared.wait_online()
        u1.start_appconnector(wait=False)
        wait_for(lambda: "does not carry cluster.tag" in u1.connector_log(), 60,
                 lambda: f"u1 saying it is not a member: {u1.connector_log()[-2000:]}")
        assert not u1.tcp_connects(c1.ip4(), RAFT_PORT, timeout=2)
        assert _raft_set(_members(c1)) == before
    finally:
        u1.stop()
