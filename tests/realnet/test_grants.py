"""Grants on the real control plane: headscale's ``grants[].app`` reaches the connector's whois of a
client verbatim under the capability name (``CapMap``), only for the granted source, and a policy
reload (SIGHUP) that drops the grant revokes it."""

from __future__ import annotations

import asyncio
from typing import Any

from appconnector.tailnet.localapi import LocalAPIClient
from tests.realnet.tailnet import TAG, Node, Tailnet, wait_for

CAP = "appconnector.example/cap/apps"
VALUE = {"apps": ["web"]}


def _capmap(connector: Node, client: Node) -> dict[str, Any]:
    doc = asyncio.run(LocalAPIClient(connector.socket).whois(client.ip4()))
    assert doc is not None
    return dict(doc.get("CapMap") or {})


def test_a_grant_reaches_whois_and_a_reload_revokes_it(shared: Tailnet) -> None:
    c1, cl1, cl2 = shared.nodes["c1"], shared.nodes["cl1"], shared.nodes["cl2"]
    assert CAP not in _capmap(c1, cl1)
    grant = {"src": ["alice@"], "dst": [TAG], "app": {CAP: [VALUE]}}
    shared.set_policy(shared.policy(grants=[grant]))
    try:
        got = wait_for(lambda: _capmap(c1, cl1).get(CAP), 30,
                       lambda: f"{CAP} in the whois of alice's node: {_capmap(c1, cl1)} "
                       f"(headscale: {shared.headscale.log()[-1500:] if shared.headscale else ''})")
        assert got == [VALUE]
        assert CAP not in _capmap(c1, cl2)  # bob is not granted
    finally:
        shared.set_policy(shared.policy())
    wait_for(lambda: CAP not in _capmap(c1, cl1), 30, lambda: f"the grant revoked: {_capmap(c1, cl1)}")
