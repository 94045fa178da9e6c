"""Advertise the pool prefixes as subnet routes, without wiping anyone else's.

tailscaled's prefs PATCH copies a field as given when its ``…Set`` flag is true, so sending
``AdvertiseRoutesSet`` with only our prefixes would drop every route an operator (or another
program) advertised. We read the prefs first and send the union; withdrawing removes only ours.
tailscaled has no compare-and-swap, so a concurrent editor can still race us between GET and
PATCH: we read back after writing and retry a few times if our routes are missing.

Withdrawing removes only the routes this product added: each route we add is first recorded in
``<cluster.state_dir>/advertised-routes.json`` (before the PATCH, so a crash in between cannot leave an
unrecorded route), a route that was already advertised when we came is never recorded, and withdrawal
removes exactly the recorded ones. The record outlives a crash, so ``appconnector routes withdraw``
(the systemd unit's ``ExecStopPost``) can take the routes back after a kill -9 while tailscaled stays up.

Routes need approval (admin console, ``autoApprovers`` in the policy file, or the control API). With
an API key or OAuth client configured (``tailnet.api_key_file`` / ``tailnet.oauth_client_id`` +
``tailnet.oauth_secret_file``) we enable our routes for this device through the control API
(``tailscale`` package), again as a union with the routes already enabled. Whether they are served is
read from what tailscaled reports (``RouteServing``): a pool route in this node's ``PrimaryRoutes`` or
``AllowedIPs``, or in a tagged connector's ``PrimaryRoutes`` (a standby here), is served; so it is once a
tailnet client's DNS query reached our pool DNS address (headscale 0.29 never updates a node's own
``PrimaryRoutes`` for routes it advertised while connected, checked on a real tailnet). Only a route
still not served after ``tailnet.route_approval_grace`` gets a warning saying how to approve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from appconnector.config import ConfigError
from appconnector.metrics import TAILNET_ROUTES_SERVED
from appconnector.secrets_file import read_secret_file
from appconnector.tailnet.api import NodeInfo
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.localapi import LocalAPIClient
from appconnector.tailnet.settings import TailnetSettings

log = logging.getLogger(__name__)


def _norm(prefixes: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in prefixes:
        s = str(ipaddress.ip_network(str(p), strict=False))
        if s not in out:
            out.append(s)
    return out


def union_routes(current: Sequence[str] | None, ours: Sequence[str]) -> list[str]:
    """``current`` with ``ours`` appended where missing (order of ``current`` kept)."""
    cur = _norm(current or ())
    return cur + [p for p in _norm(ours) if p not in cur]


def without_routes(current: Sequence[str] | None, ours: Sequence[str]) -> list[str]:
    """``current`` less ``ours``."""
    drop = set(_norm(ours))
    return [p for p in _norm(current or ()) if p not in drop]


def auto_approvers_hint(tag: str, prefixes: Sequence[str]) -> str:
    owner = tag or "tag:appconnector"
    routes = ", ".join(f'"{p}": ["{owner}"]' for p in prefixes)
    return ("the pool routes need approval: approve them in the admin console (Machines → this device → "
            f"Edit route settings), or add to the tailnet policy file: "
            f'"autoApprovers": {{"routes": {{{routes}}}}}, or configure tailnet.api_key_file '
            "(or tailnet.oauth_client_id + tailnet.oauth_secret_file) to approve them automatically")


class RouteRecord:
    """The routes this product added to tailscaled's prefs, kept in a small JSON file (atomic writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[str]:
        """The recorded routes; an unreadable or malformed record is logged and read as empty."""
        try:
            doc = json.loads(self.path.read_text())
            routes = doc.get("routes") if isinstance(doc, dict) else None
            if not isinstance(routes, list):
                raise ValueError("no routes list")
            return _norm(str(r) for r in routes)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning("ignoring the route record %s: %s", self.path, e)
            return []

    def save(self, routes: Sequence[str]) -> None:
        routes = _norm(routes)
        if not routes:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"routes": routes}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class RouteAdvertiser:
    """Adds/removes ``prefixes`` in tailscaled's ``AdvertiseRoutes``, leaving other routes alone.
    ``record`` holds the ones we added: only those are ever withdrawn."""

    def __init__(self, client: LocalAPIClient, prefixes: Sequence[str], record: RouteRecord,
                 attempts: int = 3) -> None:
        self.client = client
        self.prefixes = _norm(prefixes)
        self.record = record
        self.attempts = attempts

    async def advertise(self) -> list[str]:
        """Make sure our prefixes are advertised; returns the advertised list. Routes recorded by an
        earlier run that are no longer in the pool (a changed ``pool.prefixes``) are withdrawn."""
        for _ in range(self.attempts):
            prefs = await self.client.get_prefs()
            current = _norm(prefs.get("AdvertiseRoutes") or ())
            recorded = self.record.load()
            stale = [p for p in recorded if p not in self.prefixes]
            # ours: what we add now, and what an earlier run added and is still there
            ours = [p for p in self.prefixes if p not in current or p in recorded]
            want = union_routes(without_routes(current, stale), self.prefixes)
            if want == current:
                if ours != recorded:
                    self.record.save(ours)
                return want
            self.record.save(union_routes(ours, stale))  # before the PATCH: a crash must not lose one
            out = await self.client.patch_prefs({"AdvertiseRoutes": want, "AdvertiseRoutesSet": True})
            got = _norm(out.get("AdvertiseRoutes") or ())
            if all(p in got for p in self.prefixes):
                self.record.save([p for p in ours if p in got])
                if stale:
                    log.info("withdrew routes %s (no longer in pool.prefixes)", ", ".join(stale))
                log.info("advertising routes %s (%d added by us, %d other route(s) kept)",
                         ", ".join(self.prefixes), len(ours), len(got) - len(self.prefixes))
                return got
        raise RuntimeError("could not advertise the pool routes: tailscaled prefs keep changing under us")

    async def withdraw(self) -> list[str]:
        """Stop advertising the routes we added (the record); others' routes stay, and so does a pool
        route that was advertised before we came. Returns the routes withdrawn. No record: no LocalAPI call."""
        recorded = self.record.load()
        if not recorded:
            return []
        prefs = await self.client.get_prefs()
        current = _norm(prefs.get("AdvertiseRoutes") or ())
        want = without_routes(current, recorded)
        gone = [p for p in recorded if p in current]
        if want != current:
            out = await self.client.patch_prefs({"AdvertiseRoutes": want, "AdvertiseRoutesSet": True})
            left = _norm(out.get("AdvertiseRoutes") or ())
            if any(p in left for p in recorded):
                raise RuntimeError("tailscaled still advertises " + ", ".join(p for p in recorded if p in left))
            log.info("withdrew routes %s (%d other route(s) kept)", ", ".join(gone), len(left))
        self.record.save([])
        return gone


