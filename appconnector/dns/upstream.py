"""Upstream resolution of app domains: configured resolvers (or /etc/resolv.conf), with a cache.

UDP first, TCP when the answer comes back truncated. Each resolver is asked in turn; SERVFAIL,
REFUSED, garbage or silence within ``timeout`` moves on to the next, and when none answers the
result is a failure (the service answers SERVFAIL). Positive answers are cached by their TTL,
NXDOMAIN/NODATA by the SOA minimum (RFC 2308), failures for a second so a dead upstream is not
hammered. Concurrent lookups of one (name, type) share one query. Messages are built and parsed with
dnslib: this path only runs for names not yet in the pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import dnslib

from appconnector.dns.policy import Resolution
from appconnector.metrics import DNS_UPSTREAM, DNS_UPSTREAM_CACHE
from appconnector.tailnet.loops import resolv_conf_nameservers

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0          # per resolver
FAILURE_CACHE_SECONDS = 1.0
NO_SOA_NEGATIVE_TTL = 5        # RFC 2308 §5: no SOA, do not cache long
MAX_CACHE_TTL = 86400
MAX_CACHE_ENTRIES = 200_000
MAX_CNAME_CHAIN = 16


def system_resolvers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf as (ip, 53)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    servers = []
    for ip in resolv_conf_nameservers(text):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            continue
        servers.append((ip, 53))
    return servers


class _OneAnswer(asyncio.DatagramProtocol):
    """Receives the first datagram carrying our query ID (the socket is connected to the resolver)."""

    def __init__(self, ident: int, done: asyncio.Future[bytes]) -> None:
        self._ident = ident
        self._done = done

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if len(data) >= 12 and struct.unpack_from("!H", data)[0] == self._ident and not self._done.done():
            self._done.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: fail fast
        if not self._done.done():
            self._done.set_exception(exc)


class UpstreamResolver:
    """Looks names up through ``servers`` (``[(ip, port)]``); empty means /etc/resolv.conf."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.servers = list(servers) or system_resolvers()
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, Resolution]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[Resolution]] = {}

    async def resolve(self, domain: str, qtype: int) -> Resolution:
        """Addresses of ``domain`` (normalised, no trailing dot) of ``qtype`` (A or AAAA)."""
        key = (domain, qtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            DNS_UPSTREAM_CACHE.labels("hit").inc()
            res = cached[1]
            remaining = max(0, int(cached[0] - now))
            return Resolution(res.kind, res.addresses, min(res.ttl, remaining), res.detail)
        DNS_UPSTREAM_CACHE.labels("miss").inc()
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            res = await self._lookup(domain, qtype)
            fut.set_result(res)
        except BaseException as e:  # cancelled while others wait: they get a failure, not a hang
            fut.set_result(Resolution("failure", detail=f"lookup aborted: {e!r}"))
            raise
        finally:
            del self._inflight[key]
        self._store(key, res)
        return res

    def _store(self, key: tuple[str, int], res: Resolution) -> None:
        ttl = FAILURE_CACHE_SECONDS if res.kind == "failure" else min(res.ttl, MAX_CACHE_TTL)
        if ttl <= 0:
            return
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            now = self._clock()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.clear()
        self._cache[key] = (self._clock() + ttl, res)

    def clear_cache(self) -> None:
        self._cache.clear()

    async def _lookup(self, domain: str, qtype: int) -> Resolution:
        if not self.servers:
            DNS_UPSTREAM.labels("failure").inc()
            return Resolution("failure", detail="no upstream resolvers (dns.upstream empty, none in /etc/resolv.conf)")
        problems = []
        for server in self.servers:
            try:
                res = await asyncio.wait_for(self._ask(server, domain, qtype), self.timeout)
            except TimeoutError:
                problems.append(f"{server[0]}:{server[1]} timed out")
                continue
            except (OSError, ValueError, EOFError, asyncio.IncompleteReadError, dnslib.DNSError) as e:
                problems.append(f"{server[0]}:{server[1]}: {e}")
                continue
            if res.kind != "failure":
                DNS_UPSTREAM.labels(res.kind).inc()
                return res
            problems.append(f"{server[0]}:{server[1]}: {res.detail}")
        DNS_UPSTREAM.labels("failure").inc()
        return Resolution("failure", detail="; ".join(problems))

    async def _ask(self, server: tuple[str, int], domain: str, qtype: int) -> Resolution:
        ident = random.getrandbits(16)
        query = dnslib.DNSRecord(dnslib.DNSHeader(id=ident, rd=1), q=dnslib.DNSQuestion(domain + ".", qtype))
        query.add_ar(dnslib.EDNS0(udp_len=1232))
        packet = query.pack()
        data = await self._udp(server, packet, ident)
        reply = dnslib.DNSRecord.parse(data)
        if reply.header.tc:
            data = await self._tcp(server, packet)
            reply = dnslib.DNSRecord.parse(data)
        return interpret(reply, ident, domain, qtype)

    async def _udp(self, server: tuple[str, int], packet: bytes, ident: int) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _OneAnswer(ident, done), remote_addr=server)
        try:
            transport.sendto(packet)
            return await done
        finally:
            transport.close()

    async def _tcp(self, server: tuple[str, int], packet: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()


def interpret(reply: dnslib.DNSRecord, ident: int, domain: str, qtype: int) -> Resolution:
    """Turn an upstream response into a Resolution (pure; follows CNAME chains inside the answer)."""
    if reply.header.id != ident or not reply.questions:
        return Resolution("failure", detail="reply does not match the query")
    q = reply.questions[0]
    if str(q.qname).lower().rstrip(".") != domain or q.qtype != qtype:
        return Resolution("failure", detail="reply is for another question")
    rcode = reply.header.rcode
    if rcode == dnslib.RCODE.NXDOMAIN:
        return Resolution("nxdomain", ttl=_negative_ttl(reply))
    if rcode != dnslib.RCODE.NOERROR:
        return Resolution("failure", detail=f"rcode {dnslib.RCODE.get(rcode)}")
    name = domain
    ttl = MAX_CACHE_TTL
    addresses: list[str] = []
    for _ in range(MAX_CNAME_CHAIN):
        target = None
        for rr in reply.rr:
            if str(rr.rname).lower().rstrip(".") != name:
                continue
            if rr.rtype == qtype:
                addresses.append(str(rr.rdata))
                ttl = min(ttl, rr.ttl)
            elif rr.rtype == dnslib.QTYPE.CNAME:
                target = str(rr.rdata.label).lower().rstrip(".")
                ttl = min(ttl, rr.ttl)
        if addresses or target is None:
            break
        name = target
    if not addresses:
        return Resolution("nodata", ttl=_negative_ttl(reply))
    ordered = sorted(set(addresses), key=lambda a: ipaddress.ip_address(a))
    return Resolution("ok", tuple(ordered), ttl)


def _negative_ttl(reply: dnslib.DNSRecord) -> int:
    for rr in reply.auth:
        if rr.rtype == dnslib.QTYPE.SOA:
            return int(min(rr.ttl, rr.rdata.times[-1]))
    return NO_SOA_NEGATIVE_TTL

