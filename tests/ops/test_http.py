"""The status/metrics HTTP server over a real socket, and the CLI talking to it."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from appconnector import config
from appconnector.http import StatusServer
from appconnector.pool.local import LocalPool
from tests.ops.helpers import REPO, free_port


def _get(url: str, data: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "appconnector.cli", *args, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_endpoints_and_cli(tmp_path: Path) -> None:
    async def body() -> None:
        port = free_port()
        listen = f"127.0.0.1:{port}"
        cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_HTTP_LISTEN": listen,
                                     "APPCONNECTOR_CLUSTER_STATE_DIR": str(tmp_path)})
        pool = LocalPool(cfg.pool.prefixes)
        await pool.start()
        nft_ok = {"ok": True}
        server = StatusServer(cfg, pool, {
            "leader": lambda: (True, "local"),
            "nftables": lambda: (nft_ok["ok"], "table inet appconnector present" if nft_ok["ok"] else "table missing"),
        })
        await server.start()
        base = f"http://{listen}"
        try:
            addr = await pool.checkout("100.101.0.10", "github.com", (int(ipaddress.IPv4Address("192.0.2.7")),), 60)
            code, text = await asyncio.to_thread(_get, base + "/healthz")
            assert code == 200
            code, text = await asyncio.to_thread(_get, base + "/readyz")
            assert code == 200 and json.loads(text)["ready"] is True
            code, text = await asyncio.to_thread(_get, base + "/metrics")
            assert code == 200 and "appconnector_dns_queries" in text and "# TYPE" in text
            code, text = await asyncio.to_thread(_get, base + "/pool")
            doc: dict[str, Any] = json.loads(text)
            assert doc["total"] == 1
            assert doc["mappings"][0] == {"node": "100.101.0.10", "domain": "github.com",
                                          "address": str(ipaddress.IPv4Address(addr)),
                                          "last_used": doc["mappings"][0]["last_used"]}
            code, text = await asyncio.to_thread(_get, base + "/pool/lookup?node=100.101.0.10&domain=GitHub.com.")
            assert code == 200 and json.loads(text)["address"] == str(ipaddress.IPv4Address(addr))
            assert json.loads(text)["targets"] == ["192.0.2.7"]
            code, _ = await asyncio.to_thread(_get, base + "/pool/lookup?node=100.101.0.10&domain=gitlab.com")
            assert code == 404
            code, _ = await asyncio.to_thread(_get, base + "/pool/lookup?node=100.101.0.10&domain=a..b")
            assert code == 400
            code, text = await asyncio.to_thread(_get, base + "/cluster/members")
            assert code == 200 and json.loads(text)["members"] == ["local"]
            code, _ = await asyncio.to_thread(_get, base + "/cluster/remove", b'{"member": "127.0.0.1:6270"}')
            assert code == 501  # LocalPool has no membership
            code, _ = await asyncio.to_thread(_get, base + "/cluster/remove", b"not json")
            assert code == 400

            # the command against the running server
            rc, out, err = await _cli("status", "--http", listen)
            assert rc == 0, err
            assert out.startswith("ready") and "nftables" in out
            rc, out, _ = await _cli("pool", "lookup", "100.101.0.10", "github.com", "--http", listen)
            assert rc == 0 and out.strip() == str(ipaddress.IPv4Address(addr))
            rc, _, _ = await _cli("pool", "lookup", "100.101.0.10", "gitlab.com", "--http", listen)
            assert rc == 1
            rc, out, _ = await _cli("pool", "show", "--http", listen)
            assert rc == 0 and "github.com" in out
            rc, out, _ = await _cli("cluster", "members", "--http", listen)
            assert rc == 0 and "local" in out

            # a failing readiness check: /readyz 503, `status` exits 1 and names the check
            nft_ok["ok"] = False
            code, text = await asyncio.to_thread(_get, base + "/readyz")
            assert code == 503 and json.loads(text)["checks"]["nftables"]["ok"] is False
            rc, out, _ = await _cli("status", "--http", listen)
            assert rc == 1 and "FAIL nftables: table missing" in out
        finally:
            await server.stop()
            await pool.stop()
    asyncio.run(body())


def test_raising_check_is_not_ready(tmp_path: Path) -> None:
    async def body() -> None:
        listen = f"127.0.0.1:{free_port()}"
        cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_HTTP_LISTEN": listen})
        pool = LocalPool(cfg.pool.prefixes)

        def broken() -> tuple[bool, str]:
            raise RuntimeError("no raft yet")

        server = StatusServer(cfg, pool, {"leader": broken})
        await server.start()
        try:
            code, text = await asyncio.to_thread(_get, f"http://{listen}/readyz")
            assert code == 503 and "no raft yet" in text
            code, text = await asyncio.to_thread(_get, f"http://{listen}/status")
            assert code == 200 and json.loads(text)["ready"] is False
        finally:
            await server.stop()
    asyncio.run(body())