async def withdraw_recorded(settings: TailnetSettings) -> str:
    """``appconnector routes withdraw``: take back the routes a connector recorded as added, e.g. after a
    crash (the systemd unit runs it in ``ExecStopPost``). Never touches routes when
    ``tailnet.advertise_routes = false``. Returns what was done; raises ``TailnetUnavailable`` or
    ``LocalAPIError`` when tailscaled cannot be asked (the record stays). Tailscale mode only (standalone
    mode advertises nothing: the caller says so)."""
    if not settings.advertise_routes:
        return "tailnet.advertise_routes = false: the routes are not ours to manage; nothing withdrawn"
    record = RouteRecord(settings.record_path)
    if not record.load():
        return f"no routes recorded in {record.path}: nothing to withdraw"
    gone = await RouteAdvertiser(LocalAPIClient(settings.localapi_socket), settings.pool_prefixes, record).withdraw()
    return f"withdrew {', '.join(gone)}" if gone else "the recorded routes were no longer advertised"


def control_credentials(t: TailnetSettings) -> dict[str, str] | None:
    """The control-API credentials configured, as ``tailscale.Tailscale`` keyword arguments, or None.
    Raises ConfigError naming the key when they are incomplete or unreadable."""
    if (t.api_key_file or t.oauth_client_id) and importlib.util.find_spec("tailscale") is None:
        key = "tailnet.api_key_file" if t.api_key_file else "tailnet.oauth_client_id"
        raise ConfigError(key, t.api_key_file or t.oauth_client_id, "the Python package tailscale for control-API "
                          "route approval (pip install tailscale), or leave it empty and use autoApprovers")
    if t.api_key_file and t.oauth_client_id:
        raise ConfigError("tailnet.oauth_client_id", t.oauth_client_id,
                          "empty when tailnet.api_key_file is set (use one kind of credential)")
    if t.api_key_file:
        return {"api_key": read_secret_file("tailnet.api_key_file", Path(t.api_key_file))}
    if t.oauth_client_id or t.oauth_secret_file:
        if not (t.oauth_client_id and t.oauth_secret_file):
            key = "tailnet.oauth_secret_file" if t.oauth_client_id else "tailnet.oauth_client_id"
            raise ConfigError(key, "", "set together with its partner (oauth_client_id + oauth_secret_file)")
        return {"oauth_client_id": t.oauth_client_id,
                "oauth_client_secret": read_secret_file("tailnet.oauth_secret_file", Path(t.oauth_secret_file))}
    return None


