"""The read-only status/metrics listener and the admin listener over real sockets, and the CLI on them."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from appconnector import config
from appconnector.admin import AdminServer
from appconnector.config import Config
from appconnector.http import StatusServer
from appconnector.http_settings import HttpSettings
from appconnector.metrics import REGISTRY
from appconnector.pool.local import LocalPool
from appconnector.secrets_file import ensure_secret_file
from tests.ops.helpers import REPO, free_port, http
from tests.replicas import start_replica


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "appconnector.cli", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _config(tmp_path: Path) -> tuple[Config, Path]:
    """A standalone config on two free loopback ports, state (and so the admin token) in tmp_path/state."""
    path = tmp_path / "c.toml"
    path.write_text(f"""[tailnet]
mode = "standalone"
[cluster]
state_dir = "{tmp_path / 'state'}"
[http]
listen = "127.0.0.1:{free_port()}"
admin_listen = "127.0.0.1:{free_port()}"
""")
    (tmp_path / "state").mkdir(mode=0o700)
    return config.load(path, env={}), path


class RecordingPool(LocalPool):
    """A LocalPool that can be asked to remove a member: it records the request (nothing else to do)."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        super().__init__(tuple(prefixes))
        self.removed: list[str] = []

    async def remove_member(self, address: str) -> None:
        self.removed.append(address)


