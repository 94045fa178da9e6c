"""Per-app access on the real control plane: a headscale grant (``grants[].app`` with the connector's
capability) lets alice's node resolve and reach the app through the connector, bob's node (no grant)
gets REFUSED and no mapping, and a policy reload (SIGHUP) that drops the grant takes alice's mapping
out of the pool, stops her flow and turns her answers into REFUSED within the stated bound."""

from __future__ import annotations

import time
from collections.abc import Iterator

import dns.exception
import dns.rcode
import pytest

from tests.realnet.tailnet import MEASURED, POOL_DNS, SERVED, TAG, Node, Tailnet, running, wait_for

CAP = "appconnector.example/cap/apps"
RECHECK = 2.0
BOUND = 60.0  # seconds: headscale's push + one recheck + a commit (measured below); generous
APPS = """
[[apps]]
name = "web"
domains = ["web.app.test"]
"""


@pytest.fixture(scope="module")
def gn(_peers_present: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    with running(tmp_path_factory.mktemp("realnet-grants"), "gr") as net:
        net.serve_origin(SERVED)
        c1 = net.connector("c1")
        net.client("cl1", user="alice")
        net.client("cl2", user="bob")
        net.wait_online()
        cfg = c1.write_config(extra=APPS).read_text().replace(
            'interface = "tailscale0"', f'interface = "tailscale0"\naccess_recheck = "{RECHECK:.0f}s"')
        (c1.dir / "grants.toml").write_text(cfg)
        c1.start_appconnector(c1.dir / "grants.toml")
        yield net


def _rcode(client: Node, name: str) -> tuple[int, list[str]] | None:
    try:
        return client.resolve(name, server=POOL_DNS, timeout=3)
    except (dns.exception.Timeout, OSError):  # the route may still be settling
        return None


def _mapped(c1: Node, client: Node) -> bool:
    code, doc = c1.http_get("/pool?limit=1000", admin=True)
    assert code == 200, code
    return any(m["node"] == client.stable_id() and m["domain"].rstrip(".") == "web.app.test"
               for m in doc["mappings"])


def test_grant_allows_alice_refuses_bob_and_a_reload_revokes(gn: Tailnet) -> None:
    c1, cl1, cl2 = gn.nodes["c1"], gn.nodes["cl1"], gn.nodes["cl2"]
    # no grant yet: every node is refused (a CapMap without the capability gives no app)
    got = wait_for(lambda: _rcode(cl1, "web.app.test"), 60, lambda: f"an answer from {POOL_DNS}: "
                   f"{c1.connector_log()[-2000:]}")
    assert got[0] == dns.rcode.REFUSED, got
    grant = {"src": ["alice@"], "dst": [TAG], "app": {CAP: [{"apps": ["web"]}]}}
    gn.set_policy(gn.policy(grants=[grant]))
    try:
        def granted() -> str | None:
            r = _rcode(cl1, "web.app.test")
            return r[1][0] if r and r[0] == dns.rcode.NOERROR and r[1] else None
        addr = str(wait_for(granted, BOUND, lambda: f"alice granted: {c1.connector_log()[-2000:]}"))
        assert cl1.http(addr).startswith("origin "), "alice reaches the app through the connector"
        assert _mapped(c1, cl1)
        bob = _rcode(cl2, "web.app.test")
        assert bob is not None and bob[0] == dns.rcode.REFUSED and not bob[1], bob
        assert not _mapped(c1, cl2), "a refused query makes no mapping"
    finally:
        gn.set_policy(gn.policy())
    revoked = time.monotonic()
    wait_for(lambda: not _mapped(c1, cl1), BOUND,
             lambda: f"alice's mapping released after the grant went: {c1.connector_log()[-2000:]}")
    released = time.monotonic() - revoked
    after = _rcode(cl1, "web.app.test")
    assert after is not None and after[0] == dns.rcode.REFUSED, after

    def stopped() -> bool:
        try:
            cl1.http(addr, timeout=2)
            return False
        except OSError:
            return True
    wait_for(stopped, 10, f"alice's flows to {addr} to stop")
    MEASURED.append(f"grant revoked by a headscale reload → mapping released in {released:.1f} s "
                    f"(access_recheck {RECHECK:.0f} s)")
