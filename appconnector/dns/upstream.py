"""Upstream resolution of app domains: configured resolvers (or /etc/resolv.conf), with a cache.

UDP first, TCP when the answer comes back truncated. Each resolver is asked in turn; SERVFAIL,
REFUSED, garbage or silence within ``timeout`` moves on to the next, and when none answers the
result is a failure (the service answers SERVFAIL). Positive answers are cached by their TTL,
NXDOMAIN/NODATA by the SOA minimum (RFC 2308), failures for a second so a dead upstream is not
hammered. Concurrent lookups of one (name, type) share one query. Messages are built and read by
``wire`` (fuzzed with the rest of it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

from appconnector.dns import wire
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
_CACHE_HIT = DNS_UPSTREAM_CACHE.labels("hit")
_CACHE_MISS = DNS_UPSTREAM_CACHE.labels("miss")
CHANNEL_QUERIES = 1000         # queries per upstream UDP socket before a fresh one (new source port)


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


class _UdpChannel(asyncio.DatagramProtocol):
    """A UDP socket connected to one resolver, shared by concurrent queries (matched by ID): a socket
    per query cost more than the rest of a new name. Replaced after ``CHANNEL_QUERIES`` queries so the
    source port keeps changing (an off-path spoofer must guess port and ID)."""

    def __init__(self) -> None:
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.used = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if len(data) >= 12:
            fut = self.pending.pop(int.from_bytes(data[:2], "big"), None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: every query here fails fast
        self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("upstream socket closed"))

    def _fail(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)


class UpstreamResolver:
    """Looks names up through ``servers`` (``[(ip, port)]``); empty means /etc/resolv.conf."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.servers = list(servers) or system_resolvers()
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, Resolution]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[Resolution]] = {}
        self._channels: dict[tuple[str, int], _UdpChannel] = {}
        self._opening: dict[tuple[str, int], asyncio.Future[_UdpChannel]] = {}
        self._closed = False

    async def resolve(self, domain: str, qtype: int) -> Resolution:
        """Addresses of ``domain`` (normalised, no trailing dot) of ``qtype`` (A or AAAA), or its raw
        records (SVCB, HTTPS)."""
        key = (domain, qtype)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            _CACHE_HIT.inc()
            res = cached[1]
            remaining = max(0, int(cached[0] - now))
            return dataclasses.replace(res, ttl=min(res.ttl, remaining))
        _CACHE_MISS.inc()
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

    async def ipv4_targets(self, domain: str) -> tuple[list[int], float]:
        """The domain's real IPv4 addresses (as ints, ascending) and their TTL, for the leader's target
        refresh (``nat.targets``); raises LookupError on NXDOMAIN, NODATA or failure. Shares the cache."""
        res = await self.resolve(domain, wire.TYPE_A)
        if res.kind != "ok":
            raise LookupError(f"{res.kind} {res.detail}".strip())
        return [int(ipaddress.IPv4Address(a)) for a in res.addresses], float(res.ttl)

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
            except (OSError, ValueError, EOFError, asyncio.IncompleteReadError) as e:
                problems.append(f"{server[0]}:{server[1]}: {e}")
                continue
            if res.kind != "failure":
                DNS_UPSTREAM.labels(res.kind).inc()
                return res
            problems.append(f"{server[0]}:{server[1]}: {res.detail}")
        DNS_UPSTREAM.labels("failure").inc()
        return Resolution("failure", detail="; ".join(problems))

    async def _ask(self, server: tuple[str, int], domain: str, qtype: int) -> Resolution:
        channel = await self._channel(server)
        ident = random.getrandbits(16)
        while ident in channel.pending:
            ident = random.getrandbits(16)
        packet = wire.build_query(ident, domain, qtype)
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        channel.pending[ident] = done
        try:
            assert channel.transport is not None
            channel.transport.sendto(packet)
            reply = wire.parse_response(await done)
        finally:
            if channel.pending.get(ident) is done:
                del channel.pending[ident]
        if reply.truncated:
            reply = wire.parse_response(await self._tcp(server, packet))
        return interpret(reply, ident, domain, qtype)

    async def _channel(self, server: tuple[str, int]) -> _UdpChannel:
        if self._closed:  # a late caller (the leader's target refresh stops after DNS) must not open a socket
            raise OSError("resolver closed")
        channel = self._channels.get(server)
        if channel is None or channel.transport is None or channel.transport.is_closing() \
                or channel.used >= CHANNEL_QUERIES:
            opening = self._opening.get(server)
            if opening is None:  # one new socket however many queries arrive while it opens
                opening = self._opening[server] = asyncio.ensure_future(self._open(server))
            channel = await asyncio.shield(opening)
        channel.used += 1
        return channel

    async def _open(self, server: tuple[str, int]) -> _UdpChannel:
        loop = asyncio.get_running_loop()
        try:
            _, channel = await loop.create_datagram_endpoint(_UdpChannel, remote_addr=server)
        finally:
            del self._opening[server]
        old = self._channels.get(server)
        if old is not None and old.transport is not None:
            # retire the old socket once answers still in flight have had their time
            loop.call_later(self.timeout + 0.5, old.transport.close)
        self._channels[server] = channel
        return channel

    def close(self) -> None:
        """Close the shared sockets (the service calls this on stop); later lookups fail without asking."""
        self._closed = True
        for channel in self._channels.values():
            if channel.transport is not None:
                channel.transport.close()
        self._channels.clear()

    async def _tcp(self, server: tuple[str, int], packet: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(server[0], server[1])
        try:
            writer.write(struct.pack("!H", len(packet)) + packet)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(length)
        finally:
            writer.close()


def interpret(reply: wire.Response, ident: int, domain: str, qtype: int) -> Resolution:
    """Turn an upstream response into a Resolution (pure; follows CNAME chains inside the answer)."""
    if reply.ident != ident:
        return Resolution("failure", detail="reply does not match the query")
    if reply.qname != domain or reply.qtype != qtype:
        return Resolution("failure", detail="reply is for another question")
    if reply.rcode == wire.NXDOMAIN:
        return Resolution("nxdomain", ttl=_negative_ttl(reply))
    if reply.rcode != wire.NOERROR:
        return Resolution("failure", detail=f"rcode {wire.RCODE_NAMES.get(reply.rcode, reply.rcode)}")
    name = domain
    ttl = MAX_CACHE_TTL
    addresses: list[str] = []
    records: list[bytes] = []
    for _ in range(MAX_CNAME_CHAIN):
        target = None
        for rr in reply.answers:
            if rr.name != name:
                continue
            if rr.rtype == qtype and isinstance(rr.value, str):
                addresses.append(rr.value)
                ttl = min(ttl, rr.ttl)
            elif rr.rtype == qtype and isinstance(rr.value, bytes):
                records.append(rr.value)
                ttl = min(ttl, rr.ttl)
            elif rr.rtype == wire.TYPE_CNAME and isinstance(rr.value, str):
                target = rr.value
                ttl = min(ttl, rr.ttl)
        if addresses or records or target is None:
            break
        name = target
    if records:
        return Resolution("ok", ttl=ttl, records=tuple(records))
    if not addresses:
        return Resolution("nodata", ttl=_negative_ttl(reply))
    ordered = sorted(set(addresses), key=ipaddress.ip_address)
    return Resolution("ok", tuple(ordered), ttl)


def _negative_ttl(reply: wire.Response) -> int:
    for rr in reply.authority:
        if rr.rtype == wire.TYPE_SOA and isinstance(rr.value, int):
            return min(rr.ttl, rr.value)
    return NO_SOA_NEGATIVE_TTL
