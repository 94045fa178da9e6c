"""Read-only status and metrics over HTTP on ``http.listen`` (default 127.0.0.1:8893).

=========================  ===========================================================================
``GET /metrics``           Prometheus text format of ``appconnector.metrics.REGISTRY``
``GET /healthz``           200 while the event loop answers (liveness)
``GET /readyz``            200 when every readiness check passes, else 503; JSON says which failed
``GET /status``            JSON: mode, Raft status, checks, pool counts (cluster health, nothing per node)
``GET /cluster/members``   JSON: role, leader, members
``GET /``                  the status page (HTML, ``appconnector.statuspage``): cluster health
``GET /status/page``       JSON the page's script refreshes itself from (its sections rendered again)
=========================  ===========================================================================

Nothing here is per node (no node's names or addresses) and nothing changes anything, so this is
the listener Prometheus may scrape from elsewhere. Per-node data and every change are on the admin
listener (``appconnector.admin``), behind the admin token; that listener serves the same page with
the lookup box, whose script calls its own origin (so no CORS is ever granted anywhere).

Readiness checks are callables returning ``(ok, detail)`` handed in by the app (leader known, caught
up, nftables in place); a check that raises counts as failed with the exception as its detail.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from appconnector import statuspage
from appconnector.http_settings import HttpSettings
from appconnector.metrics import REGISTRY
from appconnector.pool.api import ReplicaControl
from appconnector.statusdata import NatStatus, PageData, TailnetStatus

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


def json_response(doc: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(doc, indent=1, default=str) + "\n", status=status,
                        content_type="application/json", headers=headers)



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


async def start_site(app: web.Application, listen: tuple[str, int]) -> web.AppRunner:
    """Serve ``app`` on ``listen`` (host, port); the runner's cleanup() closes it."""
    host, port = listen
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def page_routes(page: PageData, *, admin: bool) -> list[web.RouteDef]:
    """``GET /`` (the page) and ``GET /status/page`` (its refresh) over ``page``; ``admin``: the
    admin listener's copy, with the lookup box."""
    async def html(request: web.Request) -> web.Response:
        doc = await page.document()
        return web.Response(text=statuspage.page(doc, admin=admin), content_type="text/html",
                            headers=PAGE_HEADERS)

    async def refresh(request: web.Request) -> web.Response:
        doc = await page.document()
        return web.Response(text=statuspage.refresh_doc({**doc, "admin": admin}), content_type="application/json",
                            headers=PAGE_HEADERS)
    return [web.get(PAGE_PATHS[0], html), web.get(PAGE_PATHS[1], refresh)]


PAGE_PATHS = ("/", "/status/page")


# Inline script and style only, nothing from elsewhere, fetches to this origin only, never in a frame.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                           "frame-ancestors 'none'",
                "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class StatusServer:
    """The read-only endpoints above. ``start()`` binds ``settings.listen``; ``stop()`` closes it."""

    def __init__(self, settings: HttpSettings, replica: ReplicaControl, checks: Mapping[str, Check], *,
                 nat: NatStatus | None = None, tailnet: TailnetStatus | None = None) -> None:
        self.settings = settings
        self.replica = replica
        self.checks = dict(checks)
        self.page = PageData(settings, replica, self.checks, run_checks, nat=nat, tailnet=tailnet)
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.add_routes([
            web.get("/metrics", self._metrics), web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz), web.get("/status", self._status),
            web.get("/cluster/members", self._members), *page_routes(self.page, admin=False),
        ])

    async def start(self) -> None:
        self._runner = await start_site(self.app, self.settings.listen_at)
        log.info("status page and metrics (read-only) on http://%s/ (/metrics, /healthz, /readyz, /status, "
                 "/cluster/members)", self.settings.listen)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers -------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response({"ok": True})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, checks = run_checks(self.checks)
        return json_response({"ready": ok, "checks": checks}, 200 if ok else 503)

    def _pool_counts(self) -> dict[str, object]:
        try:
            return dict(self.replica.stats())
        except Exception as e:
            return {"error": repr(e)}

    async def _status(self, request: web.Request) -> web.Response:
        ready, checks = run_checks(self.checks)
        counts = await asyncio.to_thread(self._pool_counts)
        return json_response({
            "service": "appconnector", "mode": self.settings.mode, "config": self.settings.source, "ready": ready,
            "checks": checks, "raft": self.replica.status(), "pool": {
                "prefixes": list(self.settings.pool_prefixes), **counts},
            "dns_listen": list(self.settings.dns_listen),
        })

    async def _members(self, request: web.Request) -> web.Response:
        st = self.replica.status()
        return json_response({k: st.get(k) for k in ("self", "role", "leader", "term", "members", "connected",
                                            "membership", "commit_index", "applied_index") if k in st})

