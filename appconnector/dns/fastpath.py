"""The pre-built fast path: ready answer bytes per (node, question) for names already in the pool.

A query qualifies when it is a plain query (QR, opcode, AA, TC clear), has exactly one question
whose name has no compression pointer, no answer/authority records and at most one additional
record that is an EDNS0 OPT of version 0. Its question bytes, lower-cased, are the cache key
(bytes.lower() only touches ASCII letters, exactly DNS's case-insensitivity; the type and class
bytes of the A and AAAA questions we store cannot be changed by it). The answer is the query's
ID, a pre-computed flags+counts word, the client's own question bytes (case preserved), the
pre-built records (owned by a pointer to the question) and our OPT when the client sent one.

A second, exact cache maps (client IP, the query's bytes after the ID) to the finished reply bytes,
so a client repeating itself (the common case: same flags, same spelling) costs one dict lookup.

Anything else, or a miss, returns None and the service takes the general path, which fills this
cache after answering. Entries die when the pool reports the mapping removed (the observer runs on
the replica's apply thread; writers share a lock, and ``generation`` lets the event loop skip storing
an answer read from the pool before a removal it has not seen).
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from collections.abc import Callable

from appconnector.dns import wire
from appconnector.pool.api import Address, Changes, PoolReader
from appconnector.tailnet.api import NodeInfo

_COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"  # qd=1 an=0 ns=0 ar=0
_COUNTS_OPT = b"\x00\x01\x00\x00\x00\x00\x00\x01"    # qd=1 an=0 ns=0 ar=1
_AR0 = b"\x00\x00"
_OPT_HEAD = b"\x00\x00\x29"  # root owner, type OPT
_OPT_NO_DO = wire.opt_record(False)
_OPT_DO = wire.opt_record(True)

# When full, start again (misses refill from the pool's local state): ~0.7 KB per entry, ~0.3 KB per
# exact line, so at most ~130 MB.
MAX_ENTRIES = 1 << 17
MAX_EXACT = 1 << 17


def _question_end(data: bytes) -> int:
    """Offset after the first question (no compression), or -1."""
    try:
        end = wire.skip_name(data, wire.HEADER_LEN, allow_pointer=False) + 4
    except ValueError:
        return -1
    return end if end <= len(data) else -1


class FastEntry:
    """One ready answer for (node, question). ``heads`` is indexed by RD | CD<<1 | OPT<<2 (flags and
    counts words). ``touch_due``: when a hit should next queue a touch. ``alive`` goes False when the
    pool removes the mapping, which retires the exact-cache lines that point here."""

    __slots__ = ("address", "alive", "domain", "heads", "node", "stale_at", "tail", "touch_due")

    def __init__(self, node: str, domain: str, address: Address, touch_due: float, stale_at: float, rcode: int,
                 answers: tuple[bytes, ...], authority: tuple[bytes, ...]) -> None:
        self.node = node
        self.domain = domain
        self.address = address
        self.touch_due = touch_due
        self.stale_at = stale_at
        self.alive = True
        self.tail = b"".join(answers) + b"".join(authority)
        self.heads = _heads(rcode, len(answers), len(authority))


def _same_node(info: NodeInfo | None, node: str) -> bool:
    return info is not None and info.node == node


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
    """The caches and the glue. ``cached_identity`` maps a client IP to its node without I/O; None
    means the IP is the node (standalone mode: one call less per query). ``now`` is a coarse clock
    the service advances (a few reads per second, not one per query); ``touch`` queues a last-used mark,
    stamped by ``clock`` (exact), when an entry's is older than ``refresh``. An entry whose stored
    last-used is ``max_age`` old is not answered from (the general path confirms it through Raft:
    another member may have reused the address meanwhile)."""

    def __init__(self, cached_identity: Callable[[str], NodeInfo | None] | None,
                 touch: Callable[[str, Address, str, float], None], refresh: float, now: float,
                 max_age: float = math.inf, *, clock: Callable[[], float] | None = None) -> None:
        self._identity = cached_identity
        self._touch = touch
        self._clock = clock
        self.refresh = refresh
        self.max_age = max_age
        self.now = now
        self.generation = 0
        self.hits = 0
        self._entries: dict[tuple[str, bytes], FastEntry] = {}
        self._by_mapping: dict[tuple[str, str], set[bytes]] = {}
        self._exact: dict[tuple[str, bytes], tuple[FastEntry, bytes]] = {}
        # store/remove/clear may run on the replica's apply thread and the event loop at once; answer()
        # only reads one dict entry and stays lock-free
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def answer(self, data: bytes, ip: str) -> bytes | None:
        """The ready answer to ``data`` from ``ip``, or None (take the general path).

        First the exact cache: this client sent these very bytes (after the ID) before and they were
        answered here, so the reply is the new ID plus the stored bytes. Otherwise the shape check:
        no label walk for the common shapes, since a stored key is a complete, valid question, so
        when the bytes after the header (no EDNS), or before a trailing option-less OPT, equal one,
        the message has exactly that shape. Only an OPT carrying options needs the walk to find it.
        """
        rest = data[2:]
        hit = self._exact.get((ip, rest))
        if hit is not None:
            entry = hit[0]
            if entry.alive and self.now < entry.stale_at and (
                    self._identity is None or _same_node(self._identity(ip), entry.node)):
                if self.now >= entry.touch_due:
                    self._touch_entry(entry)
                self.hits += 1
                return data[:2] + hit[1]
        if len(data) < 17 or data[2] & 0xFE:  # QR, opcode, AA, TC clear (RD free)
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
            opt = _OPT_DO if data[opt_at + 7] & 0x80 else _OPT_NO_DO
            variant = 4
        else:
            return None
        if self._identity is None:
            node = ip
        else:
            info = self._identity(ip)
            if info is None:
                return None
            node = info.node
        stored = self._entries.get((node, question.lower()))
        if stored is None or self.now >= stored.stale_at:
            return None
        if self.now >= stored.touch_due:
            self._touch_entry(stored)
        self.hits += 1
        body = stored.heads[variant | (data[2] & 1) | ((data[3] & 0x10) >> 3)] + question + stored.tail + opt
        if len(self._exact) >= MAX_EXACT:
            self._exact.clear()
        self._exact[(ip, rest)] = (stored, body)
        return data[:2] + body

    def _touch_entry(self, entry: FastEntry) -> None:
        at = self.now if self._clock is None else self._clock()  # the stamp is exact, not a second stale
        entry.touch_due = at + self.refresh
        self._touch(entry.node, entry.address, entry.domain, at)

    def store(self, query: wire.Query, node: str, domain: str, address: Address, last_used: float,
              reply_rcode: int, answers: tuple[bytes, ...], authority: tuple[bytes, ...],
              generation: int) -> None:
        """Remember the answer just given for ``query`` (an A or AAAA of a pool mapping), unless the
        pool removed a mapping since ``generation`` was read (the answer may be stale)."""
        entry = FastEntry(node, domain, address, last_used + self.refresh, last_used + self.max_age, reply_rcode,
                          answers, authority)
        key = query.question.lower()
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._clear()
            old = self._entries.get((node, key))
            if old is not None:
                old.alive = False
            self._entries[(node, key)] = entry
            self._by_mapping.setdefault((node, domain), set()).add(key)

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.generation += 1
        for entry in self._entries.values():
            entry.alive = False
        self._entries.clear()
        self._by_mapping.clear()
        self._exact.clear()

    # ---- PoolObserver (apply thread) ----------------------------------------------------------------

    def on_changes(self, changes: Changes) -> None:
        if not changes.removed:
            return
        with self._lock:
            self.generation += 1
            for node, _address, domain in changes.removed:
                for key in self._by_mapping.pop((node, domain), ()):
                    entry = self._entries.pop((node, key), None)
                    if entry is not None:
                        entry.alive = False

    def on_reset(self, reader: PoolReader) -> None:
        self.clear()
