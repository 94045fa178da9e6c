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
the replica's apply thread; writers share a lock, and ``generation`` lets the event loop skip storing
an answer read from the pool before a removal it has not seen).
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable

from appconnector.dns import wire
from appconnector.pool.api import Address, Changes, PoolReader
from appconnector.tailnet.api import NodeInfo

_QUERY_FLAGS = frozenset((b"\x00", b"\x01"))  # first flags byte of a plain query, RD off or on
_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # qd=1 an=0 ns=0 ar=0
_COUNTS_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"    # qd=1 an=0 ns=0 ar=1
_AR0 = b"\x00\x00"
_OPT_HEAD = b"\x00\x00\x29"  # root owner, type OPT
_OPT_NO_DO = wire.opt_record(False)
_OPT_DO = wire.opt_record(True)

MAX_ENTRIES = 1 << 18  # ~0.7 KB each (≤ ~180 MB); when full, start again (misses refill from the pool's local state)


def _question_end(data: bytes) -> int:
    """Offset after the first question (no compression), or -1."""
    pos = 12
    n = len(data)
    while pos < n:
        length = data[pos]
        if length == 0:
            return pos + 5 if pos + 5 <= n else -1
        if length > 63:
            return -1
        pos += length + 1
    return -1


class FastEntry:
    """One ready answer. ``heads`` is indexed by RD | CD<<1 | OPT<<2 (flags and counts words);
    ``bodies`` (filled on first use, indexed by those bits | DO<<3) hold everything after the ID for
    queries spelling the name as ``question`` does."""

    __slots__ = ("address", "bodies", "domain", "heads", "last_used", "node", "question", "tail")

    def __init__(self, node: str, domain: str, address: Address, last_used: float, rcode: int,
                 answers: tuple[bytes, ...], authority: tuple[bytes, ...], question: bytes) -> None:
        self.question = question
        self.bodies: list[bytes | None] | None = None  # made on the first hit: most entries never get one
        self.node = node
        self.domain = domain
        self.address = address
        self.last_used = last_used
        self.tail = b"".join(answers) + b"".join(authority)
        self.heads = _heads(rcode, len(answers), len(authority))


@functools.cache
def _heads(rcode: int, ancount: int, nscount: int) -> tuple[bytes, ...]:
    """Flags and counts words for each RD | CD<<1 | OPT<<2 combination (shared by entries)."""
    heads = []
    for i in range(8):
        qflags = (wire.RD if i & 1 else 0) | (wire.CD if i & 2 else 0)
        flags = wire.response_flags(qflags, rcode)
        heads.append(struct.pack("!5H", flags, 1, ancount, nscount, 1 if i & 4 else 0))
    return tuple(heads)


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
        # store/remove/clear may run on the replica's apply thread and the event loop at once; answer()
        # only reads one dict entry and stays lock-free
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def answer(self, data: bytes, ip: str) -> bytes | None:
        """The ready answer to ``data`` from ``ip``, or None (take the general path).

        No label walk for the common shapes: a stored key is a complete, valid question, so when the
        bytes after the header (no EDNS), or before a trailing option-less OPT, equal one, the
        message has exactly that shape. Only an OPT carrying options needs the walk to find it.
        """
        if data[2:3] not in _QUERY_FLAGS:  # QR, opcode, AA, TC clear (RD free); short data → b""
            return None
        counts = data[4:12]
        if counts == _COUNTS_PLAIN:
            question = data[12:]
            opt = b""
            variant = 0
        elif counts == _COUNTS_OPT:
            n = len(data)
            if data[-11:-8] == _OPT_HEAD and data[-2:] == _AR0 and n > 27:
                question = data[12:-11]
                opt_at = n - 11
            else:
                opt_at = _question_end(data)
                if opt_at < 0 or opt_at + 11 > n or data[opt_at:opt_at + 3] != _OPT_HEAD \
                        or opt_at + 11 + ((data[opt_at + 9] << 8) | data[opt_at + 10]) != n:
                    return None
                question = data[12:opt_at]
            if data[opt_at + 6]:  # EDNS version: BADVERS is the general path's
                return None
            if data[opt_at + 7] & 0x80:
                opt, variant = _OPT_DO, 12
            else:
                opt, variant = _OPT_NO_DO, 4
        else:
            return None
        info = self._identity(ip)
        if info is None:
            return None
        entry = self._entries.get((info.node, question.lower()))
        if entry is None:
            return None
        if self.now - entry.last_used >= self.refresh:
            entry.last_used = self.now
            self._touch(entry.node, entry.address, entry.domain, self.now)
        self.hits += 1
        variant |= (data[2] & 1) | ((data[3] & 0x10) >> 3)
        if question == entry.question:  # same spelling as when stored: the whole body is ready
            bodies = entry.bodies
            if bodies is None:
                bodies = entry.bodies = [None] * 16
            body = bodies[variant]
            if body is None:
                body = bodies[variant] = entry.heads[variant & 7] + question + entry.tail + opt
            return data[:2] + body
        return data[:2] + entry.heads[variant & 7] + question + entry.tail + opt

    def store(self, query: wire.Query, node: str, domain: str, address: Address, last_used: float,
              reply_rcode: int, answers: tuple[bytes, ...], authority: tuple[bytes, ...],
              generation: int) -> None:
        """Remember the answer just given for ``query`` (an A or AAAA of a pool mapping), unless the
        pool removed a mapping since ``generation`` was read (the answer may be stale)."""
        entry = FastEntry(node, domain, address, last_used, reply_rcode, answers, authority, query.question)
        key = query.question.lower()
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._clear()
            self._entries[(node, key)] = entry
            self._by_mapping.setdefault((node, domain), set()).add(key)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_mapping.clear()

    # ---- PoolObserver (apply thread) ----------------------------------------------------------------

    def on_changes(self, changes: Changes) -> None:
        if not changes.removed:
            return
        with self._lock:
            self.generation += 1
            for node, _address, domain in changes.removed:
                for key in self._by_mapping.pop((node, domain), ()):
                    self._entries.pop((node, key), None)

    def on_reset(self, reader: PoolReader) -> None:
        self.clear()
