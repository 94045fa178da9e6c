"""The pool routes on a real tailscaled: advertised beside a route the operator set (never wiping it),
put back beside a new one after ``tailscale set --advertise-routes`` replaced the list, and approved by
headscale's ``autoApprovers`` so the clients route the pool through a connector."""

from __future__ import annotations

import json

from tests.realnet.tailnet import OTHER_ROUTE, POOL, Node, Tailnet, wait_for


def _advertised(node: Node) -> list[str]:
    return list(json.loads(node.cli("debug", "prefs", timeout=15).stdout).get("AdvertiseRoutes") or [])


def test_pool_routes_are_added_beside_the_operators(shared: Tailnet) -> None:
    c3 = shared.nodes["c3"]
    assert set(_advertised(c3)) >= {OTHER_ROUTE, POOL}
    c3.cli("set", "--advertise-routes=203.0.113.0/24")  # replaces the whole list: the pool is gone
    wait_for(lambda: set(_advertised(c3)) >= {"203.0.113.0/24", POOL}, 20,
             lambda: f"the pool routes back beside the new one: {_advertised(c3)}")


def test_pool_routes_are_approved_by_autoapprovers(shared: Tailnet) -> None:
    nodes = {n["given_name"]: n for n in shared.hs_nodes()}
    for c in ("c1", "c2", "c3"):
        assert POOL in (nodes[c].get("approved_routes") or []), nodes[c]
    assert OTHER_ROUTE not in (nodes["c3"].get("approved_routes") or [])  # not in autoApprovers
    primary = wait_for(shared.primary_route_node, 20, "a primary for the pool route in the clients' view")
    assert primary in ("c1", "c2", "c3")
