"""Per-app access from the tailnet's grants: real DNS over loopback, the LocalAPI stand-in serving
whois ``CapMap`` as tailscaled does, a LocalPool. A granted and a non-granted client side by side, a
static tag rule, names outside every app, and revocation (the stand-in's CapMap changes: the mapping
leaves the pool within the bound and the answer becomes REFUSED)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dns.rcode
import pytest

from appconnector.config import Config, load
from appconnector.pool.api import ReplicaUnavailable
from appconnector.pool.local import LocalPool
from appconnector.tailnet.api import NodeDirectory, NodeIdentity
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.identity import TailnetIdentity
from appconnector.tailnet.localapi import LocalAPIClient
from tests.dns.conftest import POOL, Running, Unbound, free_port, wait_until
from tests.dns.test_service_modes import Start, a_of, metric
from tests.localapi_standin import Standin

CAP = "appconnector.example/cap/apps"
RECHECK = 1.0

APPS_TOML = f"""
[tailnet]
mode = "{{mode}}"
access_recheck = "{RECHECK:.0f}s"

[[apps]]
name = "web"
domains = ["app.test", "*.allowed.test"]
{{web_rule}}

[[apps]]
name = "other"
domains = ["other.test"]
"""


def grants_config(tmp_path: Path, unbound: Unbound, mode: str, web_rule: str = "") -> Config:
    path = tmp_path / "appconnector.toml"
    path.write_text(APPS_TOML.format(mode=mode, web_rule=web_rule))
    return load(path, env={
        "APPCONNECTOR_DNS_LISTEN": f"127.0.0.1:{free_port()}",
        "APPCONNECTOR_DNS_UPSTREAM": f"127.0.0.1:{unbound.port}",
        "APPCONNECTOR_POOL_PREFIXES": POOL, "APPCONNECTOR_NAT_ENABLED": "false",
        "APPCONNECTOR_CLUSTER_STATE_DIR": str(tmp_path / "state"),
    })


PEERS = [
    {"stable_id": "nAlice", "name": "alice", "addresses": ["127.0.0.2"], "login": "alice@example.com",
     "capmap": {CAP: [{"apps": ["web"]}]}},
    {"stable_id": "nBob", "name": "bob", "addresses": ["127.0.0.3"], "login": "bob@example.com"},
    {"stable_id": "nCi", "name": "ci", "addresses": ["127.0.0.4"], "tags": ["tag:ci"]},
]


@pytest.fixture
def tailnet(running: Start, unbound: Unbound, tmp_path: Path) -> Iterator[tuple[Running, Standin]]:
    sock = str(tmp_path / "tailscaled.sock")
    standin = Standin(sock, {"peers": PEERS})

    async def identity() -> tuple[NodeIdentity, NodeDirectory]:
        await standin.start()
        directory = TailnetDirectory(LocalAPIClient(sock))
        await directory.start()
        return TailnetIdentity(LocalAPIClient(sock), directory), directory

    r = running(grants_config(tmp_path, unbound, "tailscale", 'tags = ["tag:ci"]'), identity_factory=identity)
    yield r, standin
    assert isinstance(r.directory, TailnetDirectory)
    r.call(r.directory.stop())
    r.call(standin.stop())


def test_granted_and_not_granted_clients_side_by_side(tailnet: tuple[Running, Standin]) -> None:
    r, _ = tailnet
    before = metric("appconnector_dns_refused_by_policy_total", app="web")
    m = r.query("app.test", source="127.0.0.2")                 # alice: granted "web"
    assert m.rcode() == dns.rcode.NOERROR and len(a_of(m)) == 1
    assert r.pool.lookup("nAlice", "app.test") is not None
    m = r.query("app.test", source="127.0.0.3")                 # bob: no grant
    assert m.rcode() == dns.rcode.REFUSED and not m.answer
    assert r.pool.lookup("nBob", "app.test") is None            # no mapping: nothing to steer
    assert metric("appconnector_dns_refused_by_policy_total", app="web") == before + 1
    assert r.query("x.allowed.test", source="127.0.0.4").rcode() == dns.rcode.NOERROR  # tag:ci, static rule
    assert r.query("other.test", source="127.0.0.2").rcode() == dns.rcode.REFUSED      # another app
    none_before = metric("appconnector_dns_refused_by_policy_total", app="(none)")
    assert r.query("loop.test", source="127.0.0.2").rcode() == dns.rcode.REFUSED       # no app covers it
    assert metric("appconnector_dns_refused_by_policy_total", app="(none)") == none_before + 1


def test_revoked_grant_releases_the_mapping_and_refuses_within_the_bound(tailnet: tuple[Running, Standin]) -> None:
    r, standin = tailnet
    for _ in range(3):  # the first answer makes the mapping, the others are hits (fast path)
        assert r.query("app.test", source="127.0.0.2").rcode() == dns.rcode.NOERROR
    assert r.pool.lookup("nAlice", "app.test") is not None
    r.call(_set_capmap(standin, "nAlice", {}))
    revoked = time.monotonic()
    # bound: one recheck interval plus a commit; asserted generously (twice the interval, plus slack)
    wait_until(lambda: r.pool.lookup("nAlice", "app.test") is None, 2 * RECHECK + 3,
               "the revoked mapping to leave the pool")
    assert time.monotonic() - revoked < 2 * RECHECK + 3
    m = r.query("app.test", source="127.0.0.2")
    assert m.rcode() == dns.rcode.REFUSED and not m.answer
    assert r.pool.lookup("nAlice", "app.test") is None
    # granted again: served again, without a netmap change either
    r.call(_set_capmap(standin, "nAlice", {CAP: [{"apps": ["other"]}, {"apps": ["web"]}]}))
    wait_until(lambda: r.query("app.test", source="127.0.0.2").rcode() == dns.rcode.NOERROR, 2 * RECHECK + 3,
               "a new grant to be honoured")


async def _set_capmap(standin: Standin, node: str, capmap: dict[str, list[object]]) -> None:
    standin.set_capmap(node, capmap)


def test_standalone_static_rules_match_source_prefixes(running: Start, unbound: Unbound, tmp_path: Path) -> None:
    r = running(grants_config(tmp_path, unbound, "standalone", 'sources = ["127.0.0.2/32"]'))
    assert r.query("app.test", source="127.0.0.2").rcode() == dns.rcode.NOERROR
    assert r.query("app.test", source="127.0.0.3").rcode() == dns.rcode.REFUSED
    assert r.pool.lookup("127.0.0.3", "app.test") is None


def test_hits_are_refused_when_the_release_cannot_commit(tailnet: tuple[Running, Standin]) -> None:
    """Without a quorum the release cannot commit and the mapping stays in this member's pool, yet its
    answers (fast path and local hits) are REFUSED once the grant is gone."""
    r, standin = tailnet
    for _ in range(3):
        assert r.query("app.test", source="127.0.0.2").rcode() == dns.rcode.NOERROR

    async def no_quorum(pairs: object) -> None:
        raise ReplicaUnavailable("write not committed (no leader?)")
    r.pool.release = no_quorum  # type: ignore[method-assign,assignment]
    r.call(_set_capmap(standin, "nAlice", {}))
    wait_until(lambda: r.query("app.test", source="127.0.0.2").rcode() == dns.rcode.REFUSED, 2 * RECHECK + 3,
               "a hit of the revoked node to be refused")
    assert r.pool.lookup("nAlice", "app.test") is not None  # still mapped: the release did not commit
    assert r.query("app.test", source="127.0.0.2", tcp=True).rcode() == dns.rcode.REFUSED


def test_the_leader_sweep_releases_mappings_no_member_has_cached(running: Start, unbound: Unbound,
                                                                 tmp_path: Path) -> None:
    """Mappings made before this member ran (another member, an earlier run) of a node without
    access go at the leader's first sweep, although no query of that node was seen here."""
    sock = str(tmp_path / "tailscaled.sock")
    standin = Standin(sock, {"peers": PEERS})
    cfg = grants_config(tmp_path, unbound, "tailscale")
    pool = LocalPool(cfg.pool.prefixes, reuse_after=cfg.pool.reuse_after)

    async def identity() -> tuple[NodeIdentity, NodeDirectory]:
        await standin.start()
        await pool.start()
        await pool.checkout("nBob", "app.test", (), 60.0)    # bob has no grant for web
        await pool.checkout("nAlice", "app.test", (), 60.0)  # alice has
        directory = TailnetDirectory(LocalAPIClient(sock))
        await directory.start()
        return TailnetIdentity(LocalAPIClient(sock), directory), directory

    r = running(cfg, identity_factory=identity, pool=pool)
    try:
        wait_until(lambda: r.pool.lookup("nBob", "app.test") is None, 2 * RECHECK + 3, "bob's mapping to go")
        assert r.pool.lookup("nAlice", "app.test") is not None
    finally:
        assert isinstance(r.directory, TailnetDirectory)
        r.call(r.directory.stop())
        r.call(standin.stop())
