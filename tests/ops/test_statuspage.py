"""The status page: its pure renderer and data helpers directly, then both listeners over real sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from pathlib import Path
from typing import Any

from appconnector import statuspage
from appconnector.admin import AdminServer
from appconnector.http import StatusServer
from appconnector.http_settings import HttpSettings
from appconnector.logs import RecentWarnings
from appconnector.pool.local import LocalPool
from appconnector.secrets_file import ensure_secret_file
from appconnector.statusdata import RateWindow, describe_primary, member_rows, primary_routers
from tests.ops.helpers import http
from tests.ops.test_http import _config

NOW = 1_800_000_000.0


def _doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "mode": "standalone", "ready": False,
        "checks": {"raft": {"ok": True, "detail": "leader"}, "nat": {"ok": False, "detail": "table <missing>"}},
        "raft": {"self": "127.0.0.1:7001", "role": "follower", "leader": "127.0.0.1:7002", "term": 41,
                 "commit_index": 9876, "applied_index": 9870},
        "members": [{"address": "127.0.0.1:7001", "self": True, "role": "follower", "connected": None, "lag": 6,
                     "last_contact": None},
                    {"address": "127.0.0.1:7002", "self": False, "role": "leader", "connected": True, "lag": None,
                     "last_contact": NOW - 2}],
        "primary_router": "n/a (standalone mode: no tailnet routes)",
        "pool": {"prefixes": ["100.64.1.0/24"], "mappings": 31337, "nodes": 12, "domains": 7, "pool_size": 255,
                 "max_node_use": 240, "max_node_use_ratio": 240 / 255, "addresses_left": 15,
                 "checkouts": {"new": 5, "hit": 70}},
        "nat": {"enabled": True, "configured": True, "reason": "kernel steering on", "steer_elements": 4242,
                "seen_flows": 77.0, "unmapped_rejects": 2468.0, "unmapped_drops": 13.0, "seen_reads": 555.0,
                "last_reconcile": NOW - 30,
                "reconciles_ok": 8, "reconciles_error": 1},
        "dns": {"totals": {"NOERROR": 1200, "SERVFAIL": 3}, "rates": {"NOERROR": 2.5, "SERVFAIL": 0.05},
                "window": 60.0, "servfail": {"upstream": 3.0}},
        "warnings": [{"logger": "appconnector.pool.state", "template": "clock skew: %s ahead", "count": 4,
                      "level": "warning", "last": NOW - 5}],
        "admin_listen": "127.0.0.1:8894",
    }
    doc.update(over)
    return doc


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", " ", html)


def test_page_has_the_numbers_in_the_html_and_escapes_every_value() -> None:
    doc = _doc(checks={"raft": {"ok": True, "detail": "<script>alert(1)</script>"}})
    html = statuspage.page(doc, now=NOW)
    text = _text(html)
    for shown in ("127.0.0.1:7002", "41", "9,876", "31,337", "4,242", "1,200", "2.50", "15 left",
                  "2,468", "2 s ago", "30 s ago", "NOT READY", "n/a (standalone mode"):
        assert shown in text, shown
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "clock skew: … ahead" in text  # the template, its arguments left out
    assert re.search(r'<code id="leader">127\.0\.0\.1:7002</code>', html)
    assert 'class="bar hot"' in html, "a node above 90 % is marked"
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:)?//', html.replace('href="http://127.0.0.1:8894/"', ""))


def test_read_only_page_has_no_lookup_box_and_points_at_the_admin_listener() -> None:
    ro = statuspage.page(_doc(), now=NOW)
    assert 'id="token"' not in ro and "http://127.0.0.1:8894/" in ro
    admin = statuspage.page(_doc(), admin=True, now=NOW)
    assert '<input id="token" type="password"' in admin
    # the token leaves the page only as a header on this origin: never a cookie, a URL or storage
    assert "Authorization" in admin and "credentials:'omit'" in admin
    for bad in ("document.cookie", "localStorage", "sessionStorage", "token=", "http://", "https://"):
        assert bad not in admin.split("<script>", 1)[1], bad


def test_refresh_document_carries_the_same_sections_the_page_shows() -> None:
    doc = _doc()
    refreshed = json.loads(statuspage.refresh_doc(doc, now=NOW))
    html = statuspage.page(doc, now=NOW)
    assert set(refreshed["sections"]) == set(statuspage.SECTIONS)
    for key, inner in refreshed["sections"].items():
        assert f'<div id="s-{key}">{inner}</div>' in html, key


def test_members_lag_comes_from_the_leaders_match_index_and_the_followers_own_apply() -> None:
    leader_view = {"self": "a:1", "leader": "a:1", "role": "leader", "members": ["a:1", "b:1", "c:1"],
                   "connected": ["b:1"], "commit_index": 100, "applied_index": 100, "leader_commit_index": 100,
                   "match_index": {"b:1": 97, "c:1": 40}, "last_heard": {"b:1": 0.2}}
    rows = {r["address"]: r for r in member_rows(leader_view)}
    assert [rows[m]["role"] for m in ("a:1", "b:1", "c:1")] == ["leader", "follower", "follower"]
    assert (rows["a:1"]["lag"], rows["b:1"]["lag"], rows["c:1"]["lag"]) == (0, 3, 60)
    assert rows["b:1"]["connected"] is True and rows["c:1"]["connected"] is False
    assert rows["b:1"]["last_contact"] is not None and rows["c:1"]["last_contact"] is None
    follower_view = {**leader_view, "self": "b:1", "role": "follower", "applied_index": 90, "match_index": {}}
    rows = {r["address"]: r for r in member_rows(follower_view)}
    assert rows["b:1"]["lag"] == 10 and rows["c:1"]["lag"] is None
    no_leader = {**leader_view, "leader": None, "role": "candidate"}
    assert {r["role"] for r in member_rows(no_leader)} == {"unknown"}


def test_primary_router_is_read_from_primary_routes_of_self_and_peers() -> None:
    status = {"Self": {"HostName": "conn-a", "PrimaryRoutes": []},
              "Peer": {"k1": {"HostName": "conn-b", "PrimaryRoutes": ["100.64.1.0/24", "10.9.0.0/16"]},
                       "k2": {"HostName": "laptop"}}}
    prefixes = ["100.64.1.0/24", "100.64.2.0/24"]
    found = primary_routers(status, prefixes)
    assert found == {"100.64.1.0/24": "conn-b"}
    assert describe_primary(found, prefixes) == ("100.64.1.0/24: conn-b; "
                                                 "100.64.2.0/24: none (no connector is serving it)")
    status["Self"]["PrimaryRoutes"] = ["100.64.2.0/24"]
    assert primary_routers(status, prefixes)["100.64.2.0/24"] == "conn-a (this connector)"


def test_dns_rates_are_taken_over_the_window() -> None:
    w = RateWindow(window=60)
    assert w.add(0.0, {"NOERROR": 0}) == ({"NOERROR": 0.0}, 0.0)
    rates, span = w.add(10.0, {"NOERROR": 50, "SERVFAIL": 5})
    assert span == 10.0 and rates == {"NOERROR": 5.0, "SERVFAIL": 0.5}
    for t in range(20, 200, 10):
        rates, span = w.add(float(t), {"NOERROR": 5.0 * t})
    assert span <= 70 and rates["NOERROR"] == 5.0


def test_recent_warnings_keep_templates_fold_repeats_and_stay_bounded() -> None:
    ring = RecentWarnings(size=3)
    logger = logging.getLogger("test.statuspage.ring")
    logger.propagate = False
    logger.addHandler(ring)
    try:
        logger.info("not a warning %s", "x")
        for _ in range(5):
            logger.warning("refused by policy: node %s domain %s", "100.101.0.10", "secret.example")
        for i in range(3):
            logger.warning("other %d", i) if i == 0 else logger.error(f"distinct {i}")
        rows = ring.rows()
        assert len(rows) == 3
        assert [r["template"] for r in rows] == ["distinct 2", "distinct 1", "other %d"]
        logger.warning("refused by policy: node %s domain %s", "100.101.0.11", "x.example")
        rows = ring.rows()
        assert rows[0]["template"] == "refused by policy: node %s domain %s" and rows[0]["count"] == 1
        assert all("100.101.0.1" not in str(r) for r in rows), "arguments (per-node data) are never kept"
    finally:
        logger.removeHandler(ring)


def test_both_listeners_serve_the_page_and_only_the_admin_copy_answers_lookups(tmp_path: Path) -> None:
    async def body() -> None:
        cfg, _ = _config(tmp_path)
        token = ensure_secret_file("http.admin_token_file", cfg.admin_token_path())
        pool = LocalPool(cfg.pool.prefixes)
        await pool.start()
        status = StatusServer(HttpSettings.from_config(cfg), pool, {"raft": lambda: (True, "local")})
        admin = AdminServer(HttpSettings.from_config(cfg), pool, pool, token, page=status.page)
        await status.start()
        await admin.start()
        ro, ad = f"http://{cfg.http.listen}", f"http://{cfg.http.admin_listen}"
        try:
            addr = await pool.checkout("100.101.0.10", "github.com", (int(ipaddress.IPv4Address("192.0.2.7")),), 60)
            await pool.checkout("100.101.0.11", "gitlab.com", (), 60)
            await pool.checkout("100.101.0.11", "github.com", (), 60)
            for base in (ro, ad):
                code, html = await asyncio.to_thread(http, base + "/")
                assert code == 200 and "<code id=\"leader\">local</code>" in html
                assert re.search(r'<span id="mappings">3</span>', html), "the count is in the HTML"
                code, text = await asyncio.to_thread(http, base + "/status/page")
                assert code == 200 and set(json.loads(text)["sections"]) == set(statuspage.SECTIONS)
                for private in ("100.101.0.1", "github.com", "gitlab.com", str(ipaddress.IPv4Address(addr))):
                    assert private not in html and private not in text, f"{base} page reveals {private}"
            code, html = await asyncio.to_thread(http, ro + "/")
            assert 'id="token"' not in html
            code, html = await asyncio.to_thread(http, ad + "/")
            assert 'id="token"' in html
            # everything else on the admin listener still needs the token
            for path in ("/pool/nodes", "/pool/lookup?node=100.101.0.10&domain=github.com", "/pool"):
                code, text = await asyncio.to_thread(http, ad + path)
                assert code == 401 and "github.com" not in text, path
            code, _ = await asyncio.to_thread(http, ad + "/", b"{}", {"Content-Type": "application/json"})
            assert code in (401, 405), "only GET of the page goes without the token"
            code, text = await asyncio.to_thread(http, ad + "/pool/nodes", None, {"Authorization": f"Bearer {token}"})
            assert code == 200 and json.loads(text) == {"pool_size": 255, "nodes": [
                {"node": "100.101.0.11", "mappings": 2}, {"node": "100.101.0.10", "mappings": 1}]}
            code, _ = await asyncio.to_thread(http, ro + "/pool/nodes")
            assert code == 404
        finally:
            await admin.stop()
            await status.stop()
            await pool.stop()
    asyncio.run(body())


def test_page_names_the_primary_subnet_router_from_tailscaleds_status(tmp_path: Path) -> None:
    """Tailscale mode: the page reads ``PrimaryRoutes`` from the LocalAPI (the stand-in, a real unix socket)."""
    from appconnector.tailnet.localapi import LocalAPIClient
    from tests.tailnet.helpers import base_state, started

    async def body() -> None:
        cfg, _ = _config(tmp_path)
        prefix = cfg.pool.prefixes[0]
        state = base_state()
        state["peers"][1]["primary_routes"] = [prefix, "10.9.0.0/24"]  # conn-2 serves the pool now
        sock = str(tmp_path / "tailscaled.sock")
        standin = await started(sock, state)
        pool = LocalPool(cfg.pool.prefixes)
        await pool.start()
        server = StatusServer(HttpSettings.from_config(cfg), pool, {}, tailnet=LocalAPIClient(sock))
        await server.start()
        try:
            code, html = await asyncio.to_thread(http, f"http://{cfg.http.listen}/")
            assert code == 200 and f'<span id="primary">{prefix}: conn-2</span>' in html
            # failover: tailscaled now routes the pool through this connector
            state["peers"][1]["primary_routes"] = []
            state["self"]["primary_routes"] = [prefix]
            standin.load_state(state)
            settings = HttpSettings.from_config(cfg)
            fresh = StatusServer(settings, pool, {}, tailnet=LocalAPIClient(sock)).page  # no cached status
            assert await fresh.primary() == f"{prefix}: conn-1 (this connector)"
            await standin.stop()
            gone = StatusServer(settings, pool, {}, tailnet=LocalAPIClient(sock)).page
            assert (await gone.primary()).startswith("unknown (tailscaled status failed")
        finally:
            await server.stop()
            await pool.stop()
            await standin.stop()
    asyncio.run(body())


def test_no_warning_in_the_product_formats_its_message_before_logging() -> None:
    """The page's warnings show ``record.msg`` only: an f-string, ``%`` or ``.format`` message would put
    its arguments (node names, domains, addresses) into the template and so onto the read-only page."""
    import ast

    from tests.ops.helpers import REPO

    bad = []
    for path in sorted((REPO / "appconnector").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("warning", "error", "critical", "exception") and node.args):
                continue
            for arg in node.args[:2]:  # RateLimitedLog.warning(key, msg, ...) has the message second
                formatted = (isinstance(arg, ast.JoinedStr)
                             or (isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod))
                             or (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute)
                                 and arg.func.attr == "format"))
                if formatted:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"log messages formatted before logging: {bad}"
