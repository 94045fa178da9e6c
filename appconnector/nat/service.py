"""The NAT dataplane as one service: mirrors the pool into the kernel and feeds last-used marks back.

``NatService`` is a :class:`appconnector.pool.api.PoolObserver`. Every replica runs one, so every
member's kernel holds every mapping and a standby steers from the first packet after it takes over.
``on_changes`` installs the change synchronously (one nftables transaction) on the apply path, so a
connector that answers DNS has the mapping in its kernel before the answer leaves.

When the kernel part cannot run (``nat.enabled = false``, no CAP_NET_ADMIN, no libnftables,
forwarding off, or nftables refusing our table) the service says why in ONE log line, sets
``enabled = False`` and the product runs DNS-only; nothing raises.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from appconnector import metrics
from appconnector.config import Config
from appconnector.nat import links, seen
from appconnector.nat.nftables import Nftables, NftError
from appconnector.nat.reconcile import Reconciler
from appconnector.nat.render import Delta, Key, SteerModel, TableSpec, ip_text
from appconnector.nat.targets import Resolver, TargetRefresher
from appconnector.pool.api import Address, Changes, PoolReader, Replica
from appconnector.pool.api import touch_refresh as pool_touch_refresh
from appconnector.tailnet.api import NodeDirectory

log = logging.getLogger(__name__)


class NatService:
    """Kernel steering for the pool, with last-used marks from the kernel's view of traffic.

    ``resolver`` (``async (domain) -> (targets, ttl)``) enables the leader's TTL refresh of targets,
    which runs even when the kernel part is off (other members may steer). ``seen_interval`` is how
    often the kernel's seen set is read, ``conntrack_interval`` how often long flows are looked for,
    ``touch_refresh`` the age below which a last-used mark is not refreshed.
    """

    def __init__(self, cfg: Config, replica: Replica, directory: NodeDirectory | None = None, *,
                 resolver: Resolver | None = None, seen_interval: float = 5.0,
                 conntrack_interval: float = 30.0, touch_refresh: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.replica = replica
        self.directory = directory
        self.seen_interval = seen_interval
        self.conntrack_interval = conntrack_interval
        self.touch_refresh = (pool_touch_refresh(cfg.pool.reuse_after)
                              if touch_refresh is None else touch_refresh)
        self.clock = clock
        self.spec = TableSpec(interface=cfg.tailnet.interface, pool=cfg.pool.prefixes,
                              max_mappings=cfg.nat.max_mappings, seen_timeout=max(3.0, 3 * seen_interval))
        self.enabled = False
        self.reason = "not started"
        self.touches_queued = 0
        self._pool = seen.PoolRanges(cfg.pool.prefixes)
        self._model = SteerModel()
        self._lock = threading.RLock()      # model + kernel: apply thread, event loop, workers
        self._reconciler: Reconciler | None = None
        self._nft: Nftables | None = None
        self._out_of_sync = False           # a change failed to reach the kernel: rebuild next round
        self._stopped = False
        self._dns_route: str | None = None
        # pyroute2's sync API cannot run on a thread with a running event loop: one worker does all
        # netlink calls (routes, conntrack dumps and purges), in order.
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nat-netlink")
        self._tasks: list[asyncio.Task[None]] = []
        self._refresher = (TargetRefresher(replica, resolver, self.domains) if resolver is not None else None)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        reason = self._unavailable()
        if reason is None:
            try:
                self._nft = Nftables()
                self._reconciler = Reconciler(self._nft, self.spec)
                self.enabled = True
                self.reason = "kernel steering on"
            except NftError as e:
                reason = str(e)
        if self.directory is not None:
            self.directory.subscribe(self._on_nodes)
            self._model.set_node_ips({n: i.ipv4 for n, i in self.directory.nodes().items()})
        self.replica.add_observer(self)  # on_reset at once: builds the table from the pool
        if reason is not None:
            self._disable(reason)
        if links.has_net_admin():
            await self._add_dns_route(loop)
        if self.enabled:
            self._tasks.append(asyncio.create_task(self._seen_loop(), name="nat-seen"))
        if self._refresher is not None:
            self._refresher.start()
        metrics.NAT_ENABLED.set(1 if self.enabled else 0)
        metrics.NAT_CONFIGURED.set(1 if self.cfg.nat.enabled else 0)

    async def stop(self) -> None:
        """Stop reading, remove our table and the DNS route. Later pool changes are ignored. Idempotent."""
        if self._stopped:
            return
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._refresher is not None:
            await self._refresher.stop()
        with self._lock:
            self._stopped = True
            if self._reconciler is not None:
                try:
                    self._reconciler.remove()
                except NftError as e:
                    log.warning("nat: could not remove table inet appconnector: %s", e)
            if self._nft is not None:
                self._nft.close()
            self.enabled = False
        if self._dns_route is not None:
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self._netlink, links.remove_local_route, self._dns_route)
            except OSError as e:
                log.warning("nat: could not remove the local route of %s: %s", self._dns_route, e)
        self._netlink.shutdown(wait=True)
        metrics.NAT_ENABLED.set(0)

    def _unavailable(self) -> str | None:
        """Why the kernel part cannot run here, or None."""
        if not self.cfg.nat.enabled:
            return "nat.enabled = false"
        return links.missing_prerequisite()

    def _disable(self, reason: str) -> None:
        was = self.enabled
        self.enabled = False
        self.reason = reason
        metrics.NAT_ENABLED.set(0)
        if was or self._nft is None:
            log.warning("nat: %s: running DNS-only, pool addresses are not steered", reason)

    async def _add_dns_route(self, loop: asyncio.AbstractEventLoop) -> None:
        dns = ip_text(self.spec.dns_address)
        if not any(host == dns for host, _port in self.cfg.dns_listen()):
            return
        try:
            await loop.run_in_executor(self._netlink, links.add_local_route, dns)
            self._dns_route = dns
        except OSError as e:
            log.warning("nat: could not make the DNS address %s local (%s); DNS cannot listen on it", dns, e)

    # -- PoolObserver ---------------------------------------------------------------------------------
    def on_reset(self, reader: PoolReader) -> None:
        mappings = list(reader.mappings())
        targets = {d: reader.targets(d) for d in {m.domain for m in mappings}}
        with self._lock:
            elements = self._model.reset(mappings, targets)
            if self._kernel_ready():
                self._rebuild(elements)

    def on_changes(self, changes: Changes) -> None:
        with self._lock:
            delta = self._model.apply(changes)
            if self._kernel_ready():
                self._apply(delta)
            purge = [(ip, address) for node, address, _ in changes.removed for ip in self._model.ips_of(node)]
        if purge and self.enabled:
            self._netlink.submit(self._purge, purge)

    def _kernel_ready(self) -> bool:
        return self.enabled and not self._stopped and self._reconciler is not None

    def _rebuild(self, elements: dict[Key, Address]) -> None:
        assert self._reconciler is not None
        try:
            self._reconciler.rebuild(elements)
            self._out_of_sync = False
        except NftError as e:
            if self._nft is not None and not self._reconciler.exists() and not self._out_of_sync:
                self._disable(f"nftables refused table inet appconnector ({e})")
            else:
                log.error("nat: rebuilding table inet appconnector failed: %s", e)
                self._out_of_sync = True
        metrics.NAT_ELEMENTS.set(len(self._model))

    def _apply(self, delta: Delta) -> None:
        assert self._reconciler is not None
        if self._out_of_sync:
            self._rebuild(self._model.elements())
            return
        try:
            self._reconciler.apply(delta, self._model.elements)
        except NftError as e:
            log.error("nat: steer map out of sync, retrying: %s", e)
            self._out_of_sync = True
        metrics.NAT_ELEMENTS.set(len(self._model))

    def _resync(self) -> None:
        with self._lock:
            if self._out_of_sync and self._kernel_ready():
                self._rebuild(self._model.elements())

    def _purge(self, pairs: list[Key]) -> None:
        try:
            n = seen.conntrack_purge(pairs)
            if n:
                log.info("nat: deleted %d conntrack entries of reassigned addresses", n)
        except OSError as e:
            log.warning("nat: conntrack purge failed: %s", e)

    def _on_nodes(self) -> None:
        assert self.directory is not None
        node_ips = {n: info.ipv4 for n, info in self.directory.nodes().items()}
        with self._lock:
            delta = self._model.set_node_ips(node_ips)
            if self._kernel_ready():
                self._apply(delta)

    # -- reads ---------------------------------------------------------------------------------------
    def installed(self, node: str, address: Address) -> bool:
        """True when the kernel steers ``node``'s traffic to ``address`` (its element is in place)."""
        with self._lock:
            return self._kernel_ready() and not self._out_of_sync and self._model.installed(node, address)

    def domains(self) -> list[str]:
        """Domains that have mappings (what the leader keeps resolved)."""
        with self._lock:
            return self._model.domains()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"enabled": self.enabled, "reason": self.reason, "mappings": self._model.mapping_count(),
                    "steer_elements": len(self._model), "out_of_sync": self._out_of_sync,
                    "touches_queued": self.touches_queued,
                    "target_proposals": self._refresher.proposals if self._refresher else 0}

    # -- last-used marks ------------------------------------------------------------------------------
    async def _seen_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_conntrack = self.clock() + self.conntrack_interval
        while True:
            await asyncio.sleep(self.seen_interval)
            try:
                await self.collect(loop, conntrack=self.clock() >= next_conntrack)
            except Exception:  # keep collecting; the next round may work
                log.exception("nat: reading seen flows failed")
            if self.clock() >= next_conntrack:
                next_conntrack = self.clock() + self.conntrack_interval

    async def collect(self, loop: asyncio.AbstractEventLoop, conntrack: bool) -> int:
        """One round: read the seen set (and conntrack when asked), queue touches; returns touches."""
        reconciler = self._reconciler
        if reconciler is None or not self._kernel_ready():
            return 0
        if self._out_of_sync:  # off the event loop: a full rebuild of a big map takes a second or more
            await asyncio.to_thread(self._resync)
        pairs: set[Key] = set(await asyncio.to_thread(reconciler.read_seen))
        if conntrack:  # the slow cadence: listing costs grow with the seen set, so the counter waits too
            pairs |= await loop.run_in_executor(self._netlink, seen.conntrack_pairs, self._pool)
            rejected, dropped = await asyncio.to_thread(reconciler.unmapped_counts)
            metrics.NAT_UNMAPPED_REJECTS.set(rejected)
            metrics.NAT_UNMAPPED_DROPS.set(dropped)

        def node_for_ip(ip: int) -> str | None:
            with self._lock:
                return self._model.node_for_ip(ip)

        queued = seen.touches(pairs, node_for_ip, self.replica, self.clock(), self.touch_refresh)
        self.touches_queued += queued
        return queued
