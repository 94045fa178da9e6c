"""Route approval read from tailscaled (issue 15): a pool route is served when tailscaled reports it in
this node's PrimaryRoutes/AllowedIPs, or in a tagged connector's PrimaryRoutes; only a route still not
served after tailnet.route_approval_grace gets the "needs approval" warning."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appconnector import config
from appconnector.metrics import TAILNET_ROUTES_SERVED
from appconnector.tailnet.api import NodeInfo
from appconnector.tailnet.nodeinfo import from_peer_status, from_tailcfg_node
from appconnector.tailnet.routes import route_service
from appconnector.tailnet.service import TailnetService
from appconnector.tailnet.settings import TailnetSettings
from tests.localapi_standin import Standin
from tests.tailnet.helpers import TAG, base_state, run, started, wait_for

POOL = "100.64.1.0/24"


def test_route_service_is_pure() -> None:
    me = NodeInfo("nMe", "me", ("100.100.0.1",), (TAG,))
    primary_here = NodeInfo("nMe", "me", ("100.100.0.1",), (TAG,), primary_routes=(POOL,), routes=(POOL,))
    approved_here = NodeInfo("nMe", "me", ("100.100.0.1",), (TAG,), routes=(POOL,))
    peer = NodeInfo("nPeer", "conn-2", ("100.100.0.2",), (TAG,), primary_routes=(POOL,))
    untagged = NodeInfo("nOther", "router", ("100.100.0.3",), (), primary_routes=(POOL,))
    assert route_service([POOL], primary_here, [primary_here, peer], TAG) == {POOL: "primary here"}
    assert route_service([POOL], approved_here, [approved_here], TAG) == {POOL: "approved here"}
    assert route_service([POOL], me, [me, peer], TAG) == {POOL: "primary on conn-2"}
    assert route_service([POOL], me, [me, untagged], TAG) == {POOL: ""}, "not a connector of ours"
    assert route_service([POOL], me, [me, peer], "") == {POOL: ""}, "no cluster: only this node counts"
    assert route_service([POOL, "100.64.2.0/24"], primary_here, [], TAG) == {POOL: "primary here",
                                                                          "100.64.2.0/24": ""}


def test_routes_are_read_from_both_shapes_tailscaled_sends() -> None:
    # ipnstate.PeerStatus (status) and tailcfg.Node (netmap, SelfChange, PeersChanged), as tailscaled encodes them
    status = from_peer_status({"ID": "n1", "TailscaleIPs": ["100.100.0.1", "fd7a:115c:a1e0::1"],
                               "PrimaryRoutes": [POOL],
                               "AllowedIPs": ["100.100.0.1/32", "fd7a:115c:a1e0::1/128", POOL, "10.0.0.0/8"]})
    assert status is not None and status.primary_routes == (POOL,) and status.routes == (POOL, "10.0.0.0/8")
    node = from_tailcfg_node({"StableID": "n1", "Addresses": ["100.100.0.1/32"], "AllowedIPs": None})
    assert node is not None and node.primary_routes == () and node.routes == (), "null AllowedIPs: addresses only"


def _cfg(sock: str, tmp: Path, **env: str) -> config.Config:
    base = {"APPCONNECTOR_TAILNET_LOCALAPI_SOCKET": sock, "APPCONNECTOR_CLUSTER_TAG": TAG,
            "APPCONNECTOR_CLUSTER_SECRET_FILE": "/dev/null", "APPCONNECTOR_DNS_UPSTREAM": "192.0.2.53",
            "APPCONNECTOR_CLUSTER_STATE_DIR": str(tmp / "state"),
            "APPCONNECTOR_TAILNET_ROUTE_APPROVAL_GRACE": "300ms"}
    base.update(env)
    return config.load(None, env=base)


@contextlib.asynccontextmanager
async def _service(tmp: Path, state: dict[str, Any], **env: str) -> AsyncIterator[tuple[Standin, TailnetService]]:
    """A stand-in with ``state`` and a TailnetService on it (not started), both stopped afterwards."""
    sock = str(tmp / "ts.sock")
    s = await started(sock, state)
    svc = TailnetService(TailnetSettings.from_config(_cfg(sock, tmp, **env)), enable_raft_filter=False)
    try:
        yield s, svc
    finally:
        await svc.stop()
        await s.stop()


def _hints(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "autoApprovers" in r.getMessage()]  # any approval hint


@pytest.mark.parametrize("style", ["netmap", "delta"])
def test_routes_approved_by_auto_approvers_give_no_warning(tmp_path: Path, style: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        state = base_state(style)
        state["auto_approve"] = [POOL]  # headscale autoApprovers: approved and primary when advertised
        async with _service(tmp_path, state) as (_, svc):
            await svc.start()
            await wait_for(svc.serving.served, what="the route seen as served")
            assert TAILNET_ROUTES_SERVED._value.get() == 1
            ok, detail = svc.checks()["routes"]()
            assert ok and "served: 100.64.1.0/24 primary here" in detail, detail
            await wait_for(lambda: svc.serving._timer is None, what="no approval deadline pending")
    with caplog.at_level(logging.INFO):
        run(body())
    assert _hints(caplog) == []


def test_a_route_never_served_warns_once_after_the_grace_then_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with _service(tmp_path, base_state("delta")) as (s, svc):
            with caplog.at_level(logging.INFO):
                await svc.start()
                assert _hints(caplog) == [], "no warning before the grace is over"
                await wait_for(lambda: bool(_hints(caplog)), timeout=5, what="the approval warning")
                assert TAILNET_ROUTES_SERVED._value.get() == 0
                ok, detail = svc.checks()["routes"]()
                assert ok and "not served for" in detail and "approval needed" in detail, detail
                # an admin approves the route: tailscaled reports it (SelfChange) and we say so
                s.set_routes("nConn1", primary=[POOL])
                await wait_for(svc.serving.served, what="the route seen as served")
                assert TAILNET_ROUTES_SERVED._value.get() == 1
            assert len(_hints(caplog)) == 1, "warned once"
            assert "autoApprovers" in _hints(caplog)[0]
            assert any("the pool routes are served now" in r.getMessage() for r in caplog.records)
    run(body())


def test_a_standby_connector_sees_the_route_served_by_the_primary(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        state = base_state("delta")
        state["peers"][1]["primary_routes"] = [POOL]  # conn-2 is the primary router (headscale HA)
        async with _service(tmp_path, state) as (_, svc):
            await svc.start()
            assert svc.serving.served()
            assert "primary on conn-2" in svc.checks()["routes"]()[1]
            await wait_for(lambda: svc.serving._timer is None, what="no approval deadline pending")
    with caplog.at_level(logging.INFO):
        run(body())
    assert _hints(caplog) == []


@pytest.mark.parametrize("style", ["netmap", "delta"])
def test_a_change_before_the_watch_connects_is_not_missed(tmp_path: Path, style: str) -> None:
    """Found on the real tailnet: headscale approved the route our advertising asked for before the IPN
    bus watch was connected, tailscaled never sent it again, and the connector warned for minutes."""
    from appconnector.tailnet.directory import TailnetDirectory
    from appconnector.tailnet.localapi import LocalAPIClient

    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state(style))
        d = TailnetDirectory(LocalAPIClient(sock))
        try:
            await d.start()  # status read; the watch task has not connected yet (no await since)
            assert not s._watchers
            s.set_routes("nConn1", primary=[POOL])  # no watcher to tell
            await wait_for(lambda: (me := d.self_node()) is not None and POOL in me.primary_routes,
                           what="the approval seen after the watch connected")
        finally:
            await d.stop()
            await s.stop()
    run(body())


def test_a_client_query_through_the_routes_counts_as_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """headscale never updates the primary's own PrimaryRoutes for routes it advertised while connected:
    a tailnet client's DNS query that reached the pool DNS address is the evidence then."""
    async def body() -> None:
        async with _service(tmp_path, base_state("delta"),
                                  APPCONNECTOR_TAILNET_ROUTE_APPROVAL_GRACE="2s") as (_, svc):
            await svc.start()
            assert not svc.serving.served()
            me = svc.directory.self_node()
            assert me is not None
            svc.serving.saw_client(me)  # the connector asking itself proves nothing
            assert not svc.serving.served()
            client = svc.directory.nodes()["nClientA"]
            svc.serving.saw_client(client)
            assert svc.serving.served() and "reached by client-a" in svc.checks()["routes"]()[1]
            assert svc.serving._timer is None, "no warning can come"
    with caplog.at_level(logging.INFO):
        run(body())
    assert _hints(caplog) == []