def _strings(doc: Any) -> Iterable[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _strings(v)
    else:
        yield str(doc)


def test_read_only_listener_serves_health_and_no_per_node_data(tmp_path: Path, replica_kind: str) -> None:
    async def body() -> None:
        cfg, cfg_path = _config(tmp_path)
        pool = await start_replica(replica_kind, cfg, str(tmp_path / "raft"))
        nft_ok = {"ok": True}
        server = StatusServer(HttpSettings.from_config(cfg), pool, {
            "leader": lambda: (True, "local"),
            "nftables": lambda: (nft_ok["ok"], "table inet appconnector present" if nft_ok["ok"] else "table missing"),
        })
        await server.start()
        base = f"http://{cfg.http.listen}"
        try:
            addr = await pool.checkout("100.101.0.10", "github.com", (int(ipaddress.IPv4Address("192.0.2.7")),), 60)
            code, text = await asyncio.to_thread(http, base + "/healthz")
            assert code == 200
            code, text = await asyncio.to_thread(http, base + "/readyz")
            assert code == 200 and json.loads(text)["ready"] is True
            code, text = await asyncio.to_thread(http, base + "/metrics")
            assert code == 200 and "appconnector_dns_queries" in text and "# TYPE" in text
            code, text = await asyncio.to_thread(http, base + "/cluster/members")
            members = ["local"] if replica_kind == "local" else [pool.status()["self"]]
            assert code == 200 and json.loads(text)["members"] == members
            code, text = await asyncio.to_thread(http, base + "/status")
            status = json.loads(text)
            assert code == 200 and status["pool"]["mappings"] == 1 and status["pool"]["nodes"] == 1, "counts"
            seen = " ".join(_strings(status))
            for private in ("100.101.0.10", "github.com", str(ipaddress.IPv4Address(addr)), "192.0.2.7"):
                assert private not in seen, f"/status reveals per-node data: {private}"
            # per-node data and changes are not on this listener (Prometheus may scrape it)
            for path in ("/pool", "/pool/lookup?node=100.101.0.10&domain=github.com"):
                code, text = await asyncio.to_thread(http, base + path)
                assert code == 404 and "github.com" not in text, path
            code, _ = await asyncio.to_thread(http, base + "/cluster/remove", b'{"member": "127.0.0.1:6270"}',
                                              {"Content-Type": "application/json"})
            assert code == 404

            rc, out, err = await _cli("status", "--config", str(cfg_path))
            assert rc == 0, err
            assert out.startswith("ready") and "nftables" in out
            rc, out, _ = await _cli("cluster", "members", "--config", str(cfg_path))
            assert rc == 0 and members[0] in out
            # a failing readiness check: /readyz 503, `status` exits 1 and names the check
            nft_ok["ok"] = False
            code, text = await asyncio.to_thread(http, base + "/readyz")
            assert code == 503 and json.loads(text)["checks"]["nftables"]["ok"] is False
            rc, out, _ = await _cli("status", "--http", cfg.http.listen)
            assert rc == 1 and "FAIL nftables: table missing" in out
        finally:
            await server.stop()
            await pool.stop()
    asyncio.run(body())


def test_admin_listener_needs_the_token_and_the_cli_sends_it(tmp_path: Path) -> None:
    async def body() -> None:
        cfg, cfg_path = _config(tmp_path)
        token = ensure_secret_file("http.admin_token_file", cfg.admin_token_path())
        pool = RecordingPool(cfg.pool.prefixes)
        await pool.start()
        server = AdminServer(HttpSettings.from_config(cfg), pool, pool, token)
        await server.start()
        base = f"http://{cfg.http.admin_listen}"
        auth = {"Authorization": f"Bearer {token}"}
        try:
            addr = await pool.checkout("100.101.0.10", "github.com", (int(ipaddress.IPv4Address("192.0.2.7")),), 60)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                            {"Authorization": token}, {"Cookie": f"token={token}"}):
                code, text = await asyncio.to_thread(http, base + "/pool", None, headers)
                assert code == 401 and "github.com" not in text, headers
            code, text = await asyncio.to_thread(http, base + f"/pool?token={token}")
            assert code == 401, "never a token in the query"

            code, text = await asyncio.to_thread(http, base + "/pool", None, auth)
            doc: dict[str, Any] = json.loads(text)
            assert code == 200 and doc["total"] == 1
            assert doc["mappings"][0] == {"node": "100.101.0.10", "domain": "github.com",
                                          "address": str(ipaddress.IPv4Address(addr)),
                                          "last_used": doc["mappings"][0]["last_used"]}
            # ages are measured on the pool's clock, which the answer carries (the CLI prints ages from it)
            assert 0 <= doc["pool_time"] - doc["mappings"][0]["last_used"] < 60
            code, text = await asyncio.to_thread(http, base + "/pool/lookup?node=100.101.0.10&domain=GitHub.com.",
                                                 None, auth)
            assert code == 200 and json.loads(text)["address"] == str(ipaddress.IPv4Address(addr))
            assert json.loads(text)["targets"] == ["192.0.2.7"]
            code, _ = await asyncio.to_thread(http, base + "/pool/lookup?node=100.101.0.10&domain=gitlab.com",
                                              None, auth)
            assert code == 404
            code, _ = await asyncio.to_thread(http, base + "/pool/lookup?node=100.101.0.10&domain=a..b", None, auth)
            assert code == 400

            member = b'{"member": "127.0.0.1:6270"}'
            code, _ = await asyncio.to_thread(http, base + "/cluster/remove", member,
                                              {"Content-Type": "application/json"})
            assert code == 401 and pool.removed == []
            # what a cross-site form can send: a simple content type (no CORS preflight), no token header
            for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
                code, _ = await asyncio.to_thread(http, base + "/cluster/remove", member,
                                                  {**auth, "Content-Type": ctype})
                assert code == 415, ctype
            assert pool.removed == [], "nothing removed without the token and a JSON body"
            code, _ = await asyncio.to_thread(http, base + "/cluster/remove", b"not json",
                                              {**auth, "Content-Type": "application/json"})
            assert code == 400

            # the command, with the token from the state directory named by the config
            rc, out, err = await _cli("pool", "lookup", "100.101.0.10", "github.com", "--config", str(cfg_path))
            assert rc == 0, err
            assert out.strip() == str(ipaddress.IPv4Address(addr))
            rc, _, _ = await _cli("pool", "lookup", "100.101.0.10", "gitlab.com", "--config", str(cfg_path))
            assert rc == 1
            rc, out, _ = await _cli("pool", "show", "--config", str(cfg_path))
            assert rc == 0 and "github.com" in out
            rc, out, err = await _cli("cluster", "remove", "127.0.0.9:6270", "--config", str(cfg_path))
            assert rc == 0 and pool.removed == ["127.0.0.9:6270"], err
            # another token (another instance's state directory): refused, exit 1, the key named
            cfg_path.write_text(cfg_path.read_text().replace(str(tmp_path / "state"), str(tmp_path / "other")))
            (tmp_path / "other").mkdir(mode=0o700)
            ensure_secret_file("http.admin_token_file", tmp_path / "other" / "admin.token")
            rc, out, err = await _cli("pool", "show", "--config", str(cfg_path))
            assert rc == 1 and "token was refused" in err and "http.admin_token_file" in err and not out
        finally:
            await server.stop()
            await pool.stop()
    asyncio.run(body())


