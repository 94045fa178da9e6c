"""The DNS service: listeners + answer policy + upstream resolver + pool checkout, wired together.

    service = DnsService(DnsSettings.from_config(cfg), pool, identity)   # nat_ready optional, see below
    await service.start()                            # binds settings.listen (UDP and TCP)
    ...
    await service.stop()                             # stops reading, drains queries in flight

``nat_ready(node, address)``, when given, is awaited after a new checkout and before the answer goes
out, for a NAT layer that installs mappings asynchronously (the first packet must find its steer
element): the connector passes ``NatService.ready``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appconnector.dns import svcb, wire
from appconnector.dns.access import NO_APP, AppAccess
from appconnector.dns.fastpath import FastPath
from appconnector.dns.guard import AccessGuard
from appconnector.dns.policy import Action, AnswerPolicy, DomainAllowList, Reply, Resolution, classify
from appconnector.dns.server import DnsServer
from appconnector.dns.settings import DnsSettings
from appconnector.dns.upstream import UpstreamResolver
from appconnector.metrics import (
    DNS_AAAA,
    DNS_FAST_PATH,
    DNS_FIRST_ANSWER,
    DNS_LOOPS,
    DNS_MALFORMED,
    DNS_QUERIES,
    DNS_REFUSED_BY_POLICY,
    DNS_SERVFAIL,
    DNS_SVCB,
    DNS_UNKNOWN_CLIENTS,
)
from appconnector.pool.addresses import V4_MAX, DualSpace
from appconnector.pool.api import (
    Address,
    PoolAccess,
    PoolExhausted,
    ReplicaOverloaded,
    ReplicaUnavailable,
    clock_tick,
    touch_refresh,
)
from appconnector.pool.names import normalise_domain
from appconnector.ratelimit import RateLimitedLog
from appconnector.tailnet.api import NodeDirectory, NodeIdentity, NodeInfo, TailnetUnavailable

log = logging.getLogger(__name__)

NatReady = Callable[[str, Address], Awaitable[None]]
NAT_READY_TIMEOUT = 2.0


def local_answer_age(reuse_after: float) -> float:
    """The oldest stored last-used a hit may be answered from local state.

    A lagging member (partitioned, restarted, slow) may still hold a mapping the cluster has already
    reclaimed for another domain, but only one idle on the pool clock for ``reuse_window`` (reuse_after
    plus a tick); its local last-used can only be older than the committed one, and its reading of the
    pool clock (``PoolAccess.now``) is behind the cluster's by at most its apply lag (``pool/clock.py``).
    So a mapping idle for less than ``reuse_after - refresh`` on this member's reading cannot have been
    reclaimed yet while that lag stays below ``refresh`` plus a tick; an older one is confirmed through a
    Raft checkout, which this member applies in log order, after any reuse. A member catching up
    (``PoolAccess.caught_up()`` False) applies old ticks late, so its reading may be behind by the whole
    backlog: it answers nothing from local state until it is current. No wall clock is involved: a
    member's clock days off changes nothing here.
    """
    return reuse_after - touch_refresh(reuse_after)


class DnsService:
    """Answers A/AAAA for app domains with pool addresses (docs/design.md §4). See the module docstring."""

    def __init__(self, settings: DnsSettings, replica: PoolAccess, identity: NodeIdentity,
                 nat_ready: NatReady | None = None, *, upstream: UpstreamResolver | None = None,
                 directory: NodeDirectory | None = None) -> None:
        self.settings = settings
        self.replica = replica
        self.identity = identity
        self.nat_ready = nat_ready
        self.policy = AnswerPolicy(ttl=int(settings.ttl), allow=DomainAllowList(settings.domains))
        self.upstream = upstream if upstream is not None else UpstreamResolver(list(settings.upstream))
        self._pool_nets = list(settings.pool)
        self._pool6_nets = list(settings.pool6)
        self._space = DualSpace(settings.pool_prefixes, settings.pool_prefixes6)
        self._v6 = bool(settings.pool6)  # AAAA of steered names with real IPv6 → the v6 pool mirror
        self._ignore_nets = list(settings.ignore)
        node_of = None if identity.node_is_source_ip else identity.cached  # None: node = IP
        self.max_age = local_answer_age(settings.reuse_after)
        # the fast path's clock is coarse (advanced every clock_tick, a tenth of the refresh interval at
        # most): its limit allows for that; its touches read the exact clock (they are rare)
        self.fast_clock_tick = clock_tick(settings.reuse_after)
        self.fast = FastPath(node_of, replica.touch, touch_refresh(settings.reuse_after), replica.now(),
                             self.max_age - self.fast_clock_tick, clock=replica.now)
        # QueryHandler.fast_answer is the fast path's own method: one Python call less per query
        self.fast_answer: Callable[[bytes, str], bytes | None] = self.fast.answer
        self.server = DnsServer(self, list(settings.listen))
        self._errors = RateLimitedLog(log)
        self._clock_task: asyncio.Task[None] | None = None
        self._fast_reported = 0
        self._fast_queries = DNS_QUERIES.labels("fast", "NOERROR")
        self._query_counters: dict[tuple[str, int], Any] = {}
        self.refusing: str | None = None  # why every query gets REFUSED (this member left the cluster)
        # Called with the node of a query that can only have come through the pool routes (every listener
        # is a pool address): evidence that they are served (tailnet.routes.RouteServing).
        self.on_routed_query: Callable[[NodeInfo], None] | None = None
        self._routed_only = all(any(ipaddress.ip_address(h) in n for n in self._pool_nets)
                                for h, _ in settings.listen)
        self.access = AppAccess(settings.apps)
        self.guard = AccessGuard(self.access, replica, identity, directory, settings.access_recheck,
                                 self.fast.clear) if self.access.active else None
        self._guard_task: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------------

    @property
    def bound(self) -> list[tuple[str, int]]:
        """Where the listeners are (the real ports when the config asked for port 0)."""
        return self.server.bound

    async def start(self) -> None:
        self.replica.add_observer(self.fast)
        self._clock_task = asyncio.get_running_loop().create_task(self._tick())
        try:
            await self.server.start()
        except BaseException:
            self._clock_task.cancel()
            raise
        if self.guard is not None and self.refusing is None:
            self._guard_task = asyncio.get_running_loop().create_task(self.guard.run())
        if not self.upstream.servers and self.settings.verify_upstream:
            log.warning("DNS: no upstream resolvers (dns.upstream empty, none in /etc/resolv.conf): "
                        "every new name gets SERVFAIL")

    async def stop(self) -> None:
        await self.server.stop()
        self.upstream.close()
        if self._guard_task is not None:
            self._guard_task.cancel()
            await asyncio.gather(self._guard_task, return_exceptions=True)
        if self._clock_task is not None:
            self._clock_task.cancel()
            await asyncio.gather(self._clock_task, return_exceptions=True)
        self._report_fast()

    def refuse_all(self, reason: str) -> None:
        """From now on answer every query REFUSED (resolvers then ask the next server at once): this
        member's pool copy no longer follows the cluster. The fast path's cache goes so nothing skips it."""
        self.refusing = reason
        self.fast.clear()
        if self._guard_task is not None:  # its pool copy is not the cluster's: nothing to release from it
            self._guard_task.cancel()

    async def _tick(self) -> None:
        """Advance the fast path's coarse clock (pool time) and publish its counters."""
        while True:
            # a member that is catching up must not answer from local state: its clock may be behind
            self.fast.now = self.replica.now() if self.replica.caught_up() else math.inf
            self._report_fast()
            await asyncio.sleep(self.fast_clock_tick)

    def _report_fast(self) -> None:
        hits = self.fast.hits
        if hits != self._fast_reported:
            DNS_FAST_PATH.inc(hits - self._fast_reported)
            self._fast_queries.inc(hits - self._fast_reported)
            self._fast_reported = hits

    # ---- QueryHandler --------------------------------------------------------------------------------

    async def answer(self, data: bytes, ip: str, transport: str) -> bytes | None:
        """The general path: parse, decide, look up, encode. Never raises."""
        try:
            query = wire.parse_query(data)
        except wire.Malformed as e:
            DNS_MALFORMED.labels(transport).inc()
            self._errors.info("malformed", "DNS: dropped a %d-byte message from %s: %s", len(data), ip, e)
            return None
        except wire.FormatError as e:
            DNS_MALFORMED.labels(transport).inc()
            self._errors.info("formerr", "DNS: FORMERR to %s: %s", ip, e)
            self._count(transport, wire.FORMERR)
            return wire.encode_error(e.ident, e.flags, wire.FORMERR)
        started = time.perf_counter()
        try:
            reply, fresh = await self._reply(query, ip)
        except Exception:
            self._errors.exception("internal", "DNS: internal error answering %s", ip)
            DNS_SERVFAIL.labels("internal").inc()
            reply, fresh = Reply(wire.SERVFAIL), False
        if fresh:
            DNS_FIRST_ANSWER.observe(time.perf_counter() - started)
        limit = wire.udp_limit(query) if transport == "udp" else None
        self._count(transport, reply.rcode)
        return wire.encode_response(query, reply.rcode, reply.answers, reply.authority, udp_limit=limit)

    def _count(self, transport: str, rcode: int) -> None:
        child = self._query_counters.get((transport, rcode))
        if child is None:  # labels() takes a lock and builds a key: once per (transport, rcode)
            child = self._query_counters[(transport, rcode)] = DNS_QUERIES.labels(
                transport, wire.RCODE_NAMES.get(rcode, str(rcode)))
        child.inc()

    # ---- the decision ---------------------------------------------------------------------------------

    async def _reply(self, q: wire.Query, ip: str) -> tuple[Reply, bool]:
        """The reply and whether a new mapping was checked out for it."""
        if self.refusing is not None:
            self._errors.info("refusing", "DNS: REFUSED %s: %s", ip, self.refusing)
            return Reply(wire.REFUSED), False
        early = self.policy.precheck(q)
        if early is not None:
            return early, False
        domain = q.domain()
        if domain is not None:
            try:
                domain = normalise_domain(domain)
            except ValueError:
                domain = None
        if not self.policy.domain_allowed(domain):
            return Reply(wire.REFUSED), False
        assert domain is not None
        try:
            info = self.identity.cached(ip) or await self.identity.whois(ip)
        except TailnetUnavailable as e:
            self._errors.warning("tailnet", "DNS: SERVFAIL, cannot ask tailscaled who %s is: %s", ip, e)
            DNS_SERVFAIL.labels("tailnet").inc()
            return Reply(wire.SERVFAIL), False
        if info is None:
            DNS_UNKNOWN_CLIENTS.inc()
            self._errors.info("stranger", "DNS: REFUSED %s: not a tailnet node", ip)
            return Reply(wire.REFUSED), False
        if self.on_routed_query is not None and self._routed_only:
            self.on_routed_query(info)
        if self.access.active:
            app = self.access.refused_app(domain, self.access.allowed_apps(info, ip))
            if app is not None:  # before any lookup: no mapping, so the kernel has nothing to steer
                DNS_REFUSED_BY_POLICY.labels(app).inc()
                why = "no [[apps]] entry covers it" if app == NO_APP else f"no access to app {app}"
                self._errors.info("policy", "DNS: REFUSED %s for %s: %s", domain, info.name or info.node, why)
                return Reply(wire.REFUSED), False
        if q.qtype in (wire.TYPE_SVCB, wire.TYPE_HTTPS):
            return await self._service_binding(q, domain), False
        if q.qtype not in (wire.TYPE_A, wire.TYPE_AAAA):
            return self.policy.local(q.qtype), False
        return await self._address(q, info, domain)

    async def _steered(self, domain: str) -> bool:
        """Whether an A query for ``domain`` would be answered from the pool (with
        ``dns.verify_upstream``): allowed by ``dns.domains`` and resolving to addresses we steer."""
        if not self.policy.domain_allowed(domain):
            return False
        res = await self.upstream.resolve(domain, wire.TYPE_A)
        return classify(res, self._pool_nets, self._ignore_nets) is Action.CHECKOUT

    async def _service_binding(self, q: wire.Query, domain: str) -> Reply:
        """HTTPS/SVCB of a steered name: upstream's records without address hints, only those whose
        target is "." or a name we steer (any other target would send the client around the
        connector). Names we do not steer get NODATA, as every other type does, and so does every
        name without ``dns.verify_upstream`` (that mode never asks upstream)."""
        if not self.settings.verify_upstream or not await self._steered(domain):
            return self.policy.local(q.qtype)
        res = await self.upstream.resolve(domain, q.qtype)
        if res.kind == "failure":
            DNS_SERVFAIL.labels("upstream").inc()
            self._errors.warning("upstream", "DNS: SERVFAIL for %s: upstream failed (%s)", domain, res.detail)
            return Reply(wire.SERVFAIL)
        if res.kind != "ok":
            return self.policy.nodata(res.ttl)
        try:
            records = [svcb.parse(r) for r in res.records]
        except svcb.Malformed as e:
            DNS_SVCB.labels("malformed").inc(len(res.records))
            self._errors.info("svcb", "DNS: NODATA for %s: upstream sent a malformed HTTPS/SVCB record (%s)",
                              domain, e)
            return self.policy.nodata(res.ttl)
        passed = []
        for record in records:
            if await self._target_steered(record, domain):
                passed.append(record)
                DNS_SVCB.labels("passed").inc()
            else:
                DNS_SVCB.labels("foreign_target").inc()
        return self.policy.service_bindings(q.qtype, passed, res.ttl)

    async def _target_steered(self, record: svcb.Svcb, owner: str) -> bool:
        """The target is "." (the owner itself; in AliasMode "no service"), the owner, or a name we steer."""
        if record.target == svcb.ROOT:
            return True
        target = wire.wire_name_to_domain(record.target)  # None: not a host name, we could not steer it
        return target is not None and (target == owner or await self._steered(target))

    async def _address(self, q: wire.Query, info: NodeInfo, domain: str) -> tuple[Reply, bool]:
        node = info.node
        generation = self.fast.generation
        known = self.replica.lookup(node, domain)
        now = self.replica.now()
        v6_query = self._v6 and q.qtype == wire.TYPE_AAAA
        if known is not None and now - known[1] < self.max_age and self.replica.caught_up() and (
                not v6_query or _has_v6(self.replica.targets(domain))):
            address, last_used = known
            if now - last_used >= self.fast.refresh:
                self.replica.touch(node, address, domain, now)
                last_used = now
            reply = self.policy.pool_answer(q.qtype, address, self._space.to_v6(address) if v6_query else None)
            if v6_query:  # fast-path entries die with mappings, not with a domain's IPv6 targets
                DNS_AAAA.labels("v6_pool").inc()
            else:
                self.fast.store(q, node, domain, address, last_used, reply.rcode, reply.answers,
                                reply.authority, generation)
            return reply, False

        targets: tuple[Address, ...] = ()
        ttl = float(self.settings.ttl)
        if self.settings.verify_upstream:
            res = await self.upstream.resolve(domain, wire.TYPE_A)
            action = classify(res, self._pool_nets, self._ignore_nets)
            if action is Action.FAILURE:
                DNS_SERVFAIL.labels("upstream").inc()
                self._errors.warning("upstream", "DNS: SERVFAIL for %s: upstream failed (%s)", domain, res.detail)
                return Reply(wire.SERVFAIL), False
            if action is Action.LOOP:
                DNS_LOOPS.inc()
                DNS_SERVFAIL.labels("loop").inc()
                self._errors.warning(
                    "loop", "DNS loop: upstream answered %s with pool address(es) %s; set dns.upstream to a "
                    "resolver that does not forward app domains back to us (not 100.100.100.100)",
                    domain, ", ".join(res.addresses))
                return Reply(wire.SERVFAIL), False
            if action is Action.NXDOMAIN:
                return self.policy.nxdomain(q.qname, res.ttl), False
            if action is Action.NODATA:
                return self.policy.nodata(res.ttl), False
            if action is Action.PASS_THROUGH:
                if q.qtype == wire.TYPE_A:
                    return self.policy.real_records(q.qtype, res), False
                res6 = await self.upstream.resolve(domain, wire.TYPE_AAAA)
                if res6.kind == "nxdomain":  # the name has an A: never NXDOMAIN for its AAAA
                    res6 = Resolution("nodata", ttl=res6.ttl)
                if res6.kind == "failure":
                    DNS_SERVFAIL.labels("upstream").inc()
                return self.policy.real_records(q.qtype, res6), False
            targets = tuple(sorted(int.from_bytes(socket.inet_aton(a), "big") for a in res.addresses))
            ttl = float(res.ttl)
            if self._v6:  # both families travel together, whichever was asked first
                v6 = await self._v6_targets(domain)
                if v6 is None and v6_query:
                    return Reply(wire.SERVFAIL), False
                if v6 is not None and v6[0]:  # an A answer does not wait for a failed AAAA: v4 alone
                    targets, ttl = targets + v6[0], min(ttl, v6[1])
        if q.qtype != wire.TYPE_A and not (v6_query and _has_v6(targets)):
            if v6_query:
                DNS_AAAA.labels("nodata").inc()
            return self.policy.nodata(), False  # AAAA without real IPv6 (or no v6 pool): nothing to steer
        try:
            address = await self.replica.checkout(node, domain, targets, ttl)
            if v6_query and not _has_v6(self.replica.targets(domain)):
                # mapped before its IPv6 was known (or before prefixes6): the kernel needs the v6 targets
                await self.replica.set_targets(domain, targets, ttl)
        except PoolExhausted as e:
            DNS_SERVFAIL.labels("exhausted").inc()
            self._errors.warning("exhausted", "DNS: SERVFAIL for %s from %s: %s", domain, info.name or node, e)
            return Reply(wire.SERVFAIL), False
        except ReplicaOverloaded as e:
            DNS_SERVFAIL.labels("overloaded").inc()
            self._errors.warning("overloaded", "DNS: SERVFAIL for %s: %s", domain, e)
            return Reply(wire.SERVFAIL), False
        except ReplicaUnavailable as e:  # incl. pool.checkout_timeout passing without a quorum
            DNS_SERVFAIL.labels("unavailable").inc()
            self._errors.warning("unavailable", "DNS: SERVFAIL for %s: pool unavailable (%s)", domain, e)
            return Reply(wire.SERVFAIL), False
        if self.nat_ready is not None:
            try:
                await asyncio.wait_for(self.nat_ready(node, address), NAT_READY_TIMEOUT)
            except TimeoutError:
                self._errors.warning("nat", "DNS: NAT not ready for %s after %.0fs; answering anyway",
                                     domain, NAT_READY_TIMEOUT)
        reply = self.policy.pool_answer(q.qtype, address, self._space.to_v6(address) if v6_query else None)
        if v6_query:
            DNS_AAAA.labels("v6_pool").inc()
        else:
            self.fast.store(q, node, domain, address, self.replica.now(), reply.rcode, reply.answers,
                            reply.authority, generation)
        return reply, True

    async def refresh_targets(self, domain: str) -> tuple[list[int], float]:
        """The leader's target refresh (``nat.targets``): the real IPv4 addresses, then (with
        ``pool.prefixes6``) the real IPv6 ones; a failed AAAA keeps the domain's replicated IPv6
        targets. Raises LookupError when the A lookup gives no address. Shares the upstream cache."""
        found, ttl = await self.upstream.ipv4_targets(domain)
        if not self._v6:
            return found, ttl
        v6 = await self._v6_targets(domain)
        if v6 is None:
            return found + [a for a in self.replica.targets(domain) if a > V4_MAX], ttl
        return found + list(v6[0]), (min(ttl, v6[1]) if v6[0] else ttl)

    async def _v6_targets(self, domain: str) -> tuple[tuple[Address, ...], float] | None:
        """The name's real IPv6 addresses (as integers) and their TTL; () when it has none; None (after
        counting and logging) when upstream failed or answered inside the v6 pool (a loop)."""
        res = await self.upstream.resolve(domain, wire.TYPE_AAAA)
        if res.kind == "failure":
            DNS_SERVFAIL.labels("upstream").inc()
            self._errors.warning("upstream", "DNS: SERVFAIL for %s: upstream AAAA failed (%s)", domain, res.detail)
            return None
        found = tuple(sorted({int(ipaddress.IPv6Address(a)) for a in res.addresses} if res.kind == "ok" else ()))
        if classify(res, self._pool6_nets, ()) is Action.LOOP:
            DNS_LOOPS.inc()
            DNS_SERVFAIL.labels("loop").inc()
            self._errors.warning("loop", "DNS loop: upstream answered %s with v6 pool address(es) %s; set "
                                 "dns.upstream to a resolver that does not forward app domains back to us",
                                 domain, ", ".join(res.addresses))
            return None
        # ::/96 and v4-mapped addresses are no IPv6 destinations (and ::/96 would read as IPv4 here)
        return tuple(a for a in found if a > V4_MAX and a >> 32 != 0xFFFF), float(res.ttl)


def _has_v6(targets: tuple[Address, ...]) -> bool:
    return bool(targets) and targets[-1] > V4_MAX  # sorted: IPv6 integers come last
