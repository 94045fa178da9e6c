"""Status and metrics over HTTP on ``http.listen`` (default 127.0.0.1:8893; keep it local).

=========================  ===========================================================================
``GET /metrics``           Prometheus text format of ``appconnector.metrics.REGISTRY``
``GET /healthz``           200 while the event loop answers (liveness)
``GET /readyz``            200 when every readiness check passes, else 503; JSON says which failed
``GET /status``            JSON: mode, Raft status, checks, pool counts
``GET /pool``              JSON: mappings (``?node=`` filters, ``?limit=`` caps, default 1000)
``GET /pool/lookup``       ``?node=&domain=`` → the node's address for the domain, 404 when unmapped
``GET /cluster/members``   JSON: role, leader, members
``POST /cluster/remove``   ``{"member": "ip:port"}`` → the replica removes the member (via Raft)
=========================  ===========================================================================

Readiness checks are callables returning ``(ok, detail)`` handed in by the app (leader known, caught
up, nftables in place); a check that raises counts as failed with the exception as its detail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from appconnector.config import Config, parse_hostport
from appconnector.metrics import REGISTRY
from appconnector.pool.api import PoolError, Replica
from appconnector.pool.names import normalise_domain

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
DEFAULT_POOL_LIMIT = 1000


def _addr(a: int) -> str:
    return str(ipaddress.IPv4Address(a))


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(doc, indent=1, default=str) + "\n", status=status,
                        content_type="application/json")


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict[str, dict[str, object]]]:
    """Run every check; (all ok, {name: {"ok": …, "detail": …}})."""
    out: dict[str, dict[str, object]] = {}
    for name, check in checks.items():
        try:
            ok, detail = check()
        except Exception as e:  # a broken check means "not ready", never a 500
            ok, detail = False, f"check failed: {e!r}"
        out[name] = {"ok": bool(ok), "detail": detail}
    return all(c["ok"] for c in out.values()), out


class StatusServer:
    """The HTTP endpoints above. ``start()`` binds ``cfg.http.listen``; ``stop()`` closes it."""

    def __init__(self, cfg: Config, replica: Replica, checks: Mapping[str, Check]) -> None:
        self.cfg = cfg
        self.replica = replica
        self.checks = dict(checks)
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.add_routes([
            web.get("/metrics", self._metrics), web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz), web.get("/status", self._status), web.get("/pool", self._pool),
            web.get("/pool/lookup", self._lookup), web.get("/cluster/members", self._members),
            web.post("/cluster/remove", self._remove),
        ])

    async def start(self) -> None:
        host, port = parse_hostport("http.listen", self.cfg.http.listen)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        log.info("status and metrics on http://%s/ (/metrics, /healthz, /readyz, /status, /pool, /cluster/members)",
                 self.cfg.http.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers -------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, checks = run_checks(self.checks)
        return _json({"ready": ok, "checks": checks}, 200 if ok else 503)

    def _pool_counts(self) -> dict[str, object]:
        stats = getattr(self.replica, "stats", None)
        if callable(stats):
            try:
                return dict(stats())
            except Exception as e:
                return {"error": repr(e)}
        nodes: set[str] = set()
        n = 0
        for m in self.replica.mappings():
            n += 1
            nodes.add(m.node)
        return {"mappings": n, "nodes": len(nodes)}

    async def _status(self, request: web.Request) -> web.Response:
        ready, checks = run_checks(self.checks)
        counts = await asyncio.to_thread(self._pool_counts)
        return _json({
            "service": "appconnector", "mode": self.cfg.tailnet.mode, "config": self.cfg.source, "ready": ready,
            "checks": checks, "raft": self.replica.status(), "pool": {
                "prefixes": list(self.cfg.pool.prefixes), **counts},
            "dns_listen": [f"{h}:{p}" for h, p in self.cfg.dns_listen()],
        })

    async def _pool(self, request: web.Request) -> web.Response:
        node = request.query.get("node")
        try:
            limit = int(request.query.get("limit", DEFAULT_POOL_LIMIT))
        except ValueError:
            return _json({"error": "limit must be a whole number"}, 400)
        # a million mappings take about a second to copy: off the event loop, so DNS keeps answering
        total, rows = await asyncio.to_thread(self._pool_rows, node, limit)
        return _json({"total": total, "shown": len(rows), "mappings": rows})

    def _pool_rows(self, node: str | None, limit: int) -> tuple[int, list[dict[str, object]]]:
        rows: list[dict[str, object]] = []
        total = 0
        for m in self.replica.mappings():
            if node is not None and m.node != node:
                continue
            total += 1
            if len(rows) < limit:
                rows.append({"node": m.node, "domain": m.domain, "address": _addr(m.address),
                             "last_used": m.last_used})
        rows.sort(key=lambda r: (str(r["node"]), str(r["domain"])))
        return total, rows

    async def _lookup(self, request: web.Request) -> web.Response:
        node, domain = request.query.get("node", ""), request.query.get("domain", "")
        if not node or not domain:
            return _json({"error": "give both node= and domain="}, 400)
        try:
            domain = normalise_domain(domain)
        except ValueError as e:
            return _json({"error": str(e)}, 400)
        found = self.replica.lookup(node, domain)
        if found is None:
            return _json({"node": node, "domain": domain, "error": "not mapped"}, 404)
        address, last_used = found
        return _json({"node": node, "domain": domain, "address": _addr(address), "last_used": last_used,
                      "targets": [_addr(t) for t in self.replica.targets(domain)]})

    async def _members(self, request: web.Request) -> web.Response:
        st = self.replica.status()
        return _json({k: st.get(k) for k in ("self", "role", "leader", "term", "members", "connected",
                                            "membership", "commit_index", "applied_index") if k in st})

    async def _remove(self, request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return _json({"error": 'body must be JSON: {"member": "ip:port"}'}, 400)
        member = body.get("member") if isinstance(body, dict) else None
        if not isinstance(member, str):
            return _json({"error": 'body must be JSON: {"member": "ip:port"}'}, 400)
        try:
            parse_hostport("member", member)
        except ValueError as e:
            return _json({"error": str(e)}, 400)
        remove = getattr(self.replica, "remove_member", None)
        if remove is None:
            return _json({"error": "this replica has no cluster membership to change"}, 501)
        try:
            await remove(member)
        except (PoolError, ValueError, KeyError) as e:
            return _json({"error": str(e), "member": member}, 409)
        log.warning("cluster member %s removed on request", member)
        return _json({"removed": member})
