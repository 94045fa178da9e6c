"""UDP and TCP listeners (asyncio; uvloop when the application installs it).

Each datagram first tries the handler's synchronous fast path, answered inside the read callback;
everything else becomes a task on the general (async) path. TCP follows RFC 7766: two-byte length
framing, several queries per connection, an idle timeout. ``stop`` stops reading, lets the queries
already in flight finish (up to a deadline), then closes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable
from typing import Any, Protocol

from appconnector.dns import mmsg
from appconnector.metrics import DNS_DROPPED, DNS_UDP_SEND_ERRORS
from appconnector.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_errors = RateLimitedLog(log)

TCP_IDLE_TIMEOUT = 10.0
MAX_INFLIGHT = 10_000       # general-path queries + TCP connections at once; beyond that UDP queries are
                            # dropped (the client retries) and new TCP connections closed, after an idle
                            # TCP connection was closed to make room if there is one (RFC 7766 §6.2.3)
UDP_BUFFER = 4 << 20
UDP_BATCH = 64             # datagrams per readiness callback before yielding to the loop
RECV_SIZE = 65535
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # Linux; missing from some Python builds' socket module


class QueryHandler(Protocol):
    def fast_answer(self, data: bytes, ip: str) -> bytes | None:
        """A ready answer or None. Must not raise."""

    def answer(self, data: bytes, ip: str, transport: str) -> Awaitable[bytes | None]:
        """The answer (None: send nothing). Must not raise."""


def _batched(sock: socket.socket) -> mmsg.BatchSocket | None:
    if not mmsg.available(sock):
        return None
    try:
        return mmsg.BatchSocket(sock, UDP_BATCH)
    except OSError as e:
        log.warning("DNS: no batched UDP I/O here (%s): one recvfrom/sendto per datagram", e)
        return None


class _UdpListener:
    """One UDP socket, read with ``add_reader`` and drained in batches: measured ~20 % more queries
    per second than a DatagramProtocol (one Python callback per datagram) on uvloop here. On Linux an
    IPv4 socket is drained with one ``recvmmsg`` and answered with one ``sendmmsg`` per wake-up
    (``mmsg.py``); elsewhere one ``recvfrom``/``sendto`` per datagram."""

    def __init__(self, server: DnsServer, sock: socket.socket) -> None:
        self._server = server
        self.sock = sock
        self._fast = server.handler.fast_answer
        self._batch = _batched(sock)
        self.ready = self._ready_batched if self._batch is not None else self._ready_single

    def close(self) -> None:
        self.sock.close()
        if self._batch is not None:
            self._batch.close()

    def _ready_batched(self) -> None:
        assert self._batch is not None
        try:
            self._batch.serve(self._fast, self._slow, self._failed)
        except OSError as e:
            _errors.warning("udp-recv", "DNS UDP receive failed: %s", e)

    def _slow(self, data: bytes, addr: tuple[str, int]) -> None:
        self._server.spawn(self._general(data, addr))

    @staticmethod
    def _failed(what: str, error: BaseException, size: int) -> None:
        if what == "fast":  # called inside the except clause: the line carries the traceback
            _errors.exception("fast-path", "DNS fast path failed on a %d-byte query", size)
        else:  # a full send buffer drops the answer, as the network could; the client retries
            DNS_UDP_SEND_ERRORS.inc()
            _errors.warning("udp-send", "DNS UDP send failed: %s", error)

    def _ready_single(self) -> None:
        recv = self.sock.recvfrom
        send = self.sock.sendto
        fast = self._fast
        for _ in range(UDP_BATCH):  # stop() removes the reader: no per-datagram "still open?" check
            try:
                data, addr = recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _errors.warning("udp-recv", "DNS UDP receive failed: %s", e)
                return
            try:
                reply = fast(data, addr[0])
            except Exception as e:  # the fast path must never take the listener down
                self._failed("fast", e, len(data))
                reply = None
            if reply is None:
                self._server.spawn(self._general(data, addr))
                continue
            try:
                send(reply, addr)
            except OSError as e:
                self._failed("send", e, len(reply))

    async def _general(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = await self._server.handler.answer(data, addr[0], "udp")
        if reply is not None and self.sock.fileno() >= 0:
            try:
                self.sock.sendto(reply, addr)
            except OSError as e:
                DNS_UDP_SEND_ERRORS.inc()
                _errors.warning("udp-send", "DNS UDP send failed: %s", e)


def _socket(host: str, kind: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
    if kind == socket.SOCK_STREAM:  # TIME_WAIT after a restart; never on UDP, where it lets a second
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # process share (steal) the port
    # The DNS address may be put on lo just after us (NAT owns it): bind anyway, packets come once it is
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
    sock.setblocking(False)
    return sock


def _bind(sock: socket.socket, host: str, port: int) -> None:
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"DNS cannot listen on {host}:{port} (dns.listen): {e.strerror}") from e


class DnsServer:
    """Listeners on ``addresses`` (``[(ip, port)]``; port 0 picks a free port, see ``bound``)."""

    def __init__(self, handler: QueryHandler, addresses: list[tuple[str, int]],
                 max_inflight: int = MAX_INFLIGHT) -> None:
        self.handler = handler
        self.addresses = addresses
        self.max_inflight = max_inflight
        self.bound: list[tuple[str, int]] = []
        self._udp: list[_UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[Any]] = set()  # TCP connections between queries
        self._accepting = True

    def _room(self, transport: str) -> bool:
        """True when one more query or connection may start; else counted, logged (rate-limited)."""
        if self._accepting and len(self._tasks) < self.max_inflight:
            return True
        if self._accepting and self._idle:  # a connection waiting for its next query yields its place
            idle = self._idle.pop()
            idle.cancel()
            self._tasks.discard(idle)
            return True
        DNS_DROPPED.labels(transport).inc()
        _errors.warning("overload", "DNS: dropped a %s query: %d queries and connections already in flight",
                        transport, len(self._tasks))
        return False

    def spawn(self, coro: Any) -> None:
        if not self._room("udp"):
            coro.close()
            return
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for host, port in self.addresses:
                udp = _socket(host, socket.SOCK_DGRAM)
                with contextlib.suppress(OSError):
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
                    udp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UDP_BUFFER)
                _bind(udp, host, port)
                port = udp.getsockname()[1]
                listener = _UdpListener(self, udp)
                self._udp.append(listener)
                loop.add_reader(udp.fileno(), listener.ready)
                tcp_sock = _socket(host, socket.SOCK_STREAM)
                _bind(tcp_sock, host, port)
                tcp_sock.listen(128)
                self._tcp.append(await asyncio.start_server(self._tcp_connection, sock=tcp_sock))
                self.bound.append((host, port))
        except BaseException:
            await self.stop(drain_timeout=0)
            raise
        log.info("DNS listening on %s (UDP and TCP)", ", ".join(f"{h}:{p}" for h, p in self.bound))

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop taking queries, finish those in flight (up to ``drain_timeout``), close the sockets."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        for listener in self._udp:
            loop.remove_reader(listener.sock.fileno())
        for tcp in self._tcp:
            tcp.close()
        for task in list(self._idle):  # connections waiting for their next query have nothing to finish
            task.cancel()
        if self._tasks and drain_timeout > 0:
            await asyncio.wait(set(self._tasks), timeout=drain_timeout)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for listener in self._udp:
            listener.close()
        for tcp in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(tcp.wait_closed(), 1.0)
        self._udp.clear()
        self._tcp.clear()

    async def _tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._room("tcp"):  # a connection counts against the in-flight limit like a query
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:  # so stop() waits for (or cancels) open connections too
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        peer = writer.get_extra_info("peername")
        ip = peer[0] if peer else ""
        try:
            while self._accepting:
                if task is not None:
                    self._idle.add(task)
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    (length,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                finally:
                    self._idle.discard(task)
                reply = self.handler.fast_answer(data, ip)
                if reply is None:
                    reply = await self.handler.answer(data, ip, "tcp")
                if reply is None:
                    return  # nothing sensible to say (counted as malformed): close, as RFC 7766 allows
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except asyncio.CancelledError:
            pass  # stop() while idle
        except Exception:
            _errors.exception("tcp", "DNS TCP connection from %s failed", ip)
        finally:
            writer.close()
