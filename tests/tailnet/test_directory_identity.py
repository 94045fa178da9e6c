"""Node directory and whois cache, driven by the stand-in's netmap notifications (both styles)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appconnector.metrics import TAILNET_WHOIS
from appconnector.tailnet.api import TailnetUnavailable
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.identity import TailnetIdentity
from appconnector.tailnet.localapi import LocalAPIClient
from tests.tailnet.helpers import TAG, base_state, run, started, wait_for


def _whois_count(result: str) -> float:
    return float(TAILNET_WHOIS.labels(result)._value.get())


@pytest.mark.parametrize("style", ["netmap", "delta"])
def test_directory_follows_peer_changes(tmp_path: Path, style: str) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state(style))
        d = TailnetDirectory(LocalAPIClient(sock), cluster_tag=TAG, retry_interval=0.05)
        changes: list[int] = []
        d.subscribe(lambda: changes.append(d.generation))
        try:
            await d.start()
            assert set(d.nodes()) == {"nConn1", "nClientA", "nConn2"}
            assert d.nodes()["nClientA"].ipv4 == ("100.101.0.10",)
            assert (d.self_node() or d.nodes()["x"]).node == "nConn1"
            assert [n.node for n in d.tagged(TAG)] == ["nConn1", "nConn2"]
            # give the watch a moment to be connected: the stand-in tells only open watchers
            await wait_for(lambda: bool(s._watchers), what="watch connected")
            s.add_peer("nClientB", ["100.101.0.11"])
            await wait_for(lambda: "nClientB" in d.nodes(), what="added peer")
            s.set_peer("nConn2", online=False)
            await wait_for(lambda: not d.nodes()["nConn2"].online, what="peer offline")
            s.remove_peer("nClientA")
            await wait_for(lambda: "nClientA" not in d.nodes(), what="removed peer")
            assert changes, "subscribers are told"
            # tailscaled restarts: the stream closes, the directory reconnects and re-reads status
            s.drop_watchers()
            s.peers.pop("nClientB")  # changed while nobody watched
            await wait_for(lambda: "nClientB" not in d.nodes(), what="resync after reconnect")
        finally:
            await d.stop()
            await s.stop()
    run(body())


def test_empty_notification_triggers_status_refresh(tmp_path: Path) -> None:
    """≥1.100 sends an empty Notify to a watcher that did not ask for peer changes: we re-read status."""
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state("delta"))
        d = TailnetDirectory(LocalAPIClient(sock))
        try:
            await d.refresh()
            s.peers.pop("nClientA")
            assert d.apply_notify({"Version": "1.100.0"}) is False
            await d.refresh()
            assert "nClientA" not in d.nodes()
            # a removal by an unknown numeric NodeID cannot be applied exactly either
            assert d.apply_notify({"PeersRemoved": [424242]}) is False
            # a known one can
            assert d.apply_notify({"PeersRemoved": [2]}) is True
            assert "nConn2" not in d.nodes()
        finally:
            await s.stop()
    run(body())


def test_a_delta_watch_skips_notifications_without_peers(tmp_path: Path) -> None:
    """≥1.100 watched with NotifyPeerChanges sends every peer change as a delta and, around changes,
    notifications without peer fields (seen on tailscaled 1.102.3, tests/realnet/test_directory.py):
    those cost no status read; a peer change and a self change are still applied."""
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        state = base_state("delta")
        s = await started(sock, state)
        d = TailnetDirectory(LocalAPIClient(sock), retry_interval=0.05)
        try:
            await d.start()
            await wait_for(lambda: bool(s._watchers), what="watch connected")
            reads = sum(1 for _, p in s.requests if p.endswith("/status"))
            s.load_state(state)  # nothing changed: an empty Notify
            s.add_peer("nClientB", ["100.101.0.11"])
            await wait_for(lambda: "nClientB" in d.nodes(), what="added peer")
            s.load_state({**s.dump_state(), "self": {**state["self"], "tags": []}})
            await wait_for(lambda: (d.self_node() or d.nodes()["x"]).tags == (), what="self change")
            assert sum(1 for _, p in s.requests if p.endswith("/status")) == reads
        finally:
            await d.stop()
            await s.stop()
    run(body())


@pytest.mark.parametrize("style", ["netmap", "delta"])
def test_whois_cache_follows_netmap(tmp_path: Path, style: str) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state(style))
        client = LocalAPIClient(sock)
        d = TailnetDirectory(client, retry_interval=0.05)
        ident = TailnetIdentity(client, d, negative_ttl=60)
        try:
            await d.start()
            await wait_for(lambda: bool(s._watchers), what="watch connected")
            assert ident.cached("100.101.0.10") is None
            misses = _whois_count("miss")
            a = await ident.whois("100.101.0.10")
            assert a is not None and a.node == "nClientA"
            assert ident.cached("100.101.0.10") == a
            assert await ident.whois("100.101.0.10") == a
            assert _whois_count("miss") == misses + 1, "second lookup is served from the cache"
            whois_calls = sum(1 for _, p in s.requests if "whois" in p)
            # a stranger is cached negatively ...
            assert await ident.whois("100.101.0.77") is None
            assert await ident.whois("100.101.0.77") is None
            assert sum(1 for _, p in s.requests if "whois" in p) == whois_calls + 1
            # ... until the netmap changes: the node that joined with that IP is found at once
            s.add_peer("nClientC", ["100.101.0.77"])
            await wait_for(lambda: "nClientC" in d.nodes(), what="netmap change")
            c = await ident.whois("100.101.0.77")
            assert c is not None and c.node == "nClientC"
            # the node changes (tags): the cached entry is refreshed from the netmap, without a whois
            whois_calls = sum(1 for _, p in s.requests if "whois" in p)
            s.set_peer("nClientA", tags=["tag:web"])
            await wait_for(lambda: d.nodes()["nClientA"].tags == ("tag:web",), what="tag change")
            assert (ident.cached("100.101.0.10") or a).tags == ("tag:web",)
            # the address moves to another node: the old answer is gone, whois finds the new node
            s.remove_peer("nClientA")
            s.add_peer("nClientD", ["100.101.0.10"])
            await wait_for(lambda: "nClientD" in d.nodes() and "nClientA" not in d.nodes(), what="move")
            assert (ident.cached("100.101.0.10") or c).node != "nClientA"
            assert (await ident.whois("100.101.0.10") or a).node == "nClientD"
            assert sum(1 for _, p in s.requests if "whois" in p) == whois_calls + 1
            # a node that leaves is no longer answered from the cache
            s.remove_peer("nClientC")
            await wait_for(lambda: "nClientC" not in d.nodes(), what="leave")
            assert ident.cached("100.101.0.77") is None
        finally:
            await d.stop()
            await s.stop()
    run(body())


def test_strangers_are_remembered_within_a_bound(tmp_path: Path) -> None:
    """A flood of unknown sources costs one whois each per negative_ttl, and memory stays bounded."""
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state("netmap"))
        ident = TailnetIdentity(LocalAPIClient(sock), negative_ttl=60, max_strangers=4)
        try:
            for i in range(10):
                assert await ident.whois(f"100.101.9.{i}") is None
            assert len(ident._strangers) <= 4
            whois_calls = sum(1 for _, p in s.requests if "whois" in p)
            assert await ident.whois("100.101.9.9") is None  # the newest stranger is still remembered
            assert sum(1 for _, p in s.requests if "whois" in p) == whois_calls
        finally:
            await s.stop()
    run(body())


def test_whois_unavailable_raises_and_is_counted(tmp_path: Path) -> None:
    async def body() -> None:
        ident = TailnetIdentity(LocalAPIClient(str(tmp_path / "none.sock"), timeout=0.5))
        errors = _whois_count("error")
        with pytest.raises(TailnetUnavailable):
            await ident.whois("100.101.0.10")
        assert _whois_count("error") == errors + 1
    run(body())


def test_concurrent_whois_share_one_lookup(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state())
        try:
            ident = TailnetIdentity(LocalAPIClient(sock))
            results = await asyncio.gather(*(ident.whois("100.100.0.2") for _ in range(20)))
            assert {r.node if r else None for r in results} == {"nConn2"}
            assert sum(1 for _, p in s.requests if "whois" in p) == 1
            # a caller that gives up does not cancel the lookup for the others
            waiter = asyncio.ensure_future(ident.whois("100.101.0.10"))
            other = asyncio.ensure_future(ident.whois("100.101.0.10"))
            await asyncio.sleep(0)
            waiter.cancel()
            got = await other
            assert got is not None and got.node == "nClientA"
        finally:
            await s.stop()
    run(body())


def test_whois_carries_login_and_grants_and_refresh_sees_them_change(tmp_path: Path) -> None:
    """The whois CapMap under the configured capability becomes ``granted``; a grants change (no
    netmap notification, as with tailscaled) is found by ``refresh``, which names the node."""
    cap = "example.com/cap/apps"

    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state("delta"))
        s.peers["nClientA"].login = "alice@example.com"
        s.set_capmap("nClientA", {cap: [{"apps": ["web"]}], "other/cap": [{"apps": ["x"]}]})
        ident = TailnetIdentity(LocalAPIClient(sock), capability=cap)
        try:
            info = await ident.whois("100.101.0.10")
            assert info is not None and info.login == "alice@example.com" and info.granted == {"web"}
            assert await ident.refresh() == set()  # nothing changed
            s.set_capmap("nClientA", {})
            assert await ident.refresh() == {"nClientA"}
            info = ident.cached("100.101.0.10")
            assert info is not None and info.granted == frozenset()
            s.remove_peer("nClientA")
            assert await ident.refresh() == {"nClientA"} and ident.cached("100.101.0.10") is None
        finally:
            await s.stop()
    run(body())
