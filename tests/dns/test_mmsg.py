"""Batched UDP I/O (appconnector/dns/mmsg.py) on real loopback sockets: one ``serve`` reads a whole
batch, sends every answer to the source its query came from, hands the rest to the slow path with the
right address, and one failing datagram (a raising fast path, an answer the kernel refuses) costs only
its own answer. Loopback delivers a datagram inside ``sendto``/``sendmmsg``, so what a socket has
queued right after the call is all it will get: no waiting is needed to see that nothing came."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest

from appconnector.dns import mmsg

pytestmark = pytest.mark.skipif(mmsg._CALLS is None, reason="recvmmsg/sendmmsg need Linux")


@pytest.fixture
def server() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    yield sock
    sock.close()


def clients(count: int) -> list[socket.socket]:
    out = []
    for i in range(count):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.bind((f"127.0.0.{2 + i % 4}", 0))  # four source addresses, a port each
        c.setblocking(False)
        out.append(c)
    return out


def pending(sock: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(sock.recv(70000))
        except BlockingIOError:
            return got


def test_available_only_for_ipv4_datagram_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u4, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u6, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t4:
        assert mmsg.available(u4)
        assert not mmsg.available(u6) and not mmsg.available(t4)
        with pytest.raises(OSError):
            mmsg.BatchSocket(u6, 8)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    with pytest.raises(OSError, match="refused"):  # the constructor's probe: calls that fail fail here
        mmsg.BatchSocket(closed, 8)


def test_a_burst_is_read_in_batches_and_each_answer_goes_to_its_own_source(server: socket.socket) -> None:
    batch = mmsg.BatchSocket(server, 64)
    port = server.getsockname()[1]
    socks = clients(150)
    try:
        for i, c in enumerate(socks):
            c.sendto(b"q%d" % i, ("127.0.0.1", port))
        seen: list[tuple[bytes, str]] = []

        def fast(data: bytes, ip: str) -> bytes:
            seen.append((data, ip))
            return b"a" + data[1:] + b"|" + ip.encode()

        def slow(data: bytes, addr: tuple[str, int]) -> None:
            raise AssertionError("every datagram had a fast answer")

        def failed(what: str, error: BaseException, size: int) -> None:
            raise AssertionError(f"{what} failed: {error}")

        assert [batch.serve(fast, slow, failed) for _ in range(4)] == [64, 64, 22, 0]
        for i, c in enumerate(socks):
            ip = c.getsockname()[0]
            assert pending(c) == [b"a%d|%s" % (i, ip.encode())], f"client {i}"
        assert sorted(seen) == sorted((b"q%d" % i, c.getsockname()[0]) for i, c in enumerate(socks))
    finally:
        batch.close()
        for c in socks:
            c.close()


def test_failures_and_slow_path_datagrams_cost_only_their_own_answer(server: socket.socket) -> None:
    batch = mmsg.BatchSocket(server, 64)
    port = server.getsockname()[1]
    socks = clients(40)
    big = socks[39]
    try:
        for i, c in enumerate(socks[:39]):
            c.sendto(b"q%d" % i, ("127.0.0.1", port))
        big.sendto(b"q39" + b"x" * 60000, ("127.0.0.1", port))  # a large datagram arrives whole
        slow_got: dict[bytes, tuple[str, int]] = {}
        failures: list[tuple[str, int]] = []

        def fast(data: bytes, ip: str) -> bytes | None:
            i = int(data[1:3])  # "q<i>", i < 100
            if i % 10 == 0:
                raise ValueError("fast path bug")
            if i % 10 == 1:
                return None  # the general path's
            if i % 10 == 2:
                return b"\0" * 70000  # more than a datagram holds: the kernel cannot send it
            return b"a%d:%d" % (i, len(data))

        def slow(data: bytes, addr: tuple[str, int]) -> None:
            slow_got[data[:3]] = addr

        def failed(what: str, error: BaseException, size: int) -> None:
            failures.append((what, error.errno if isinstance(error, OSError) else 0))

        assert batch.serve(fast, slow, failed) == 40
        assert sorted(failures) == sorted([("fast", 0)] * 4 + [("send", errno.EMSGSIZE)] * 4)
        for i, c in enumerate(socks):
            got = pending(c)
            if i % 10 in (0, 1):
                assert got == [], f"client {i}: its answer is the slow path's"
                assert slow_got[b"q%d" % i] == c.getsockname()
            elif i % 10 == 2:
                assert got == [], f"client {i}: its answer could not be sent"
            else:
                size = 60003 if c is big else len(b"q%d" % i)
                assert got == [b"a%d:%d" % (i, size)], f"client {i}"
    finally:
        batch.close()
        for c in socks:
            c.close()