JSON = {"Content-Type": "application/json"}
Client = TestClient[web.Request, web.Application]


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("appconnector_http_admin_refused_total", {"reason": reason}) or 0.0


@asynccontextmanager
async def _admin_client(tmp_path: Path, kind: type[LocalPool] = RecordingPool
                        ) -> AsyncIterator[tuple[Client, str, Any]]:
    cfg, _ = _config(tmp_path)
    pool = kind(cfg.pool.prefixes)
    await pool.start()
    token = ensure_secret_file("http.admin_token_file", cfg.admin_token_path())
    client = TestClient(TestServer(AdminServer(HttpSettings.from_config(cfg), pool, pool, token).app))
    await client.start_server()
    try:
        yield client, token, pool
    finally:
        await client.close()
        await pool.stop()


def test_admin_guard_answers_401_before_reading_anything(tmp_path: Path) -> None:
    async def body() -> None:
        async with _admin_client(tmp_path) as (client, token, pool):
            before = _refused("token")
            for path, method in (("/cluster/remove", "POST"), ("/pool", "GET"), ("/no-such", "GET"),
                                 ("/cluster/remove", "GET")):
                r = await client.request(method, path, data=b"\xff not json", headers=JSON)
                assert r.status == 401, (method, path)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert pool.removed == []
            assert _refused("token") == before + 4, "each refusal counted"
            # a body far over the limit is refused on the token, not read
            r = await client.post("/cluster/remove", data=b"x" * (4 << 20), headers=JSON)
            assert r.status == 401
            # with the token: routing and method rules apply (a GET cannot change anything)
            auth = {"Authorization": f"bearer {token}"}  # the scheme is case-insensitive (RFC 9110)
            r = await client.get("/cluster/remove", headers=auth)
            assert r.status == 405 and pool.removed == []
            r = await client.post("/cluster/remove", json={"member": "nowhere"}, headers=auth)
            assert r.status == 400 and pool.removed == []
            r = await client.post("/cluster/remove", json={"member": "127.0.0.5:6270"}, headers=auth)
            assert r.status == 200 and pool.removed == ["127.0.0.5:6270"]
    asyncio.run(body())


def test_admin_remove_on_a_single_process_pool_says_there_is_no_cluster(tmp_path: Path) -> None:
    """LocalPool has no membership: /cluster/remove answers 501 and says so (ReplicaControl.remove_member
    raises MembershipUnsupported), never a 500 or a silent success."""
    async def body() -> None:
        async with _admin_client(tmp_path, LocalPool) as (client, token, _pool):
            r = await client.post("/cluster/remove", json={"member": "127.0.0.5:6270"},
                                  headers={"Authorization": f"Bearer {token}"})
            assert r.status == 501
            assert "no cluster membership" in (await r.json())["error"]
    asyncio.run(body())


def test_raising_check_is_not_ready(tmp_path: Path, replica_kind: str) -> None:
    async def body() -> None:
        listen = f"127.0.0.1:{free_port()}"
        cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_HTTP_LISTEN": listen})
        pool = await start_replica(replica_kind, cfg, str(tmp_path / "raft"))

        def broken() -> tuple[bool, str]:
            raise RuntimeError("no raft yet")

        server = StatusServer(HttpSettings.from_config(cfg), pool, {"leader": broken})
        await server.start()
        try:
            code, text = await asyncio.to_thread(http, f"http://{listen}/readyz")
            assert code == 503 and "no raft yet" in text
            code, text = await asyncio.to_thread(http, f"http://{listen}/status")
            assert code == 200 and json.loads(text)["ready"] is False
        finally:
            await server.stop()
            await pool.stop()
    asyncio.run(body())


def test_admin_lookup_shows_a_domain_s_ipv6_targets(tmp_path: Path) -> None:
    """A domain resolved to IPv4 and IPv6 (with ``pool.prefixes6``) lists both in the admin lookup."""
    async def body() -> None:
        async with _admin_client(tmp_path) as (client, token, pool):
            v4, v6 = ipaddress.IPv4Address("192.0.2.7"), ipaddress.IPv6Address("2001:db8::7")
            await pool.checkout("100.101.0.10", "github.com", (int(v4), int(v6)), 60)
            r = await client.get("/pool/lookup?node=100.101.0.10&domain=github.com",
                                 headers={"Authorization": f"Bearer {token}"})
            assert r.status == 200, await r.text()
            assert (await r.json())["targets"] == ["192.0.2.7", "2001:db8::7"]
    asyncio.run(body())
