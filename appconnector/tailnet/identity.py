"""``TailnetIdentity``: who a DNS query's source address is, by LocalAPI whois, cached per IP.

The cache is kept honest by the node directory: on every netmap change each cached IP is re-pointed
to the node that now holds it (no I/O), IPs no node holds any more are dropped, and every negative
("stranger") entry is dropped, since a stranger may just have joined. Strangers are also cached only
briefly so a flood from one unknown address costs one whois per ``negative_ttl``. Concurrent misses
for one IP share a single whois.

Grants (``NodeInfo.granted``, from the whois ``CapMap``) can change without any netmap notification
(tailscaled recomputes them from its packet filter), so with ``[[apps]]`` configured ``refresh()``
asks whois again for every cached IP on a bounded interval (``dns.service`` drives it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

from appconnector.config import DEFAULT_CAPABILITY
from appconnector.metrics import TAILNET_WHOIS
from appconnector.tailnet.api import NodeInfo, TailnetUnavailable
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.localapi import LocalAPIClient, LocalAPIError
from appconnector.tailnet.nodeinfo import from_tailcfg_node, granted_apps

REFRESH_CONCURRENCY = 16  # whois calls of one refresh in flight at once


class TailnetIdentity:
    """Implements ``NodeIdentity``. Pass the directory to have the cache follow netmap changes."""

    node_is_source_ip = False  # the node is tailscaled's StableID, learnt by whois

    def __init__(self, client: LocalAPIClient, directory: TailnetDirectory | None = None,
                 negative_ttl: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 max_strangers: int = 65536, capability: str = DEFAULT_CAPABILITY) -> None:
        self.client = client
        self.capability = capability
        self.negative_ttl = negative_ttl
        # strangers are remembered so a flood from one source costs one whois per negative_ttl; the
        # cap keeps a flood from many sources (dns.listen reachable from outside) from growing memory
        self.max_strangers = max_strangers
        self._clock = clock
        self._known: dict[str, NodeInfo] = {}
        self._strangers: dict[str, float] = {}  # ip → monotonic expiry
        self._inflight: dict[str, asyncio.Future[NodeInfo | None]] = {}
        self._directory = directory
        if directory is not None:
            directory.subscribe(self._on_netmap_change)

    def cached(self, ip: str) -> NodeInfo | None:
        return self._known.get(ip)

    async def whois(self, ip: str) -> NodeInfo | None:
        if (hit := self._known.get(ip)) is not None:
            TAILNET_WHOIS.labels("hit").inc()
            return hit
        expiry = self._strangers.get(ip)
        if expiry is not None:
            if self._clock() < expiry:
                TAILNET_WHOIS.labels("stranger").inc()
                return None
            del self._strangers[ip]
        # One whois per IP however many queries wait for it; the lookup runs as its own task so a
        # cancelled caller (a DNS client that gave up) does not cancel it for the others.
        task = self._inflight.get(ip)
        if task is None:
            task = asyncio.ensure_future(self._ask(ip))
            self._inflight[ip] = task
            task.add_done_callback(functools.partial(self._done, ip))
        return await asyncio.shield(task)

    def _done(self, ip: str, task: asyncio.Future[NodeInfo | None]) -> None:
        self._inflight.pop(ip, None)
        if not task.cancelled():
            task.exception()  # retrieved here so an error nobody waited for is not reported as lost

    async def _ask(self, ip: str) -> NodeInfo | None:
        try:
            resp = await self.client.whois(ip)
        except (TailnetUnavailable, LocalAPIError) as e:
            TAILNET_WHOIS.labels("error").inc()
            raise TailnetUnavailable(str(e)) from e
        info = self._parse(resp)
        if info is None:
            TAILNET_WHOIS.labels("stranger").inc()
            now = self._clock()
            if len(self._strangers) >= self.max_strangers:
                self._strangers = {k: t for k, t in self._strangers.items() if t > now}
                if len(self._strangers) >= self.max_strangers:
                    self._strangers.clear()
            self._strangers[ip] = now + self.negative_ttl
            return None
        TAILNET_WHOIS.labels("miss").inc()
        self._known[ip] = info
        return info

    def _parse(self, resp: dict[str, Any] | None) -> NodeInfo | None:
        """A whois answer (apitype.WhoIsResponse) as NodeInfo with the owner's login and the grants."""
        node = resp.get("Node") if resp is not None else None
        info = from_tailcfg_node(node) if isinstance(node, dict) else None
        if info is None or resp is None:
            return None
        profile = resp.get("UserProfile")
        login = profile.get("LoginName") if isinstance(profile, dict) else None
        return dataclasses.replace(info, login=login if isinstance(login, str) else "",
                                   granted=granted_apps(resp.get("CapMap"), self.capability))

    async def refresh(self) -> set[str]:
        """Ask whois again for every cached IP (REFRESH_CONCURRENCY at a time); returns the nodes whose
        grants, owner or tags changed (a node gone from whois counts as changed: it is then uncached)."""
        changed: set[str] = set()
        gate = asyncio.Semaphore(REFRESH_CONCURRENCY)

        async def one(ip: str, old: NodeInfo) -> None:
            async with gate:
                try:
                    resp = await self.client.whois(ip)
                except (TailnetUnavailable, LocalAPIError):
                    TAILNET_WHOIS.labels("error").inc()
                    return  # keep what we knew: the next round asks again
            TAILNET_WHOIS.labels("refresh").inc()
            new = self._parse(resp)
            if self._known.get(ip) is not old:
                return  # re-pointed or re-asked meanwhile: that answer is as new as this one
            if new is None or new.node != old.node:
                self._known.pop(ip, None)
                changed.add(old.node)
            elif (new.granted, new.login, new.tags) != (old.granted, old.login, old.tags):
                changed.add(old.node)
                self._known[ip] = new

        await asyncio.gather(*(one(ip, old) for ip, old in list(self._known.items())))
        return changed

    def _on_netmap_change(self) -> None:
        assert self._directory is not None
        by_ip = self._directory.by_ip()
        self._strangers.clear()
        known: dict[str, NodeInfo] = {}
        for ip, old in self._known.items():
            now = by_ip.get(ip)
            if now is not None and now.node == old.node:  # another node there: whois it afresh
                # the whois-only fields stay until refresh() asks again
                known[ip] = dataclasses.replace(now, login=old.login, granted=old.granted)
        self._known = known
