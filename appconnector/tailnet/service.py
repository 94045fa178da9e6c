"""Everything tailscale mode needs from tailscaled, built from its settings in one object for the app.

    tailnet = TailnetService(TailnetSettings.from_config(cfg))
    await tailnet.start()                    # status + watch, routes advertised (and approved if configured)
    decision = await tailnet.discover_cluster(has_state=...)   # JOIN / BOOTSTRAP / RESUME (waits otherwise)
    tailnet.identity, tailnet.directory      # NodeIdentity / NodeDirectory for DNS and NAT
    tailnet.raft_address()                   # this member's "tailnet-IPv4:raft_port"
    tailnet.checks()                         # readiness checks for the status server
    await tailnet.withdraw_routes()          # the routes we added are withdrawn (stop does it too)
    await tailnet.stop()                     # watch ends, Raft filter removed
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from appconnector import metrics
from appconnector.tailnet.api import TailnetUnavailable
from appconnector.tailnet.cluster import ClusterDiscovery, Decision, RaftFilter, raft_address
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.identity import TailnetIdentity
from appconnector.tailnet.localapi import LocalAPIClient
from appconnector.tailnet.routes import (
    RouteAdvertiser,
    RouteApprover,
    RouteRecord,
    RouteServing,
    route_service,
    union_routes,
)
from appconnector.tailnet.settings import TailnetSettings

log = logging.getLogger(__name__)


class TailnetService:
    """Owns the LocalAPI client, the node directory, the whois cache, route advertisement and the
    Raft-port filter. ``raft_filter`` is off when the cluster has no tag (single member) or when
    ``enable_raft_filter`` is False (tests without root)."""

    def __init__(self, settings: TailnetSettings, enable_raft_filter: bool | None = None) -> None:
        self.settings = settings
        self.client = LocalAPIClient(settings.localapi_socket)
        self.directory = TailnetDirectory(self.client, cluster_tag=settings.cluster_tag)
        self.identity = TailnetIdentity(self.client, self.directory, capability=settings.capability)
        routes = settings.routes  # the v6 pool beside the v4 one
        self.advertiser = RouteAdvertiser(self.client, routes, RouteRecord(settings.record_path))
        self.approver = RouteApprover(settings, routes)
        self.serving = RouteServing(self.directory, settings.pool_prefixes, settings.cluster_tag,
                                    settings.route_approval_grace)
        want_filter = bool(settings.cluster_tag) if enable_raft_filter is None else enable_raft_filter
        self.raft_filter: RaftFilter | None = RaftFilter(settings.raft_port) if want_filter else None
        self.routes_advertised = False
        self._readvertise: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read status (raises TailnetUnavailable when tailscaled is not running), start the watch,
        put the Raft filter in place and advertise the pool routes."""
        await self.directory.start()
        me = self.directory.self_node()
        if me is None or not me.ipv4:
            raise TailnetUnavailable("tailscaled has no tailnet IPv4 for this node yet (is it logged in? "
                                     "`tailscale up`)")
        tag = self.settings.cluster_tag
        if tag and tag not in me.tags:
            log.warning("this node does not carry cluster.tag %s: it cannot join the cluster "
                        "(tailscale up --advertise-tags=%s)", tag, tag)
        if self.raft_filter is not None:
            await self.raft_filter.follow(self.directory, tag)
        if self.settings.advertise_routes:
            metrics.TAILNET_ROUTES_WANTED.set(len(self.advertiser.prefixes))
            await self.advertiser.advertise()
            self.routes_advertised = True
            metrics.TAILNET_ROUTES_ADVERTISED.set(len(self.advertiser.prefixes))
            self.directory.subscribe_prefs(self._on_prefs)
            await self.approver.approve(me.node)
            self.serving.start()

    def _on_prefs(self, prefs: dict[str, Any]) -> None:
        """Someone changed tailscaled's prefs: if our routes went missing (``tailscale set
        --advertise-routes`` replaces the whole list), put them back, keeping theirs."""
        have = union_routes(prefs.get("AdvertiseRoutes") or [], [])
        if self.routes_advertised:
            metrics.TAILNET_ROUTES_ADVERTISED.set(sum(p in have for p in self.advertiser.prefixes))
        if not self.routes_advertised or all(p in have for p in self.advertiser.prefixes):
            return
        if self._readvertise is not None and not self._readvertise.done():
            return
        log.warning("the pool routes were removed from tailscaled's advertised routes; advertising them again "
                    "(set tailnet.advertise_routes = false to manage routes yourself)")
        self._readvertise = asyncio.ensure_future(self._advertise_again())

    async def _advertise_again(self) -> None:
        try:
            await self.advertiser.advertise()
        except Exception as e:
            log.error("could not advertise the pool routes again: %s", e)
            return
        metrics.TAILNET_ROUTES_ADVERTISED.set(len(self.advertiser.prefixes))

    def raft_address(self) -> str | None:
        me = self.directory.self_node()
        return raft_address(me, self.settings.raft_port) if me else None

    async def discover_cluster(self, has_state: bool) -> Decision:
        """Wait until it is safe to start Raft; see ``tailnet.cluster``."""
        return await ClusterDiscovery(self.directory, self.settings, has_state).decide()

    def members(self) -> list[str]:
        """Raft addresses of every tagged node (self included), for the replica's partner list."""
        return [a for n in self.directory.tagged(self.settings.cluster_tag)
                if (a := raft_address(n, self.settings.raft_port))]

    def checks(self) -> dict[str, Callable[[], tuple[bool, str]]]:
        def tailscaled() -> tuple[bool, str]:
            me = self.directory.self_node()
            if me is None:
                return False, "no status from tailscaled yet"
            return True, f"{me.name or me.node} {', '.join(me.ipv4)}; {len(self.directory.nodes())} node(s)"

        def routes() -> tuple[bool, str]:
            if not self.settings.advertise_routes:
                return True, "not managed (tailnet.advertise_routes = false)"
            if not self.routes_advertised:
                return False, "not advertised"
            return True, f"advertised: {', '.join(self.advertiser.prefixes)}; {self.serving.detail()}"
        return {"tailscaled": tailscaled, "routes": routes}

    async def withdraw_routes(self, failover_wait: float = 0.0) -> None:
        """Withdraw the routes we added (none when ``tailnet.advertise_routes = false``); no re-advertising
        after this. With ``failover_wait``, wait up to that long until another online tagged connector is
        primary for every pool route (the caller keeps DNS and NAT serving meanwhile, so clients never
        route to a connector that has stopped). Raises when tailscaled cannot be asked (the record stays
        for the next try)."""
        self.routes_advertised = False
        metrics.TAILNET_ROUTES_WANTED.set(0)  # withdrawn on purpose (stop, removed member): nothing to alert on
        metrics.TAILNET_ROUTES_ADVERTISED.set(0)
        self.serving.stop()  # withdrawn on purpose: no warnings about them
        if self._readvertise is not None and not self._readvertise.done():
            self._readvertise.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readvertise
        if self.settings.advertise_routes and await self.advertiser.withdraw() and failover_wait > 0:
            await self._await_failover(failover_wait)

    async def _await_failover(self, timeout: float) -> None:
        tag = self.settings.cluster_tag
        me = self.directory.self_node()
        if not tag or not any(n.online and (me is None or n.node != me.node) for n in self.directory.tagged(tag)):
            return  # no other connector to take the routes

        def moved() -> bool:
            where = route_service(self.advertiser.prefixes, self.directory.self_node(),
                                  self.directory.nodes().values(), tag)
            return all(w.startswith("primary on ") for w in where.values())

        done = asyncio.Event()
        self.directory.subscribe(lambda: done.set() if moved() else None)
        try:
            if not moved():  # the netmap may already show another primary: the same outcome, said the same way
                await asyncio.wait_for(done.wait(), timeout)
            log.info("the pool routes moved to another connector")
        except TimeoutError:
            log.warning("no other connector took the pool routes within %.0fs; stopping anyway", timeout)

    async def stop(self) -> None:
        """Withdraw our routes (a connector that stops must not keep pool routes with no DNS behind them;
        the app withdraws them earlier, before DNS drains, so this is a no-op then), end the watch."""
        try:
            await self.withdraw_routes()
        except Exception as e:
            log.warning("could not withdraw the pool routes: %s (`appconnector routes withdraw` retries)", e)
        await self.directory.stop()
        if self.raft_filter is not None:
            try:
                await self.raft_filter.remove()
            except Exception as e:
                log.warning("could not remove the Raft-port filter: %s", e)