def test_a_stopping_connector_waits_until_another_is_primary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Planned stop in a cluster: after withdrawing, DNS and NAT keep serving until the control plane made
    another tagged connector primary for the routes (bounded), so clients never route to a stopped one."""
    import asyncio

    async def body() -> None:
        state = base_state("delta")
        state["auto_approve"] = [POOL]
        async with _service(tmp_path, state) as (s, svc):
            await svc.start()
            await wait_for(svc.serving.served, what="served here")
            stopping = asyncio.ensure_future(svc.withdraw_routes(failover_wait=30))
            await wait_for(lambda: POOL not in (s.prefs["AdvertiseRoutes"] or []), what="the route withdrawn")
            await asyncio.sleep(0.2)  # the withdraw has returned by now; the wait for the new primary has not
            assert not stopping.done(), "no other connector is primary yet"
            s.set_routes("nConn2", primary=[POOL])  # headscale moves the route to conn-2
            await asyncio.wait_for(stopping, 5)
            # no other online connector: no wait at all
            s.set_peer("nConn2", online=False)
            await wait_for(lambda: not svc.directory.nodes()["nConn2"].online, what="conn-2 offline")
            await svc.advertiser.advertise()
            await asyncio.wait_for(svc.withdraw_routes(failover_wait=30), 5)
    with caplog.at_level(logging.INFO):
        run(body())
    assert any("moved to another connector" in r.getMessage() for r in caplog.records)
