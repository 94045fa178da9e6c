"""Admin endpoints on ``http.admin_listen`` (default 127.0.0.1:8894): per-node data and every change.

=========================  ===========================================================================
``GET /pool``              JSON: mappings (``?node=`` filters, ``?limit=`` caps, default 1000)
``GET /pool/lookup``       ``?node=&domain=`` → the node's address for the domain, 404 when unmapped
``GET /pool/nodes``        JSON: mappings per node, fullest first (the page's per-node bar list)
``POST /cluster/remove``   ``{"member": "ip:port"}`` → the replica removes the member (via Raft)
``GET /``                  the status page with the lookup box (no token needed: cluster health only)
=========================  ===========================================================================

Every request carries ``Authorization: Bearer <token>``, the token in ``http.admin_token_file``
(made at first start, 0600, in the state directory; the CLI reads it there). Without it, or with
another, the answer is 401 before the body is read or anything is done (constant-time compare).
A request that is not GET must be ``Content-Type: application/json`` (else 415): a cross-site
browser form cannot send that without a CORS preflight, which this server never grants. The token
is never taken from a cookie or the query, so no cross-site request can carry it.

The status page (``GET /`` and its refresh ``GET /status/page``) is the one thing served without
the token: it shows what the read-only listener shows. It is here so that its lookup box calls
this origin: the script sends the token typed into the page as an ``Authorization`` header to
``/pool/lookup`` on the same origin, and no CORS allowance is needed (none is ever granted).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appconnector import metrics
from appconnector.config import parse_hostport
from appconnector.http import PAGE_PATHS, json_response, page_routes, start_site
from appconnector.http_settings import HttpSettings
from appconnector.pool.addresses import format_address
from appconnector.pool.api import MembershipUnsupported, PoolAccess, PoolError, ReplicaControl
from appconnector.pool.names import normalise_domain
from appconnector.ratelimit import RateLimitedLog
from appconnector.statusdata import PageData

log = logging.getLogger(__name__)

DEFAULT_POOL_LIMIT = 1000
MAX_BODY = 64 * 1024  # the largest admin body is one member address
REALM = 'Bearer realm="appconnector admin"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_matches(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``, compared in constant time."""
    scheme, _, given = header.strip().partition(" ")
    return (scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode()))


class AdminServer:
    """The admin endpoints above. ``start()`` binds ``settings.admin_listen``; ``stop()`` closes it.
    ``pool`` is read (per-node data), ``control`` changes the membership and gives the pool size."""

    def __init__(self, settings: HttpSettings, pool: PoolAccess, control: ReplicaControl, token: str,
                 page: PageData | None = None) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self.settings = settings
        self.replica = pool
        self.control = control
        self._token = token
        self._refusals = RateLimitedLog(log)
        self._runner: web.AppRunner | None = None
        self._page = page
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        self.app.add_routes([
            web.get("/pool", self._pool), web.get("/pool/lookup", self._lookup),
            web.get("/pool/nodes", self._nodes), web.post("/cluster/remove", self._remove),
            *(page_routes(page, admin=True) if page is not None else []),
        ])

    async def start(self) -> None:
        self._runner = await start_site(self.app, self.settings.admin_listen_at)
        log.info("admin (token in %s) on http://%s/ (/pool, /pool/lookup, /cluster/remove)",
                 self.settings.admin_token_path, self.settings.admin_listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- the guard: token first, then the content type, before any handler runs ---------------------

    def _refuse(self, request: web.Request, reason: str, status: int, error: str) -> web.Response:
        metrics.HTTP_ADMIN_REFUSED.labels(reason).inc()
        self._refusals.warning(reason, "admin request refused (%s): %s %s from %s", reason, request.method,
                               request.path, request.remote)
        headers = {"WWW-Authenticate": REALM} if status == 401 else None
        return json_response({"error": error}, status, headers)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._page is not None and request.method == "GET" and request.path in PAGE_PATHS:
            return await handler(request)  # the page: cluster health only, as on the read-only listener
        if not bearer_matches(request.headers.get("Authorization", ""), self._token):
            return self._refuse(request, "token", 401, "admin token required: Authorization: Bearer <token> "
                                "(the token is in http.admin_token_file)")
        if request.method not in ("GET", "HEAD") and request.content_type != "application/json":
            return self._refuse(request, "content_type", 415, "Content-Type must be application/json")
        return await handler(request)

    # ---- handlers -------------------------------------------------------------------------------

    async def _pool(self, request: web.Request) -> web.Response:
        node = request.query.get("node")
        try:
            limit = int(request.query.get("limit", DEFAULT_POOL_LIMIT))
            if limit < 0:
                raise ValueError(limit)
        except ValueError:
            return json_response({"error": "limit must be a whole number, 0 or more"}, 400)
        # a million mappings take about a second to copy: off the event loop, so DNS keeps answering
        total, rows = await asyncio.to_thread(self._pool_rows, node, limit)
        # last-used marks are pool-clock times: the pool's own now is what their ages are measured from
        return json_response({"total": total, "shown": len(rows), "mappings": rows,
                              "pool_time": self.replica.now()})

    def _pool_rows(self, node: str | None, limit: int) -> tuple[int, list[dict[str, object]]]:
        rows: list[dict[str, object]] = []
        total = 0
        for m in self.replica.mappings():
            if node is not None and m.node != node:
                continue
            total += 1
            if len(rows) < limit:
                rows.append({"node": m.node, "domain": m.domain, "address": format_address(m.address),
                             "last_used": m.last_used})
        rows.sort(key=lambda r: (str(r["node"]), str(r["domain"])))
        return total, rows

    async def _nodes(self, request: web.Request) -> web.Response:
        counts = await asyncio.to_thread(self._node_counts)
        size = self.control.stats().get("pool_size")
        return json_response({"pool_size": size, "nodes": [{"node": n, "mappings": c} for n, c in counts]})

    def _node_counts(self) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for m in self.replica.mappings():
            counts[m.node] = counts.get(m.node, 0) + 1
        return sorted(counts.items(), key=lambda nc: (-nc[1], nc[0]))

    async def _lookup(self, request: web.Request) -> web.Response:
        node, domain = request.query.get("node", ""), request.query.get("domain", "")
        if not node or not domain:
            return json_response({"error": "give both node= and domain="}, 400)
        try:
            domain = normalise_domain(domain)
        except ValueError as e:
            return json_response({"error": str(e)}, 400)
        found = self.replica.lookup(node, domain)
        if found is None:
            return json_response({"node": node, "domain": domain, "error": "not mapped"}, 404)
        address, last_used = found
        return json_response({"node": node, "domain": domain, "address": format_address(address),
                              "last_used": last_used,
                              "targets": [format_address(t) for t in self.replica.targets(domain)]})

    async def _remove(self, request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            return json_response({"error": 'body must be JSON: {"member": "ip:port"}'}, 400)
        member = body.get("member") if isinstance(body, dict) else None
        if not isinstance(member, str):
            return json_response({"error": 'body must be JSON: {"member": "ip:port"}'}, 400)
        try:
            parse_hostport("member", member)
        except ValueError as e:
            return json_response({"error": str(e)}, 400)
        try:
            await self.control.remove_member(member)
        except MembershipUnsupported as e:
            return json_response({"error": str(e)}, 501)
        except (PoolError, ValueError, KeyError) as e:
            return json_response({"error": str(e), "member": member}, 409)
        log.warning("cluster member %s removed on request", member)
        return json_response({"removed": member})
