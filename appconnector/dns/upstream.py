"""Upstream resolution of app domains: configured resolvers (or /etc/resolv.conf), with a cache.

UDP first, TCP when the answer comes back truncated. Each resolver is asked in turn; SERVFAIL,
REFUSED, garbage or silence within ``timeout`` moves on to the next, and when none answers the
result is a failure (the service answers SERVFAIL). Positive answers are cached by their TTL,
NXDOMAIN/NODATA by the SOA minimum (RFC 2308), failures for a second so a dead upstream is not
hammered. Concurrent lookups of one (name, type) share one query. Messages are built and read by
``wire`` (fuzzed with the rest of it).

Against off-path spoofing (RFC 5452) every UDP query has a transaction ID from ``secrets`` and a socket
of its own, connected to the resolver: a fresh random ephemeral source port per query, and the kernel
delivers to it only datagrams from that resolver's address and port. A spoofer must guess the port and
the ID together (~2^31 tries per query here, Linux's ephemeral range × 2^16); datagrams with another ID,
or that are not responses, are ignored (counted in ``appconnector_dns_upstream_ignored``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import secrets
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from appconnector.dns import wire
from appconnector.dns.loops import RESOLV_CONF, resolv_conf_nameservers
from appconnector.dns.policy import Resolution
from appconnector.metrics import DNS_UPSTREAM, DNS_UPSTREAM_CACHE, DNS_UPSTREAM_IGNORED
from appconnector.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_ignored_log = RateLimitedLog(log, interval=60.0)  # answers that match no query: possibly spoofing

DEFAULT_TIMEOUT = 2.0          # per resolver
FAILURE_CACHE_SECONDS = 1.0
NO_SOA_NEGATIVE_TTL = 5        # RFC 2308 §5: no SOA, do not cache long
MAX_CACHE_TTL = 86400
MAX_CACHE_ENTRIES = 200_000
MAX_CNAME_CHAIN = 16
_CACHE_HIT = DNS_UPSTREAM_CACHE.labels("hit")
_CACHE_MISS = DNS_UPSTREAM_CACHE.labels("miss")
_QR = 0x80                     # first flags byte: this is a response


def system_resolvers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
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


class UpstreamResolver:
    """Looks names up through ``servers`` (``[(ip, port)]``); empty means /etc/resolv.conf."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.servers = list(servers) or system_resolvers()
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, Resolution]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[Resolution]] = {}
        self._waiting: dict[int, tuple[socket.socket, int, asyncio.Future[bytes]]] = {}  # fd → UDP query
        self._epoll: select.epoll | None = None
        self._epoll_loop: asyncio.AbstractEventLoop | None = None
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
        ident = secrets.randbelow(1 << 16)
        packet = wire.build_query(ident, domain, qtype)
        reply = wire.parse_response(await self._udp(server, packet, ident))
        if reply.truncated:
            reply = wire.parse_response(await self._tcp(server, packet))
        return interpret(reply, ident, domain, qtype)

    async def _udp(self, server: tuple[str, int], packet: bytes, ident: int) -> bytes:
        """Send ``packet`` from a socket of its own and wait for the response carrying ``ident``."""
        if self._closed:  # a late caller (the leader's target refresh stops after DNS) must not open a socket
            raise OSError("resolver closed")
        poller = self._poller()
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        fd = sock.fileno()
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[fd] = (sock, ident, done)
        try:
            sock.connect(server)  # binds a random ephemeral port; other sources never reach this socket
            sock.send(packet)
            poller.register(fd, select.EPOLLIN)
            return await done
        finally:
            del self._waiting[fd]
            sock.close()  # also leaves the epoll set

    def _poller(self) -> select.epoll:
        """One epoll set of our own for the query sockets, watched by the loop: registering each short-lived
        socket with the loop itself cost more than the rest of the query."""
        loop = asyncio.get_running_loop()
        if self._epoll is None:
            self._epoll = select.epoll()
        if self._epoll_loop is not loop:  # a new loop (tests run several): watch the set from this one
            loop.add_reader(self._epoll.fileno(), self._wake)
            self._epoll_loop = loop
        return self._epoll

    def _wake(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            entry = self._waiting.get(fd)
            if entry is not None:
                self._readable(*entry)

    def _readable(self, sock: socket.socket, ident: int, done: asyncio.Future[bytes]) -> None:
        while not done.done():
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP port unreachable and the like: this resolver fails fast
                done.set_exception(e)
                return
            if len(data) >= 12 and int.from_bytes(data[:2], "big") == ident and data[2] & _QR:
                done.set_result(data)
                return
            self._ignored(len(data) >= 12 and data[2] & _QR)

    def _ignored(self, response: int | bool) -> None:
        DNS_UPSTREAM_IGNORED.inc()
        _ignored_log.warning("ignored", "upstream DNS: ignored an answer that does not match its query (%s); a "
                             "steady count in appconnector_dns_upstream_ignored may be a spoofing attempt",
                             "wrong transaction ID" if response else "not a DNS response")

    def close(self) -> None:
        """Fail the queries in flight (their sockets close as they end); later lookups fail without asking."""
        self._closed = True
        for _, _, done in self._waiting.values():
            if not done.done():
                done.set_exception(OSError("resolver closed"))
        if self._epoll is not None:
            if self._epoll_loop is not None and not self._epoll_loop.is_closed():
                self._epoll_loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll, self._epoll_loop = None, None

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
