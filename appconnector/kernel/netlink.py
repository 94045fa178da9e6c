"""A minimal raw netlink dump reader for the two bulk reads of the dataplane.

Both reads run every few seconds and can be large, and both general-purpose paths are too slow for
that (measured here): libnftables' ``list set`` builds its whole cache and output (6.9 s for 100,000
``seen`` elements), and pyroute2's conntrack dump decodes every attribute into Python objects (~1 ms
per entry: 16 s for 14,000 entries, where ``conntrack -L`` takes 0.09 s). Here one request is sent on a
netfilter netlink socket and only the few attributes we need are decoded with ``struct``.
Deleting the conntrack entries of a reassigned address reuses the dump: each matching entry's original
tuple is sent back verbatim in a delete request, many per ``sendto``. Everything else (nftables
changes, routes) goes through libnftables or pyroute2.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLA_F_NESTED = 0x8000
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF  # drops NLA_F_NESTED and NLA_F_NET_BYTEORDER
NLMSGHDR = struct.Struct("=IHHII")
NLATTR = struct.Struct("=HH")
NFGENMSG = struct.Struct("=BBH")


class NetlinkError(OSError):
    """The kernel answered a dump with an error (``errno`` set)."""


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    data = NLATTR.pack(NLATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``buf[start:end]``."""
    unpack = NLATTR.unpack_from
    while start + 4 <= end:
        length, kind = unpack(buf, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def find(buf: bytes, start: int, end: int, kind: int) -> tuple[int, int] | None:
    """Payload bounds of the first attribute of type ``kind`` in ``buf[start:end]``."""
    for k, a, b in attrs(buf, start, end):
        if k == kind:
            return a, b
    return None


def _netfilter_socket() -> socket.socket:
    """A bound netfilter netlink socket with a receive buffer large enough for a burst of answers."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock


def _messages(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, type, sequence number) of each netlink message in one received buffer."""
    pos = 0
    while pos + NLMSGHDR.size <= len(buf):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(buf, pos)
        if length < NLMSGHDR.size:
            raise NetlinkError(0, "malformed netlink message")
        yield pos, pos + length, kind, seq
        pos = (pos + length + 3) & ~3


def _errno(buf: bytes, pos: int) -> int:
    """The errno of the NLMSG_ERROR message at ``pos`` (0: an acknowledgement)."""
    code: int = -struct.unpack_from("=i", buf, pos + NLMSGHDR.size)[0]
    return code


def dump(msg_type: int, family: int, payload: bytes = b"") -> Iterator[tuple[bytes, int, int]]:
    """Send one NFNL dump request; yield (buffer, attributes start, message end) for each answer
    message (the attributes follow the nfgenmsg header). Raises NetlinkError on a kernel error."""
    seq = 1
    body = NFGENMSG.pack(family, 0, 0) + payload
    request = NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    with _netfilter_socket() as sock:
        sock.sendto(request, (0, 0))
        while True:
            buf = sock.recv(1 << 17)
            for pos, end, kind, got_seq in _messages(buf):
                if got_seq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = _errno(buf, pos)
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                yield buf, pos + NLMSGHDR.size + NFGENMSG.size, end


def request_all(msg_type: int, family: int, payloads: list[bytes], chunk_bytes: int = 1 << 16) -> list[int]:
    """Send one acknowledged request per payload (many per ``sendto``); returns each one's errno
    (0 = done), in order."""
    results: list[int] = []
    with _netfilter_socket() as sock:
        i = 0
        while i < len(payloads):
            batch = bytearray()
            first = i
            while i < len(payloads) and (not batch or len(batch) < chunk_bytes):
                body = NFGENMSG.pack(family, 0, 0) + payloads[i]
                batch += NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, i + 1, 0)
                batch += body
                i += 1
            sock.sendto(bytes(batch), (0, 0))
            answers: dict[int, int] = {}
            while len(answers) < i - first:
                buf = sock.recv(1 << 16)
                for pos, _end, kind, seq in _messages(buf):
                    if kind == NLMSG_ERROR and first < seq <= i:
                        answers[seq] = _errno(buf, pos)
            results.extend(answers[seq] for seq in range(first + 1, i + 1))
    return results