class RouteApprover:
    """Enables our routes for this device through the control API when credentials are configured
    (without them, approval is the policy's or an admin's; ``RouteServing`` warns if none comes)."""

    def __init__(self, settings: TailnetSettings, prefixes: Sequence[str]) -> None:
        self.settings = settings
        self.prefixes = _norm(prefixes)

    async def approve(self, device_id: str) -> bool:
        """``device_id`` is this node's StableID. True when the routes are enabled (or were); False
        without credentials."""
        creds = control_credentials(self.settings)
        if creds is None:
            return False
        from tailscale import Tailscale, TailscaleError  # imported here: only needed with credentials

        kwargs: dict[str, Any] = dict(creds)
        try:
            async with Tailscale(**kwargs) as api:
                routes = await api.device_routes(device_id)
                enabled = _norm(routes.enabled_routes)
                if all(p in enabled for p in self.prefixes):
                    return True
                await api.set_device_routes(device_id, routes=union_routes(enabled, self.prefixes))
        except TailscaleError as e:
            log.error("control API route approval failed: %s; %s", e,
                      auto_approvers_hint(self.settings.cluster_tag, self.prefixes))
            return False
        log.info("enabled routes %s for this device through the control API", ", ".join(self.prefixes))
        return True


# ---- are the routes served? ----------------------------------------------------------------------------


def route_service(prefixes: Sequence[str], me: NodeInfo | None, nodes: Iterable[NodeInfo], tag: str) -> dict[str, str]:
    """Where each of ``prefixes`` is served, from tailscaled's view: "primary here", "approved here"
    (in this node's AllowedIPs: a standby under Tailscale's control), "primary on NAME" (a node carrying
    ``tag``; this one is a standby), or "" when nothing serves it. headscale lists a route in
    AllowedIPs and PrimaryRoutes of its primary router only, so a standby learns it from the primary."""
    out: dict[str, str] = {}
    others = [n for n in nodes if tag and tag in n.tags and (me is None or n.node != me.node)]
    for p in _norm(prefixes):
        if me is not None and p in me.primary_routes:
            out[p] = "primary here"
        elif me is not None and p in me.routes:
            out[p] = "approved here"
        elif primary := next((n for n in sorted(others, key=lambda n: n.node) if p in n.primary_routes), None):
            out[p] = f"primary on {primary.name or primary.node}"
        else:
            out[p] = ""
    return out


class RouteServing:
    """Follows whether the pool routes are served (``route_service`` on every netmap change); warns once
    when they are not after ``grace`` seconds (and again if they stop being served later), logs when
    they are served again, and keeps ``appconnector_tailnet_routes_served`` current."""

    def __init__(self, directory: TailnetDirectory, prefixes: Sequence[str], tag: str, grace: float) -> None:
        self.directory = directory
        self.prefixes = _norm(prefixes)
        self.tag = tag
        self.grace = grace
        self.where: dict[str, str] = {}
        self.client: str | None = None  # a tailnet node whose DNS query reached us through the routes
        self.warned = False
        self._since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    def start(self) -> None:
        if not self._running:
            self._running = True
            self.client = None
            self.directory.subscribe(self._update)
            self._update()

    def saw_client(self, node: NodeInfo) -> None:
        """A DNS query from ``node`` reached a pool address: the routes are served to it (headscale never
        tells a node its own PrimaryRoutes for routes advertised while connected; this is how its
        primary knows)."""
        me = self.directory.self_node()
        if self._running and self.client is None and (me is None or node.node != me.node):
            self.client = node.name or node.node
            self._update()

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def served(self) -> bool:
        return bool(self.where) and all(self.where.values())

    def _update(self) -> None:
        if not self._running:
            return
        self.where = route_service(self.prefixes, self.directory.self_node(), self.directory.nodes().values(),
                                   self.tag)
        if self.client is not None:
            self.where = {p: w or f"reached by {self.client}" for p, w in self.where.items()}
        TAILNET_ROUTES_SERVED.set(1 if self.served() else 0)
        loop = asyncio.get_running_loop()
        if self.served():
            if self.warned:
                log.info("the pool routes are served now: %s", self._describe())
            self.warned, self._since = False, None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._since is None:
            self._since = time.monotonic()
            self._timer = loop.call_later(self.grace, self._overdue)

    def _overdue(self) -> None:
        self._timer = None
        if self._running and not self.served() and not self.warned:
            self.warned = True
            missing = [p for p, w in self.where.items() if not w]
            log.warning("the pool routes %s are advertised but not served after %.0fs: tailscaled lists them in no "
                        "PrimaryRoutes/AllowedIPs of this node or a tagged connector, and no tailnet client has "
                        "reached this connector's DNS through them (headscale does not tell a node about its own "
                        "routes approved while it was connected: `headscale nodes list-routes` shows them); %s",
                        ", ".join(missing), self.grace, auto_approvers_hint(self.tag, missing))

    def _describe(self) -> str:
        return "; ".join(f"{p} {w or 'not served'}" for p, w in self.where.items())

    def detail(self) -> str:
        """For the readiness check: where each route is served, or for how long it has not been."""
        if self.served():
            return "served: " + self._describe()
        since = self._since
        age = f" for {time.monotonic() - since:.0f}s" if since is not None else ""
        return f"not served{age}: {self._describe()}" + (" (see the log: approval needed)" if self.warned else "")
