"""The NAT dataplane as one service: mirrors the pool into the kernel and feeds last-used marks back.

``NatService`` is a :class:`appconnector.pool.api.PoolObserver`. Every replica runs one, so every
member's kernel holds every mapping and a standby steers from the first packet after it takes over.

nftables work never runs where it could stall something else: ``on_changes`` runs on the Raft apply
thread (pysyncobj's tick thread: a second spent there costs the leader its term), so it only updates
the pure model and records the kernel delta; ONE worker thread applies what was recorded, coalescing
every change that arrived meanwhile into one transaction and rebuilding the whole table when a delta
is refused, when a snapshot replaced the state, or when the backlog grew past ``PENDING_LIMIT`` keys.
A replaced state (``on_reset``: start-up, snapshot install) is O(pool) to mirror, so that too is the
worker's: it builds the new model aside and replays the changes recorded meanwhile onto it.
Nothing on the event loop waits for it: ``ready(node, address)`` (DNS awaits it after a new checkout,
so the answer leaves after the element is in the kernel) is an asyncio wait, and ``status()`` reads
published values.

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
from appconnector.kernel.nftables import Nftables, NftError
from appconnector.nat import links, seen
from appconnector.nat.reconcile import Reconciler
from appconnector.nat.render import Delta, Key, PendingDelta, SteerModel, TableSpec, flatten
from appconnector.nat.settings import NatSettings
from appconnector.nat.targets import Resolver, TargetRefresher
from appconnector.pool.addresses import V4_MAX, DualSpace, format_address
from appconnector.pool.api import Address, Changes, PoolAccess, PoolReader
from appconnector.pool.api import touch_refresh as pool_touch_refresh
from appconnector.tailnet.api import NodeDirectory

log = logging.getLogger(__name__)

PENDING_LIMIT = 50_000
"""Kernel keys recorded for the worker; a longer backlog becomes one full rebuild instead of growing."""
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
"""Backoff between failed worker rounds (seconds): first retry, then doubling up to the maximum."""
FATAL_AFTER = 5
"""Unexpected worker errors in a row (a bug, ~8 s of retries) before ``on_fatal`` is told: the process
then exits 1 so the supervisor restarts it. nftables refusing a rebuild is retried for ever instead
(unready meanwhile): a restart would not help, and DNS still answers."""


class NatService:
    """Kernel steering for the pool, with last-used marks from the kernel's view of traffic.

    ``resolver`` (``async (domain) -> (targets, ttl)``) enables the leader's TTL refresh of targets,
    which runs even when the kernel part is off (other members may steer). ``seen_interval`` is how
    often the kernel's seen set is read, ``conntrack_interval`` how often long flows are looked for,
    ``touch_refresh`` the age below which a last-used mark is not refreshed. ``on_fatal(reason)`` is
    called (from the worker thread) when the worker keeps failing unexpectedly (``FATAL_AFTER``).
    """

    def __init__(self, settings: NatSettings, replica: PoolAccess, directory: NodeDirectory | None = None, *,
                 resolver: Resolver | None = None, seen_interval: float = 5.0,
                 conntrack_interval: float = 30.0, touch_refresh: float | None = None,
                 clock: Callable[[], float] = time.time, on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.replica = replica
        self.directory = directory
        self.seen_interval = seen_interval
        self.conntrack_interval = conntrack_interval
        self.touch_refresh = (pool_touch_refresh(settings.reuse_after)
                              if touch_refresh is None else touch_refresh)
        self.clock = clock
        self.spec = TableSpec(interface=settings.interface, pool=settings.pool,
                              max_mappings=settings.max_mappings, seen_timeout=max(3.0, 3 * seen_interval),
                              pool6=settings.pool6)
        self.enabled = False
        self.reason = "not started"
        self.touches_queued = 0
        self._pool = seen.PoolRanges(settings.pool)
        self._pool6 = seen.PoolRanges(settings.pool6) if settings.pool6 else None
        self._space = DualSpace(settings.pool_prefixes, settings.pool_prefixes6)
        self._model = SteerModel(self._space)
        # The model and what is pending for the kernel: taken by the apply thread, the event loop and
        # the worker, always briefly (never across an nftables call).
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._pending = PendingDelta(PENDING_LIMIT)
        self._recorded = 0                  # changes recorded for the kernel (a sequence number)
        self._installed = 0                 # ... of which the kernel holds all up to this one
        self._rounds = 0                    # worker rounds finished (ok or not)
        self._busy = ""                     # what the worker is doing now: "", "delta", "rebuild"
        self._failures = 0                  # worker rounds failed in a row (the backoff; logs say each)
        self._bugs = 0                      # ... of which by an unexpected exception
        self._retry_at = 0.0                # monotonic time before which a failed round is not retried
        self._built = False                 # the table was built once (a later failure is not "unsupported")
        # A snapshot install or start-up replaces the whole state: the worker rebuilds the model from
        # ``_reset_from`` aside; changes applied meanwhile wait in ``_raw`` and are replayed onto it.
        self._reset_from: PoolReader | None = None
        self._raw: list[Changes] = []
        self._raw_size = 0
        self._raw_lost = False              # _raw overflowed: read the state again after this reset
        self._resets = 0                    # on_reset calls (a second one during a build restarts it)
        self._worker: threading.Thread | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reconciler: Reconciler | None = None
        self._nft: Nftables | None = None
        self._out_of_sync = False           # the kernel may differ from the model: the worker rebuilds
        self._stopped = False
        self._dns_route: str | None = None
        # pyroute2's sync API cannot run on a thread with a running event loop: one worker does all
        # netlink calls (routes, conntrack dumps and purges), in order.
        self._netlink = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nat-netlink")
        self._tasks: list[asyncio.Task[None]] = []
        self._refresher = (TargetRefresher(replica, resolver, self.domains) if resolver is not None else None)

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the table from the pool (the worker does; this waits for its first round without
        blocking the loop), then start reading the seen set."""
        loop = self._loop = asyncio.get_running_loop()
        reason = self._unavailable()
        if reason is None:
            try:
                self._nft = Nftables()
                self._reconciler = Reconciler(self._nft, self.spec)
                self.enabled = True
                self.reason = "kernel steering on"
            except NftError as e:
                reason = str(e)
        if reason is not None:
            self._disable(reason)  # the worker still keeps the model (domains for the target refresh)
        self._worker = threading.Thread(target=self._work, name="nat-kernel", daemon=True)
        self._worker.start()
        if self.directory is not None:
            self.directory.subscribe(self._on_nodes)
            self._model.set_node_ips({n: i.ipv4 + i.ipv6 for n, i in self.directory.nodes().items()})
        self.replica.add_observer(self)  # on_reset at once: the worker builds the table from the pool
        await self._wait(lambda: self._rounds > 0)
        if links.has_net_admin():
            await self._add_dns_route(loop)
        if self.enabled and self.spec.pool6 and not links.forwarding_enabled(6):
            log.warning("nat: IPv6 forwarding is off (sysctl net.ipv6.conf.all.forwarding=1 turns it on): "
                        "v6 pool addresses (pool.prefixes6) are not steered")
        if self.enabled:
            self._tasks.append(asyncio.create_task(self._seen_loop(), name="nat-seen"))
        if self._refresher is not None:
            self._refresher.start()
        metrics.NAT_ENABLED.set(1 if self.enabled else 0)
        metrics.NAT_CONFIGURED.set(1 if self.settings.enabled else 0)

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
            self._wake.notify_all()
        if self._worker is not None:  # it finishes the round it is in (a rebuild may take seconds)
            await asyncio.to_thread(self._worker.join)
        if self._reconciler is not None:
            try:
                await asyncio.to_thread(self._reconciler.remove)
            except NftError as e:
                log.warning("nat: could not remove table inet appconnector: %s", e)
        if self._nft is not None:
            self._nft.close()
        self.enabled = False
        self._wake_waiters()
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
        if not self.settings.enabled:
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
        dns = format_address(self.spec.dns_address)
        if dns not in self.settings.dns_hosts:
            return
        try:
            await loop.run_in_executor(self._netlink, links.add_local_route, dns)
            self._dns_route = dns
        except OSError as e:
            log.warning("nat: could not make the DNS address %s local (%s); DNS cannot listen on it", dns, e)

    # -- PoolObserver (the apply thread: record only, never nftables, nothing O(pool)) -------------
    def on_reset(self, reader: PoolReader) -> None:
        with self._lock:
            self._reset_from = reader
            self._resets += 1
            self._raw, self._raw_size, self._raw_lost = [], 0, False
            self._pending.mark_rebuild()
            self._record()

    def on_changes(self, changes: Changes) -> None:
        with self._lock:
            if self._reset_from is not None:  # the worker is building a new model: replay this onto it
                self._raw_size += len(changes.added) + len(changes.removed) + len(changes.targets)
                if self._raw_size > PENDING_LIMIT:  # bounded: read the whole state once more instead
                    self._raw, self._raw_lost = [], True
                else:
                    self._raw.append(changes)
                self._record()
            else:
                self._pending_delta(self._model.apply(changes))
            purge = [key for node, address, _ in changes.removed for key in self._model.flow_keys(node, address)]
        if purge and self.enabled:
            self._netlink.submit(self._purge, purge)

    def _on_nodes(self) -> None:
        assert self.directory is not None
        node_ips = {n: info.ipv4 + info.ipv6 for n, info in self.directory.nodes().items()}
        with self._lock:
            self._pending_delta(self._model.set_node_ips(node_ips))

    def _pending_delta(self, delta: Delta) -> None:
        """Under the lock: hand ``delta`` to the worker (coalesced with what it has not applied yet)."""
        if delta:
            self._pending.add(delta)
            self._record()

    def _record(self) -> None:
        self._recorded += 1
        metrics.NAT_PENDING.set(len(self._pending))
        self._wake.notify()

    def _kernel_ready(self) -> bool:
        return self.enabled and not self._stopped and self._reconciler is not None

    # -- the worker: the only place that changes the kernel's steer map ------------------------------
    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not self._due():
                    self._wake.wait(self._retry_in())
                if self._stopped:
                    return
                reader = self._reset_from
                self._busy = "reset" if reader is not None else ""
            try:
                if reader is not None and not self._reset_model(reader):
                    continue  # the state changed wholesale again meanwhile: read it once more
                self._kernel_round()
            except Exception as e:  # a bug must not end kernel steering silently: say so, count it, retry
                metrics.NAT_WORKER_ERRORS.labels("internal").inc()
                log.exception("nat: the kernel worker failed (retry %d: a rebuild, with backoff)", self._failures + 1)
                with self._lock:
                    self._busy = ""
                    self._rounds += 1
                    self._fail_round()
                    self._bugs += 1
                    bugs = self._bugs
                self._wake_waiters()
                if bugs == FATAL_AFTER and self.on_fatal is not None:
                    self.on_fatal(f"nat: the kernel worker failed {bugs} times in a row ({e!r})")

    def _due(self) -> bool:
        return (self._reset_from is not None or bool(self._pending)) and time.monotonic() >= self._retry_at

    def _retry_in(self) -> float | None:
        due = self._reset_from is not None or bool(self._pending)
        return max(0.0, self._retry_at - time.monotonic()) if due and self._retry_at else None

    def _reset_model(self, reader: PoolReader) -> bool:
        """Build the model of a whole new state aside (O(pool), outside our lock), then swap it in
        with the changes applied meanwhile replayed onto it (each is an assignment: replaying one the
        state already held changes nothing). False when it must be read again (another reset came,
        or more changes arrived than ``_raw`` keeps)."""
        with self._lock:
            generation = self._resets
            model = SteerModel(self._space)
            model.adopt_node_ips(self._model)
        mappings = list(reader.mappings())
        targets = {d: reader.targets(d) for d in {m.domain for m in mappings}}
        model.reset(mappings, targets)
        with self._lock:
            if generation != self._resets:
                return False
            if self._raw_lost:  # changes since the overflow are in the next read; collect from now on
                self._raw, self._raw_size, self._raw_lost = [], 0, False
                return False
            model.adopt_node_ips(self._model)  # a netmap change while building
            for changes in self._raw:
                model.apply(changes)
            self._reset_from = None
            self._raw, self._raw_size = [], 0
            self._model = model
            self._pending.mark_rebuild()
            return True

    def _kernel_round(self) -> None:
        with self._lock:
            rebuild, delta = self._pending.take()
            seq = self._recorded
            kernel = self._kernel_ready()
            parts = self._model.parts() if rebuild and kernel else None
            self._busy = ("rebuild" if rebuild else "delta") if kernel else ""
            metrics.NAT_PENDING.set(0)
        ok = self._round(delta, parts) if kernel else True  # kernel off: the model is all there is
        with self._lock:
            self._busy = ""
            self._rounds += 1
            if ok:
                self._installed = seq
                self._failures = self._bugs = 0
                self._out_of_sync = False
                self._built = self._built or kernel
            elif ok is None:  # a refused delta: rebuild at once
                self._pending.mark_rebuild()
                self._out_of_sync = True
            else:
                self._fail_round()
            metrics.NAT_ELEMENTS.set(len(self._model))
            metrics.NAT_ELEMENTS6.set(self._model.count6())
        self._wake_waiters()

    def _fail_round(self) -> None:
        """Under the lock: rebuild later, with backoff (0.5 s doubling to 30 s)."""
        self._pending.mark_rebuild()
        self._out_of_sync = True
        self._failures += 1
        self._retry_at = time.monotonic() + min(RETRY_MAX, RETRY_FIRST * 2 ** (self._failures - 1))

    def _round(self, delta: Delta, parts: list[dict[Key, Address]] | None) -> bool | None:
        """One transaction: True when the kernel took it, None for a refused delta (rebuild next),
        False for a failed rebuild (reported; retried with backoff)."""
        assert self._reconciler is not None
        if parts is None:
            try:
                self._reconciler.apply(delta)
                return True
            except NftError as e:
                log.warning("nat: steer map change refused (%s); rebuilding the table from the pool", e)
                return None
        try:
            self._reconciler.rebuild(flatten(parts))
            return True
        except NftError as e:
            if not self._built and not self._reconciler.exists():
                self._disable(f"nftables refused table inet appconnector ({e})")
                return True  # DNS-only from now on: nothing is pending for a kernel we do not use
            metrics.NAT_WORKER_ERRORS.labels("nftables").inc()
            log.error("nat: rebuilding table inet appconnector failed (retry %d, with backoff): %s",
                      self._failures + 1, e)
            return False

    # -- waiting for the worker (event loop; never blocks it) ----------------------------------------
    async def _wait(self, done: Callable[[], bool]) -> None:
        assert self._loop is not None
        if done():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            self._waiters.append((done, fut))
        if done():  # the worker may have finished between the check and the append
            self._settle()
        await fut

    def _wake_waiters(self) -> None:
        loop = self._loop
        if loop is not None and self._waiters and not loop.is_closed():
            loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            waiting, self._waiters = self._waiters, []
        keep = []
        for done, fut in waiting:
            if fut.done():
                continue
            if done():
                fut.set_result(None)
            else:
                keep.append((done, fut))
        with self._lock:
            self._waiters.extend(keep)

    async def ready(self, node: str, address: Address) -> None:
        """Wait until the kernel holds every change recorded so far: after a checkout returned, the
        mapping it made steers (or it has no element: no target, no known node IP). Returns at once
        when the kernel part is off or failing (waiting for a retry in backoff would only delay the
        answer). Callers bound the wait (DNS: ``NAT_READY_TIMEOUT``)."""
        with self._lock:
            target = self._recorded
        await self._wait(lambda: self._installed >= target or not self._kernel_ready() or self._failures > 0)

    # -- reads ---------------------------------------------------------------------------------------
    def installed(self, node: str, address: Address) -> bool:
        """True when the kernel steers ``node``'s traffic to ``address`` (its element is in place)."""
        with self._lock:
            return (self._kernel_ready() and not self._out_of_sync and self._installed == self._recorded
                    and self._model.installed(node, address))

    def domains(self) -> list[str]:
        """Domains that have mappings (what the leader keeps resolved)."""
        with self._lock:
            return self._model.domains()

    def status(self) -> dict[str, Any]:
        """Published values only (no wait for the worker): readiness reads this."""
        return {"enabled": self.enabled, "reason": self.reason, "mappings": self._model.mapping_count(),
                "steer_elements": len(self._model), "out_of_sync": self._out_of_sync,
                "pending": self._recorded - self._installed, "worker": self._busy or "idle",
                "worker_failures": self._failures, "touches_queued": self.touches_queued,
                "target_proposals": self._refresher.proposals if self._refresher else 0}

    def check(self) -> tuple[bool, str]:
        """Readiness: ok when steering (or DNS-only by configuration: ``nat.enabled = false``)."""
        if not self.settings.enabled:
            return True, "off (nat.enabled = false): DNS only"
        st = self.status()
        if not st.get("enabled"):
            return False, f"kernel steering off: {st.get('reason')}"
        if st.get("out_of_sync"):
            return False, "kernel table out of sync; rebuilding"
        return True, f"{st.get('steer_elements')} steer element(s)"

    def _purge(self, pairs: list[Key]) -> None:
        try:
            n = seen.conntrack_purge(pairs)
            if n:
                log.info("nat: deleted %d conntrack entries of reassigned addresses", n)
        except OSError as e:
            log.warning("nat: conntrack purge failed: %s", e)

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
        pairs: set[Key] = set(await asyncio.to_thread(reconciler.read_seen))
        if conntrack:  # the slow cadence: listing costs grow with the seen set, so the counter waits too
            pairs |= await loop.run_in_executor(self._netlink, seen.conntrack_pairs, self._pool, self._pool6)
            rejected, dropped = await asyncio.to_thread(reconciler.unmapped_counts)
            metrics.NAT_UNMAPPED_REJECTS.set(rejected)
            metrics.NAT_UNMAPPED_DROPS.set(dropped)

        def node_for_ip(ip: int) -> str | None:
            with self._lock:
                return self._model.node_for_ip(ip)

        # a v6 pair names the mapping by its v4 address (the one the pool knows)
        pairs = {(ip, a if a <= V4_MAX else (self._space.to_v4(a) or 0)) for ip, a in pairs}
        metrics.NAT_SEEN_FLOWS6.inc(sum(1 for ip, _ in pairs if ip > V4_MAX))
        queued = seen.touches(pairs, node_for_ip, self.replica, self.replica.now(), self.touch_refresh)
        self.touches_queued += queued
        return queued
