"""Batched UDP I/O: one ``recvmmsg`` reads up to a batch of datagrams, one ``sendmmsg`` sends their answers.

Python's socket module has neither call, and on loopback one ``sendto`` per answer was most of the
listener's time (py-spy, bench/README.md): each call pays the system call's entry and exit, the GIL
release, a fresh 64 KiB bytes object for ``recvfrom`` and an address tuple parsed back for ``sendto``.
Here both calls go through ctypes over fixed buffers in one anonymous mapping (pages are touched
only where datagrams land: of the 2 x 64 x 64 KiB of slots, DNS-sized datagrams touch ~0.5 MiB): a
query's bytes are one slice, its source address is turned into a string once per client (cached by
address), and each answer is sent to the very ``sockaddr`` its query came from (the receive header's
own buffer), so an answer cannot go to another query's source. IPv4 sockets only; ``available()``
says whether this platform has the calls, and the constructor tries both with zero messages (a
sandbox may refuse them): otherwise, and for IPv6, the listener keeps one ``recvfrom``/``sendto`` per
datagram.

Only I/O lives here: what to answer is the caller's ``fast`` callable, and a query it does not answer
goes to ``slow`` with its data and address tuple (the general path).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import socket
import sys
from collections.abc import Callable
from itertools import islice
from typing import Any

MAX_DATAGRAM = 65535
_IP_CACHE = 1 << 16  # client IP strings kept by raw address; starts again when full


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_SOCKADDR_IN = 16
_NAME_SLOT = 32  # bytes per address buffer (a sockaddr_in fits; 8-aligned)


def _libc() -> tuple[Any, Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return recv, send


_CALLS = _libc()


def available(sock: socket.socket) -> bool:
    """True when ``sock`` can be served in batches here (Linux libc with the calls, IPv4 datagrams)."""
    return _CALLS is not None and sock.family == socket.AF_INET and sock.type == socket.SOCK_DGRAM


Fast = Callable[[bytes, str], "bytes | None"]
Slow = Callable[[bytes, tuple[str, int]], None]


class BatchSocket:
    """Batched receive and send on one non-blocking IPv4 UDP socket (see the module docstring)."""

    def __init__(self, sock: socket.socket, batch: int) -> None:
        if _CALLS is None or not available(sock):
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg need Linux and an IPv4 UDP socket")
        self._recvmmsg, self._sendmmsg = _CALLS
        self.sock = sock
        self.batch = batch
        hdr = ctypes.sizeof(_MMsgHdr)
        iov = ctypes.sizeof(_IoVec)
        # layout: receive headers | send headers | receive iovecs | send iovecs | addresses | data slots
        self._recv_hdrs = 0
        self._send_hdrs = batch * hdr
        recv_iovs = 2 * batch * hdr
        send_iovs = recv_iovs + batch * iov
        names = send_iovs + batch * iov
        self._data = names + batch * _NAME_SLOT
        self._send_data = self._data + batch * MAX_DATAGRAM
        size = self._send_data + batch * MAX_DATAGRAM
        size += -size % mmap.PAGESIZE
        self._mem = mmap.mmap(-1, size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self._base = base
        for i in range(batch):
            for hdrs, iovs, data in ((self._recv_hdrs, recv_iovs, self._data),
                                     (self._send_hdrs, send_iovs, self._send_data)):
                vec = _IoVec.from_buffer(self._mem, iovs + i * iov)
                vec.iov_base = base + data + i * MAX_DATAGRAM
                vec.iov_len = MAX_DATAGRAM
                h = _MMsgHdr.from_buffer(self._mem, hdrs + i * hdr)
                h.msg_hdr.msg_name = base + names + i * _NAME_SLOT  # a send header's is set per answer
                h.msg_hdr.msg_namelen = _SOCKADDR_IN
                h.msg_hdr.msg_iov = base + iovs + i * iov
                h.msg_hdr.msg_iovlen = 1
            del vec, h  # from_buffer objects pin the mapping's buffer
        self._u32 = memoryview(self._mem).cast("I")
        self._ptr = memoryview(self._mem).cast("P")
        self._size_t = memoryview(self._mem).cast("L")  # size_t is unsigned long on Linux
        # per-slot offsets and word indexes, computed once (the loop in serve() only unpacks them)
        msg_len = _MMsgHdr.msg_len.offset
        name_ptr = _MsgHdr.msg_name.offset
        iov_len = _IoVec.iov_len.offset
        word, size_word = ctypes.sizeof(ctypes.c_void_p), ctypes.sizeof(ctypes.c_size_t)
        names_at = [names + i * _NAME_SLOT for i in range(batch)]
        # receive slot i: (data offset, msg_len index, s_addr index, sockaddr offset, sockaddr address)
        self._slots = [(self._data + i * MAX_DATAGRAM, (self._recv_hdrs + i * hdr + msg_len) // 4,
                        (names_at[i] + 4) // 4, names_at[i], base + names_at[i]) for i in range(batch)]
        # send slot j: (data offset, iov_len index, msg_name index)
        self._outs = [(self._send_data + j * MAX_DATAGRAM, (send_iovs + j * iov + iov_len) // size_word,
                       (self._send_hdrs + j * hdr + name_ptr) // word) for j in range(batch)]
        self._ips: dict[int, str] = {}  # s_addr as read from the buffer → the client's IP string
        # a sandbox (seccomp) may refuse either call: find out now, with zero messages, not on a query
        fd = sock.fileno()
        if self._recvmmsg(fd, base, 0, socket.MSG_DONTWAIT, None) < 0 or self._sendmmsg(fd, base, 0, 0) < 0:
            err = ctypes.get_errno()
            self.close()
            raise OSError(err, f"recvmmsg/sendmmsg refused: {os.strerror(err)}")

    def close(self) -> None:
        """Release the buffers (the socket is the caller's)."""
        for view in (self._u32, self._ptr, self._size_t):
            view.release()
        self._mem.close()

    def serve(self, fast: Fast, slow: Slow, failed: Callable[[str, BaseException, int], None]) -> int:
        """Read what is waiting (up to a batch), answer each datagram with ``fast`` or hand it to
        ``slow``, send the answers in one call. Returns how many datagrams were read (0: none waiting).
        ``failed(what, error, size)`` hears of a ``fast`` that raised (what="fast", called inside the
        except clause; that datagram goes to ``slow``) and of an answer the kernel refused (what="send":
        it is dropped, as the network could; the client retries). A receive error other than "nothing
        waiting" is raised."""
        fd = self.sock.fileno()
        n = self._recvmmsg(fd, self._base + self._recv_hdrs, self.batch, socket.MSG_DONTWAIT, None)
        if n <= 0:
            err = ctypes.get_errno()
            if n == 0 or err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        mem = self._mem
        u32, ptr, size_t = self._u32, self._ptr, self._size_t
        outs = self._outs
        ips = self._ips
        out = 0
        for start, len_at, addr_at, at, sockaddr in islice(self._slots, n):
            data = mem[start:start + u32[len_at]]
            ip = ips.get(u32[addr_at])
            if ip is None:
                if len(ips) >= _IP_CACHE:
                    ips.clear()
                ip = ips[u32[addr_at]] = socket.inet_ntoa(mem[at + 4:at + 8])
            try:
                reply = fast(data, ip)
            except Exception as e:  # the fast path must never take the listener down
                failed("fast", e, len(data))
                reply = None
            if reply is None:
                slow(data, (ip, (mem[at + 2] << 8) | mem[at + 3]))
                continue
            size = len(reply)
            if size > MAX_DATAGRAM:
                failed("send", OSError(errno.EMSGSIZE, os.strerror(errno.EMSGSIZE)), size)
                continue
            begin, len_word, name_word = outs[out]
            mem[begin:begin + size] = reply
            size_t[len_word] = size
            ptr[name_word] = sockaddr  # to the source of this datagram, nobody else's
            out += 1
        sent = 0
        while sent < out:
            r = self._sendmmsg(fd, self._base + self._send_hdrs + sent * ctypes.sizeof(_MMsgHdr), out - sent, 0)
            if r > 0:
                sent += r
                continue
            err = ctypes.get_errno()
            failed("send", OSError(err, os.strerror(err)), size_t[outs[sent][1]])
            sent += 1  # that answer is lost; the rest still go
        return int(n)
