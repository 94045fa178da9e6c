"""The pre-built fast path: ready answer bytes per (node, question) for names already in the pool.

A query qualifies when it is a plain query (QR, opcode, AA, TC clear), has exactly one question
whose name has no compression pointer, no answer/authority records and at most one additional
record that is an EDNS0 OPT of version 0. Its question bytes, lower-cased, are the cache key
(bytes.lower() only touches ASCII letters, exactly DNS's case-insensitivity; the type and class
bytes of the A and AAAA questions we store cannot be changed by it). The answer is the query's
ID, a pre-computed flags+counts word, the client's own question bytes (case preserved), the
pre-built records (owned by a pointer to the question) and our OPT when the client sent one.

Anything else, or a miss, returns None and the service takes the general path, which fills this
cache after answering. Entries die when the pool reports the mapping removed (the observer runs on
the replica's apply thread: single dict operations are atomic under the GIL, and ``generation``
lets the event loop skip storing an answer that raced with a removal).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from appconnector.dns import wire
from appconnector.pool.api import Address, Changes, PoolReader
from appconnector.tailnet.api import NodeInfo

_PLAIN_COUNTS = b"\x00\x01\x00\x00\x00\x00"  # qdcount=1, ancount=0, nscount=0
_AR0 = b"\x00\x00"
_AR1 = b"\x00\x01"
_OPT_TYPE = b"\x00\x29"
_OPT_NO_DO = wire.opt_record(False)
_OPT_DO = wire.opt_record(True)

MAX_ENTRIES = 1 << 20


class FastEntry:
    """One ready answer. ``heads`` is indexed by RD | CD<<1 | OPT<<2 (flags and counts words)."""

    __slots__ = ("address", "domain", "heads", "last_used", "node", "tail")

    def __init__(self, node: str, domain: str, address: Address, last_used: float, rcode: int,
                 answers: tuple[bytes, ...], authority: tuple[bytes, ...]) -> None:
        self.node = node
        self.domain = domain
        self.address = address
        self.last_used = last_used
        self.tail = b"".join(answers) + b"".join(authority)
        heads = []
        for i in range(8):
            qflags = (wire.RD if i & 1 else 0) | (wire.CD if i & 2 else 0)
            flags = wire.response_flags(qflags, rcode)
            heads.append(struct.pack("!5H", flags, 1, len(answers), len(authority), 1 if i & 4 else 0))
        self.heads = tuple(heads)


class FastPath:
    """The cache and the glue. ``now`` is a coarse clock the service advances (one read per second,
    not one per query); ``touch`` queues a last-used mark when an entry's is older than ``refresh``."""

    def __init__(self, cached_identity: Callable[[str], NodeInfo | None],
                 touch: Callable[[str, Address, str, float], None], refresh: float, now: float) -> None:
        self._identity = cached_identity
        self._touch = touch
        self.refresh = refresh
        self.now = now
        self.generation = 0
        self.hits = 0
        self._entries: dict[tuple[str, bytes], FastEntry] = {}
        self._by_mapping: dict[tuple[str, str], set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def answer(self, data: bytes, ip: str) -> bytes | None:
        """The ready answer to ``data`` from ``ip``, or None (take the general path)."""
        n = len(data)
        if n < 17 or data[2] & 0xFE or data[4:10] != _PLAIN_COUNTS:
            return None
        pos = 12
        while True:
            length = data[pos]
            if length == 0:
                break
            if length > 63:
                return None
            pos += length + 1
            if pos >= n:
                return None
        qend = pos + 5
        ar = data[10:12]
        if ar == _AR0:
            if qend != n:
                return None
            opt = b""
            variant = 0
        elif ar == _AR1:
            if (qend + 11 > n or data[qend] != 0 or data[qend + 1:qend + 3] != _OPT_TYPE
                    or data[qend + 6] != 0 or qend + 11 + ((data[qend + 9] << 8) | data[qend + 10]) != n):
                return None
            opt = _OPT_DO if data[qend + 7] & 128 else _OPT_NO_DO
            variant = 4
        else:
            return None
        info = self._identity(ip)
        if info is None:
            return None
        entry = self._entries.get((info.node, data[12:qend].lower()))
        if entry is None:
            return None
        if self.now - entry.last_used >= self.refresh:
            entry.last_used = self.now
            self._touch(entry.node, entry.address, entry.domain, self.now)
        self.hits += 1
        head = entry.heads[variant | (data[2] & 1) | ((data[3] & 0x10) >> 3)]
        return data[0:2] + head + data[12:qend] + entry.tail + opt

    def store(self, query: wire.Query, node: str, domain: str, address: Address, last_used: float,
              reply_rcode: int, answers: tuple[bytes, ...], authority: tuple[bytes, ...],
              generation: int) -> None:
        """Remember the answer just given for ``query`` (an A or AAAA of a pool mapping), unless the
        pool removed a mapping since ``generation`` was read (the answer may be stale)."""
        if generation != self.generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self.clear()
        key = query.question.lower()
        self._entries[(node, key)] = FastEntry(node, domain, address, last_used, reply_rcode, answers, authority)
        self._by_mapping.setdefault((node, domain), set()).add(key)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_mapping.clear()

    # ---- PoolObserver (apply thread) ----------------------------------------------------------------

    def on_changes(self, changes: Changes) -> None:
        if not changes.removed:
            return
        self.generation += 1
        for node, _address, domain in changes.removed:
            for key in self._by_mapping.pop((node, domain), ()):
                self._entries.pop((node, key), None)

    def on_reset(self, reader: PoolReader) -> None:
        self.clear()
