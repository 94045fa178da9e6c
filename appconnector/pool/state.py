"""The pool's deterministic state machine: (node, domain) ↔ address, last-used times, targets.

Every replica applies the same commands in the same order and must end in the same state, so nothing
here reads a clock or randomness: proposers pass times in (docs/design.md §3). Nor does it count metrics
or log: what an operator should see (checkout results, ignored input, clock skew, log lines) goes into
the :class:`~appconnector.pool.api.Report` of the ``Changes`` it returns (and, for a snapshot it loaded,
into :attr:`PoolState.load_report`); the replica publishes it (:mod:`appconnector.pool.report`). A command
is a plain tuple (pickle-safe, no classes) dispatched by :meth:`PoolState.apply`:

* ``("checkout_batch", ((node, domain, targets, ttl), ...), now, reuse_deadline)`` →
  ``list[int | PoolError]``, one result per request in order (normally an address or PoolExhausted;
  :class:`InvalidCommand` for a malformed request).
* ``("touch_batch", ((node, address, domain, at), ...))`` → None
* ``("set_targets", domain, targets, ttl, now)`` → None
* ``("forget", (node, ...), now)`` → None
* ``("set_excluded", (address, ...), now)`` → None (the whole set: replaces it)
* ``("exclude", (address, ...), (address, ...), now)`` → None (add the first, lift the second: how a
  set too large for one command is changed in pieces)
* ``("tick", value)`` → None: the pool clock becomes max(clock, value)
* ``("release_batch", ((node, domain), ...), now)`` → None: those mappings go (access revoked);
  malformed entries are skipped and counted, unknown ones are no-ops

Allocation, per node: the lowest free address (never used, or freed by an exclusion or a prefix
change), else the least recently used address whose last use is before ``reuse_deadline`` (ties: the
lowest), else PoolExhausted. It never scans the pool: each node keeps a table indexed by offset up to
its highest allocated offset (allocation is lowest-first, so the table is dense: memory follows
mappings), a heap of free offsets below that, and an ordered index of (last_used, offset) keys.

Times: the state carries the pool clock, and only ``tick`` commands move it (the current leader proposes
them: the last replicated clock plus the monotonic time it measured since it saw that value, see
:mod:`appconnector.pool.clock`). Every stamp and every reuse decision is in pool time: a checkout stamps
the pool clock, and so does a touch (a use now: its own time is only validated, since a member that
is catching up reads the clock late); ``set_targets`` stamps its time clamped to the clock; a checkout's
reuse deadline is ``clock - (now - reuse_deadline)`` (the proposer's reuse window, measured from the
pool clock), so no proposer's wall clock, fast or slow, and no number of commands can age a mapping.
A time more than :data:`SKEW_LIMIT` ahead of the clock is reported, to be counted in
``appconnector_pool_clock_skew`` and logged (a proposer that does not speak pool time). A fresh state
takes its first clock value from the first time it sees (tick or command): a skewed bootstrap only
offsets pool time from wall time.

Legacy: a state restored from a version-1 snapshot keeps the old high-water rule (a command time moves
the mark, by at most :data:`SKEW_LIMIT` per command) until its first tick, so journal entries written
before the pool clock existed replay exactly as they were first applied.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sortedcontainers import SortedList

from appconnector.pool.addresses import DNS_OFFSET, V4_MAX, AddressSpace, format_address
from appconnector.pool.api import (
    Address,
    Changes,
    MappingView,
    PoolError,
    PoolExhausted,
    PoolReader,
    Report,
    Targets,
)

SKEW_LIMIT = 300.0
"""Seconds a command time may run ahead of the pool clock before it is logged as clock skew (and, in a
legacy state, how far one command may move the high-water mark)."""

SNAPSHOT_MAGIC = b"ACPOOL"
SNAPSHOT_VERSION = 3
"""1: no pool clock (the high-water rule); 2: adds a flags byte after the header (bit 0: legacy);
3: targets carry IPv6 addresses too (a count and 16 bytes each, after the IPv4 ones)."""
_LEGACY = 1

_OFFSET_BITS = 32
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1
_DOUBLE = struct.Struct("<d")
_HEADER = struct.Struct("<6sHdI")  # magic, version, clock (v1: high-water), number of prefixes
_FLAGS = struct.Struct("<B")  # version 2 on: right after the header
_U32 = struct.Struct("<I")
_TARGET_HEAD = struct.Struct("<IddI")  # domain index, ttl, updated, number of IPv4 addresses
_V6_MAX = (1 << 128) - 1
_NODE_HEAD = struct.Struct("<II")  # name length, number of mappings
_DIGEST_SIZE = 32

Request = tuple[str, str, Targets, float]
"""One checkout request: (node, domain, targets, ttl)."""

Touch = tuple[str, Address, str, float]
"""One last-used mark: (node, address, domain, at)."""


_HIT, _NEW, _REUSED, _EXHAUSTED, _ERROR = range(5)  # indexes of Report.checkouts (api.CHECKOUT_RESULTS)


class InvalidCommand(PoolError):
    """A command or request the state cannot read (wrong shape or types). Nothing was changed."""


def _lru_key(last_used: float, offset: int) -> int:
    """One int ordering (last_used, offset): for non-negative floats the IEEE bits sort like the values.

    A single int costs about half a (float, int) tuple, which matters at a million mappings.
    """
    return (int.from_bytes(_DOUBLE.pack(last_used), "little") << _OFFSET_BITS) | offset


_NOT_FINITE_OR_NEGATIVE = 0x7FF0_0000_0000_0000
"""IEEE bits at or above this are inf, NaN or have the sign bit set."""


def _time_bits(times: Sequence[float]) -> array[int]:
    """The IEEE bits of many times at once (what _lru_key computes one by one)."""
    bits = array("Q")
    bits.frombytes(array("d", times).tobytes())
    return bits


def _key_time(key: int) -> float:
    t: float = _DOUBLE.unpack((key >> _OFFSET_BITS).to_bytes(8, "little"))[0]
    return t


def _finite_number(value: object) -> float | None:
    """``value`` as a finite float, or None if it is not one (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        t = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return t if math.isfinite(t) else None


def _finite_time(value: object) -> float | None:
    """``value`` as a non-negative finite float, or None if it is not one."""
    t = _finite_number(value)
    if t is None or t < 0:
        return None
    return t + 0.0  # -0.0 → 0.0, so equal times have equal keys


def _clean_targets(targets: object) -> Targets | None:
    """Sorted, de-duplicated address integers (IPv4 up to 2**32-1, IPv6 above: :data:`V4_MAX`), or
    None if ``targets`` is not a sequence of them."""
    if targets == ():
        return ()
    if not isinstance(targets, tuple | list):
        return None
    out = set()
    for a in targets:
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a <= _V6_MAX:
            return None
        out.add(a)
    return tuple(sorted(out))


_TARGET_RECORD = struct.Struct("<ddI")  # ttl, updated, number of IPv4 addresses; then u32s, then 16-byte v6


def _pack_targets(addrs: Targets, ttl: float, updated: float) -> bytes:
    """One domain's (addresses, ttl, updated) as one bytes object: ~56 B for one address, where the tuple
    of a tuple and two floats cost ~190 B, which dominated memory when every mapping has its own name."""
    v4 = [a for a in addrs if a <= V4_MAX]  # sorted: the v4 ones come first
    return (_TARGET_RECORD.pack(ttl, updated, len(v4)) + _le(array("I", v4)).tobytes()
            + b"".join(a.to_bytes(16, "big") for a in addrs[len(v4):]))


def _unpack_targets(record: bytes) -> tuple[Targets, float, float]:
    ttl, updated, n4 = _TARGET_RECORD.unpack_from(record)
    start = _TARGET_RECORD.size
    v4 = _le(array("I", record[start:start + 4 * n4])).tolist()
    v6 = [int.from_bytes(record[i:i + 16], "big") for i in range(start + 4 * n4, len(record), 16)]
    return (*v4, *v6), ttl, updated


def _text(value: object) -> str | None:
    """An interned plain str (domains and nodes repeat across many mappings), or None if not text."""
    if type(value) is str:
        return sys.intern(value)
    if not isinstance(value, str):
        return None
    return sys.intern(str.__str__(value))


class _Node:
    """One node's mappings. ``owner[o]`` is the domain at offset ``o`` (None: free or reserved)."""

    __slots__ = ("by_domain", "free", "lru", "owner")

    def __init__(self) -> None:
        # domain → _lru_key(last_used, offset): the key carries both, and the same int object sits in
        # lru, so a mapping costs one int besides its dict slot, list slot and sorted-list slot
        self.by_domain: dict[str, int] = {}
        self.owner: list[str | None] = [None]  # offset → domain; index 0 is the DNS address
        self.lru: SortedList = SortedList()  # every mapping's key, oldest use first
        self.free: list[int] = []  # heap: offsets below len(owner) that are free (lazy: re-checked on pop)

    @property
    def cursor(self) -> int:
        """Lowest offset this node has never reached."""
        return len(self.owner)


class PoolState:
    """The replicated pool. Not thread-safe: replicas apply under a lock and read under the same lock."""

    def __init__(self, prefixes: Sequence[str]) -> None:
        self.space = AddressSpace(prefixes)
        self._nodes: dict[str, _Node] = {}
        self._domain_refs: Counter[str] = Counter()  # domain → number of mappings holding it
        self._targets: dict[str, bytes] = {}  # domain → _pack_targets(addresses, ttl, updated)
        self._excluded: set[int] = set()  # offsets the allocator skips
        self._clock = 0.0  # the pool clock; 0.0: no time seen yet
        self._legacy = False  # restored from a version-1 snapshot and not ticked since
        self._mappings = 0
        self.clock_skew_events = 0  # since this object was made (not replicated state)
        self.load_report: Report | None = None  # from_bytes: what restoring dropped, for the replica to log

    # ---- dispatch -------------------------------------------------------------------------------------

    def apply(self, command: tuple[Any, ...]) -> tuple[object, Changes]:
        """Apply one command tuple; returns (result, what changed). Never raises for bad input: a
        malformed command changes nothing and returns an :class:`InvalidCommand` as its result."""
        changes = Changes()
        try:
            name = command[0]
            if name == "checkout_batch":
                _, requests, now, deadline = command
                return self._checkout_batch(requests, now, deadline, changes), changes
            if name == "touch_batch":
                _, touches = command
                self._touch_batch(touches, changes)
            elif name == "set_targets":
                _, domain, targets, ttl, now = command
                self._set_targets(domain, targets, ttl, now, changes)
            elif name == "forget":
                _, nodes, now = command
                self._forget(nodes, now, changes)
            elif name == "set_excluded":
                _, addresses, now = command
                self._set_excluded(addresses, now, changes)
            elif name == "exclude":
                _, added, lifted, now = command
                self._exclude(added, lifted, now, changes)
            elif name == "tick":
                _, value = command
                self._tick(value)
            elif name == "release_batch":
                _, pairs, now = command
                self._release_batch(pairs, now, changes)
            else:
                raise InvalidCommand(f"unknown pool command {name!r}")
        except InvalidCommand as e:
            return _ignored(e, changes)
        except (TypeError, ValueError, IndexError, KeyError) as e:
            # Unpacking a malformed tuple; no state was touched before the shape was known.
            return _ignored(InvalidCommand(f"malformed pool command {_describe(command)}: {e}"), changes)
        return None, changes

    # ---- typed commands ---------------------------------------------------------------------------------

    def checkout_batch(self, requests: Sequence[Request], now: float, reuse_deadline: float
                       ) -> tuple[list[int | PoolError], Changes]:
        result, changes = self.apply(("checkout_batch", tuple(requests), now, reuse_deadline))
        if isinstance(result, InvalidCommand):
            raise result
        assert isinstance(result, list)
        return result, changes

    def touch_batch(self, touches: Sequence[Touch]) -> Changes:
        return self._typed(("touch_batch", tuple(touches)))

    def set_targets(self, domain: str, targets: Targets, ttl: float, now: float) -> Changes:
        return self._typed(("set_targets", domain, targets, ttl, now))

    def forget(self, nodes: Sequence[str], now: float) -> Changes:
        return self._typed(("forget", tuple(nodes), now))

    def set_excluded(self, addresses: Iterable[Address], now: float) -> Changes:
        return self._typed(("set_excluded", tuple(addresses), now))

    def exclude(self, added: Iterable[Address], lifted: Iterable[Address], now: float) -> Changes:
        return self._typed(("exclude", tuple(added), tuple(lifted), now))

    def tick(self, value: float) -> Changes:
        return self._typed(("tick", value))

    def release_batch(self, pairs: Sequence[tuple[str, str]], now: float) -> Changes:
        return self._typed(("release_batch", tuple(pairs), now))

    def _typed(self, command: tuple[Any, ...]) -> Changes:
        result, changes = self.apply(command)
        if isinstance(result, InvalidCommand):
            raise result
        return changes

    # ---- time -------------------------------------------------------------------------------------------

    def _admit(self, value: object, what: str, report: Report) -> tuple[float, float] | None:
        """(time to use, how far it was pulled back) for a command time; None if it is not a time.

        Pool clock: the time clamped to the clock (which it never moves, but for the very first time a
        fresh state sees). Legacy: the high-water rule (see the module docstring).
        """
        t = _finite_time(value)
        if t is None:
            return None
        clock = self._clock
        if not clock:
            self._clock = t  # the first time this state sees: where pool time starts
            return t, 0.0
        limit = clock + SKEW_LIMIT if self._legacy else clock
        shift = 0.0
        skewed = t > clock + SKEW_LIMIT
        if t > limit:
            shift = t - limit
            t = limit
        if skewed:
            self.clock_skew_events += 1
            report.clock_skew += 1
            n = self.clock_skew_events
            if n & (n - 1) == 0 or n % 1000 == 0:  # log the 1st, 2nd, 4th, ... and every 1000th
                report.warnings.append(("pool: %s time is %.1f s ahead of the pool's clock (%.3f); applied as "
                                        "%.3f (clock skew events: %d)", (what, shift + t - clock, clock, t, n)))
        if self._legacy and t > clock:
            self._clock = t
        return t, shift

    def _tick(self, value: object) -> None:
        t = _finite_time(value)
        if t is None:
            raise InvalidCommand(f"tick value {value!r} is not a non-negative number")
        self._legacy = False
        if t > self._clock:
            self._clock = t

    # ---- checkout ---------------------------------------------------------------------------------------

    def _checkout_batch(self, requests: object, now: object, deadline: object,
                        changes: Changes) -> list[int | PoolError]:
        if not isinstance(requests, tuple | list):
            raise InvalidCommand(f"checkout_batch requests must be a tuple, not {type(requests).__name__}")
        report = changes.report
        admitted = self._admit(now, "checkout", report)
        if admitted is None:
            raise InvalidCommand(f"checkout_batch time {now!r} is not a non-negative number")
        t, shift = admitted
        if t < self._clock:
            t = self._clock  # a checkout is a use "now", whatever the proposer's clock says
        d = _finite_number(deadline)
        d = -math.inf if d is None else d - shift  # no usable deadline: reuse nothing
        counts = report.checkouts  # indexes: the _HIT.. constants
        checkout_one = self._checkout_one
        results = [checkout_one(req, t, d, changes, counts) for req in requests]
        if counts[_ERROR]:
            report.invalid += counts[_ERROR]
            report.warnings.append(("pool: checkout_batch refused %d malformed requests (first: %s)",
                                    (counts[_ERROR], next(r for r in results if isinstance(r, InvalidCommand)))))
        return results

    def _checkout_one(self, req: object, now: float, deadline: float, changes: Changes,
                      counts: list[int]) -> int | PoolError:
        if not isinstance(req, tuple | list) or len(req) != 4:
            counts[_ERROR] += 1
            return InvalidCommand(f"checkout request must be (node, domain, targets, ttl), got {_describe(req)}")
        node, domain, targets, ttl = _text(req[0]), _text(req[1]), _clean_targets(req[2]), _finite_time(req[3])
        if node is None or domain is None or targets is None or ttl is None:
            counts[_ERROR] += 1
            return InvalidCommand(f"checkout request has bad fields: {_describe(req)}")
        n = self._nodes.get(node)
        key = n.by_domain.get(domain) if n is not None else None
        if n is not None and key is not None:
            counts[_HIT] += 1
            self._mark_used(n, domain, key, now)
            address = self.space.address(key & _OFFSET_MASK)
        else:
            if n is None:
                n = _Node()
            offset = self._take_free(n)
            if offset is not None:
                counts[_NEW] += 1
            else:
                offset = self._take_expired(n, deadline, node, changes)
                if offset is None:
                    counts[_EXHAUSTED] += 1
                    return PoolExhausted(node, domain)
                counts[_REUSED] += 1
            self._nodes[node] = n
            address = self._map(node, n, offset, domain, now, changes)
        if targets and domain not in self._targets:
            self._targets[domain] = _pack_targets(targets, ttl, now)
            changes.targets[domain] = targets
        return address

    def _take_free(self, n: _Node) -> int | None:
        """Pop the node's lowest free offset: a freed one below the cursor, else the cursor itself."""
        while n.free:
            o = heapq.heappop(n.free)
            if n.owner[o] is None and o not in self._excluded:
                return o
        excluded, owner, size = self._excluded, n.owner, self.space.size
        while len(owner) < size:
            o = len(owner)
            owner.append(None)
            if o not in excluded:
                return o
        return None

    def _take_expired(self, n: _Node, deadline: float, node: str, changes: Changes) -> int | None:
        """Unmap and return the node's least recently used offset if its last use is before deadline."""
        if not n.lru or not deadline > 0.0:  # times are >= 0: nothing is used before a deadline <= 0
            return None
        key = n.lru[0]
        if not key < _lru_key(deadline, 0):  # same order as last_used < deadline
            return None
        offset: int = key & _OFFSET_MASK
        self._unmap(node, n, offset, changes)
        return offset

    def _map(self, node: str, n: _Node, offset: int, domain: str, now: float, changes: Changes) -> int:
        """Record the mapping; returns its address."""
        key = _lru_key(now, offset)
        n.owner[offset] = domain
        n.by_domain[domain] = key
        n.lru.add(key)
        self._domain_refs[domain] = self._domain_refs.get(domain, 0) + 1
        self._mappings += 1
        address = self.space.address(offset)
        changes.added.append((node, address, domain))
        return address

    def _unmap(self, node: str, n: _Node, offset: int, changes: Changes) -> None:
        """Remove one mapping; the offset stays below the cursor and is NOT put on the free heap (callers
        decide: a reused offset is taken at once, an excluded one must not be handed out)."""
        domain = n.owner[offset]
        assert domain is not None
        n.lru.remove(n.by_domain.pop(domain))
        n.owner[offset] = None
        self._mappings -= 1
        refs = self._domain_refs[domain] - 1
        if refs:
            self._domain_refs[domain] = refs
        else:
            del self._domain_refs[domain]
            if self._targets.pop(domain, None) is not None:
                changes.targets[domain] = ()  # nobody maps it any more: its targets go too
        changes.removed.append((node, self.space.address(offset), domain))

    def _mark_used(self, n: _Node, domain: str, key: int, at: float) -> None:
        new = _lru_key(at, key & _OFFSET_MASK)
        if new > key:  # same offset, so the keys order like the times: only a newer time counts
            n.lru.remove(key)
            n.lru.add(new)
            n.by_domain[domain] = new

    # ---- other commands ---------------------------------------------------------------------------------

    def _touch_batch(self, touches: object, changes: Changes) -> None:
        if not isinstance(touches, tuple | list):
            raise InvalidCommand(f"touch_batch entries must be a tuple, not {type(touches).__name__}")
        bad = 0
        for entry in touches:
            if not isinstance(entry, tuple | list) or len(entry) != 4:
                bad += 1
                continue
            node, address, domain = entry[0], entry[1], entry[2]
            admitted = self._admit(entry[3], "touch", changes.report)
            if admitted is None or isinstance(address, bool) or not isinstance(address, int):
                bad += 1
                continue
            n = self._nodes.get(node) if isinstance(node, str) else None
            offset = self.space.offset(address) if n is not None else None
            if n is None or offset is None or offset >= n.cursor or n.owner[offset] != domain:
                continue  # unknown, reassigned or never mapped: nothing to mark
            # a touch is a use now: it stamps the pool clock. Its own time is a member's reading, and a
            # member catching up reads the clock late: trusting it could make a live mapping look idle
            self._mark_used(n, domain, n.by_domain[domain], admitted[0] if self._legacy else self._clock)
        if bad:
            changes.report.invalid += bad
            changes.report.warnings.append(("pool: touch_batch skipped %d malformed entries", (bad,)))

    def _set_targets(self, domain: object, targets: object, ttl: object, now: object, changes: Changes) -> None:
        d, clean, t_ttl = _text(domain), _clean_targets(targets), _finite_time(ttl)
        admitted = self._admit(now, "set_targets", changes.report)
        if d is None or clean is None or t_ttl is None or admitted is None:
            raise InvalidCommand(f"set_targets has bad fields: {_describe((domain, targets, ttl, now))}")
        if d not in self._domain_refs:
            return  # nobody maps it (forgotten or reassigned meanwhile): keep no targets for it
        old = self._targets.get(d)
        if not clean:
            if old is not None:
                del self._targets[d]
                changes.targets[d] = ()
            return
        self._targets[d] = _pack_targets(clean, t_ttl, admitted[0])
        if old is None or _unpack_targets(old)[0] != clean:
            changes.targets[d] = clean

    def _forget(self, nodes: object, now: object, changes: Changes) -> None:
        if not isinstance(nodes, tuple | list) or self._admit(now, "forget", changes.report) is None:
            raise InvalidCommand(f"forget has bad fields: {_describe((nodes, now))}")
        for node in nodes:
            n = self._nodes.pop(node, None) if isinstance(node, str) else None
            if n is None:
                continue
            count = len(n.by_domain)
            for offset in sorted(key & _OFFSET_MASK for key in n.by_domain.values()):
                self._unmap(node, n, offset, changes)
            changes.report.infos.append(("pool: forgot node %s (%d mappings)", (node, count)))

    def _release_batch(self, pairs: object, now: object, changes: Changes) -> None:
        """Unmap (node, domain) pairs; the offsets go back on the node's free heap (nothing excludes
        them), so the next checkout of that node may take one again. A node left without mappings is
        dropped, as ``forget`` drops it (a snapshot holds no empty nodes either)."""
        if not isinstance(pairs, tuple | list) or self._admit(now, "release_batch", changes.report) is None:
            raise InvalidCommand(f"release_batch has bad fields: {_describe((pairs, now))}")
        bad = 0
        for entry in pairs:
            if (not isinstance(entry, tuple | list) or len(entry) != 2
                    or not isinstance(entry[0], str) or not isinstance(entry[1], str)):
                bad += 1
                continue
            node, domain = entry
            n = self._nodes.get(node)
            key = n.by_domain.get(domain) if n is not None else None
            if n is None or key is None:
                continue  # released already, reassigned or forgotten: nothing to do
            offset = key & _OFFSET_MASK
            self._unmap(node, n, offset, changes)
            if n.by_domain:
                heapq.heappush(n.free, offset)
            else:
                del self._nodes[node]
        if bad:
            changes.report.invalid += bad
            changes.report.warnings.append(("pool: release_batch skipped %d malformed entries", (bad,)))

    def _set_excluded(self, addresses: object, now: object, changes: Changes) -> None:
        if (not isinstance(addresses, tuple | list | set | frozenset)
                or self._admit(now, "set_excluded", changes.report) is None):
            raise InvalidCommand(f"set_excluded has bad fields: {_describe((addresses, now))}")
        new = self._offsets(addresses, "set_excluded")
        self._change_excluded(new - self._excluded, self._excluded - new, changes)

    def _exclude(self, added: object, lifted: object, now: object, changes: Changes) -> None:
        if (not isinstance(added, tuple | list) or not isinstance(lifted, tuple | list)
                or self._admit(now, "exclude", changes.report) is None):
            raise InvalidCommand(f"exclude has bad fields: {_describe((added, lifted, now))}")
        add, lift = self._offsets(added, "exclude"), self._offsets(lifted, "exclude")
        self._change_excluded(add - self._excluded, (lift - add) & self._excluded, changes)

    def _offsets(self, addresses: Iterable[object], what: str) -> set[int]:
        """Pool offsets of ``addresses`` (outside the pool and the DNS address dropped: nothing to skip)."""
        new: set[int] = set()
        for a in addresses:
            if isinstance(a, bool) or not isinstance(a, int):
                raise InvalidCommand(f"{what}: {a!r} is not an IPv4 integer")
            o = self.space.offset(a)
            if o is not None and o != DNS_OFFSET:
                new.add(o)
        return new

    def _change_excluded(self, add: set[int], lift: set[int], changes: Changes) -> None:
        added, lifted = sorted(add), sorted(lift)
        self._excluded = (self._excluded | add) - lift
        if added:
            for node in sorted(self._nodes):  # one pass over nodes; each stops at its own cursor
                n = self._nodes[node]
                for o in added:
                    if o >= n.cursor:
                        break
                    if n.owner[o] is not None:
                        changes.report.warnings.append((
                            "pool: %s is held by a tailnet node: dropping its mapping for node %s (%s)",
                            (format_address(self.space.address(o)), node, n.owner[o])))
                        self._unmap(node, n, o, changes)
                if not n.by_domain:
                    del self._nodes[node]
        for o in lifted:
            for n in self._nodes.values():
                if o < n.cursor and n.owner[o] is None:
                    heapq.heappush(n.free, o)
        if added:
            changes.report.warnings.append(("pool: %d pool addresses are held by tailnet nodes and will not be "
                                            "handed out (choose a pool outside the tailnet's own addresses)",
                                            (len(self._excluded),)))

    # ---- reads ------------------------------------------------------------------------------------------

    def lookup(self, node: str, domain: str) -> tuple[Address, float] | None:
        n = self._nodes.get(node)
        key = n.by_domain.get(domain) if n is not None else None
        if key is None:
            return None
        return self.space.address(key & _OFFSET_MASK), _key_time(key)

    def domain_for(self, node: str, address: Address) -> str | None:
        n = self._nodes.get(node)
        offset = self.space.offset(address) if n is not None else None
        if n is None or offset is None or offset >= n.cursor:
            return None
        return n.owner[offset]

    def targets(self, domain: str) -> Targets:
        entry = self._targets.get(domain)
        return _unpack_targets(entry)[0] if entry is not None else ()

    def target_info(self, domain: str) -> tuple[Targets, float, float] | None:
        """(addresses, ttl, time they were set) for ``domain``, or None: for the leader's TTL refresh."""
        entry = self._targets.get(domain)
        return _unpack_targets(entry) if entry is not None else None

    def domains(self) -> list[str]:
        """Every domain some node maps, sorted."""
        return sorted(self._domain_refs)

    def mappings(self) -> Iterator[MappingView]:
        for node, n in self._nodes.items():
            for domain, key in n.by_domain.items():
                yield MappingView(node, domain, self.space.address(key & _OFFSET_MASK), _key_time(key))

    def node_mappings(self, node: str) -> list[MappingView]:
        n = self._nodes.get(node)
        if n is None:
            return []
        return [MappingView(node, d, self.space.address(k & _OFFSET_MASK), _key_time(k))
                for d, k in n.by_domain.items()]

    def excluded(self) -> list[Address]:
        return [self.space.address(o) for o in sorted(self._excluded)]

    @property
    def clock(self) -> float:
        """The pool clock (0.0 before any time was seen)."""
        return self._clock

    @property
    def legacy_clock(self) -> bool:
        """Restored from a version-1 snapshot and not ticked since: the high-water rule applies."""
        return self._legacy

    def stats(self) -> dict[str, int | float]:
        max_use = max((len(n.by_domain) for n in self._nodes.values()), default=0)
        return {
            "mappings": self._mappings,
            "nodes": len(self._nodes),
            "domains": len(self._domain_refs),
            "targets": len(self._targets),
            "pool_size": self.space.usable,
            "excluded": len(self._excluded),
            "max_node_use": max_use,
            "max_node_use_ratio": max_use / self.space.usable,
            "clock": self._clock,
            "clock_skew_events": self.clock_skew_events,
        }

    # ---- snapshot ---------------------------------------------------------------------------------------

    def to_bytes(self, *, clock: bool = True) -> bytes:
        """Versioned, canonical encoding: equal states give equal bytes whatever their history.
        ``clock=False`` writes 0.0 for the pool clock (for :meth:`digest`)."""
        domains = sorted(set(self._domain_refs) | set(self._targets))
        index = {d: i for i, d in enumerate(domains)}
        out = bytearray(_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, self._clock if clock else 0.0,
                                     len(self.space.prefixes)))
        out += _FLAGS.pack(_LEGACY if self._legacy else 0)
        for p in self.space.prefixes:
            _put_blob(out, p.encode())
        _put_u32_array(out, sorted(self.space.address(o) for o in self._excluded))
        joined = "".join(domains)
        if joined.isascii():  # the usual case: one encode, lengths in characters = bytes
            _put_u32_array(out, list(map(len, domains)))
            out += joined.encode("ascii")
        else:
            encoded = [d.encode("utf-8", "surrogatepass") for d in domains]
            _put_u32_array(out, [len(e) for e in encoded])
            out += b"".join(encoded)
        out += _U32.pack(len(self._targets))
        head = _TARGET_RECORD.size
        for d in sorted(self._targets):
            # the in-memory record holds the snapshot's fields in its byte order already: sliced, not decoded
            record = self._targets[d]
            v6_at = head + 4 * _U32.unpack_from(record, 16)[0]
            out += _U32.pack(index[d])
            out += record[:v6_at]
            out += _U32.pack((len(record) - v6_at) // 16)
            out += record[v6_at:]
        out += _U32.pack(len(self._nodes))
        for node in sorted(self._nodes):
            n = self._nodes[node]
            owner = n.owner
            name = node.encode("utf-8", "surrogatepass")
            out += _NODE_HEAD.pack(len(name), len(n.by_domain))
            out += name
            if len(n.by_domain) == len(owner) - 1:  # dense (the usual case): no gaps to skip
                offsets: Sequence[int] = range(1, len(owner))
                domains_here: list[str] = owner[1:]  # type: ignore[assignment]
            else:
                offsets = [o for o, d in enumerate(owner) if d is not None]
                domains_here = [owner[o] for o in offsets]  # type: ignore[misc]
            out += _le(array("I", offsets)).tobytes()
            out += _le(array("I", map(index.__getitem__, domains_here))).tobytes()
            # last-used times: the keys' upper bits are the IEEE doubles, written as such
            out += _le(array("Q", [k >> _OFFSET_BITS for k in map(n.by_domain.__getitem__, domains_here)])).tobytes()
        out += hashlib.sha256(out).digest()
        return bytes(out)

    def digest(self) -> str:
        """sha256 of :meth:`to_bytes` without the pool clock, hex: replicas that applied the same log
        agree on it. The clock moves with every tick (up to 20 a second), so members compared one after
        the other would never agree; every stamp it gave is in the digest, and the journal guard, not
        the digest, is what catches a diverged log."""
        return hashlib.sha256(self.to_bytes(clock=False)).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes, prefixes: Sequence[str]) -> PoolState:
        """Restore a snapshot into a pool over ``prefixes``. ValueError on corrupt data or an unknown
        version. If ``prefixes`` differ from the snapshot's, mappings (and exclusions) outside the new
        pool, or on its DNS address, are dropped and logged."""
        state = cls(prefixes)
        try:
            _Reader(bytes(data)).restore_into(state)
        except (struct.error, UnicodeDecodeError, IndexError, OverflowError) as e:
            raise ValueError(f"pool snapshot is corrupt: {e}") from None
        return state

    def _restore_node(self, node: str, offsets: array[int], domains: list[str], used: array[float]) -> None:
        """Install one node's mappings (validated by the caller: offsets strictly ascending, 1..size-1)."""
        n = _Node()
        top = offsets[-1]
        if top == len(offsets):  # dense (the usual case): offsets are exactly 1..top
            owner: list[str | None] = [None, *domains]
        else:
            owner = [None] * (top + 1)
            for o, d in zip(offsets, domains, strict=True):
                owner[o] = d
            excluded = self._excluded
            n.free = [o for o in range(1, top) if owner[o] is None and o not in excluded]  # ascending: a heap
        keys = [(b << _OFFSET_BITS) | o for b, o in zip(_time_bits(used), offsets, strict=True)]
        n.owner = owner
        n.by_domain = dict(zip(domains, keys, strict=True))
        n.lru = SortedList(keys)
        self._nodes[node] = n
        self._domain_refs.update(domains)  # Counter: counts in C
        self._mappings += len(offsets)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling (pysyncobj's forked compaction pickles the state) goes through the compact codec.
        return (_unpickle, (self.to_bytes(), self.space.prefixes))


def _unpickle(data: bytes, prefixes: Sequence[str]) -> PoolState:
    return PoolState.from_bytes(data, prefixes)


def _ignored(error: InvalidCommand, changes: Changes) -> tuple[object, Changes]:
    """The result of a command that changed nothing because it could not be read."""
    changes.report.invalid += 1
    changes.report.warnings.append(("pool: ignored command: %s", (error,)))
    return error, changes


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _le(a: array[Any]) -> array[Any]:
    if sys.byteorder == "big":
        a.byteswap()
    return a


def _put_blob(out: bytearray, blob: bytes) -> None:
    out += _U32.pack(len(blob))
    out += blob


def _put_u32_array(out: bytearray, values: list[int]) -> None:
    out += _U32.pack(len(values))
    out += _le(array("I", values)).tobytes()


class _Reader:
    """Parses and checks one snapshot; raises ValueError saying what is wrong."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size + _DIGEST_SIZE or data[:6] != SNAPSHOT_MAGIC:
            raise ValueError("not a pool snapshot (bad magic or too short)")
        body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
        _, version, _, _ = _HEADER.unpack_from(body, 0)
        if not 1 <= version <= SNAPSHOT_VERSION:
            raise ValueError(f"pool snapshot version {version} is not supported (this build reads "
                             f"versions 1 to {SNAPSHOT_VERSION})")
        self.version: int = version
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("pool snapshot checksum mismatch (corrupt or truncated)")
        self.data = body
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("pool snapshot is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def array(self, code: str, count: int) -> array[Any]:
        a = array(code)
        a.frombytes(self.take(count * a.itemsize))
        return _le(a)

    def restore_into(self, state: PoolState) -> None:
        _, _, clock, nprefixes = _HEADER.unpack(self.take(_HEADER.size))
        if _finite_time(clock) is None:
            raise ValueError(f"pool snapshot has a bad clock {clock!r}")
        if self.version == 1:
            legacy = True  # written before the pool clock: its high-water mark, and the old rule, go on
        else:
            (flags,) = _FLAGS.unpack(self.take(_FLAGS.size))
            if flags & ~_LEGACY:
                raise ValueError(f"pool snapshot has unknown flags {flags:#x}")
            legacy = bool(flags & _LEGACY)
        old_prefixes = [self.take(self.u32()).decode() for _ in range(nprefixes)]
        try:
            old = AddressSpace(old_prefixes)
        except ValueError as e:
            raise ValueError(f"pool snapshot has bad prefixes: {e}") from None
        new = state.space
        same_pool = old == new
        excluded_addrs = self.array("I", self.u32())
        lengths = self.array("I", self.u32())
        blob = self.take(sum(lengths))
        ends = list(itertools.accumulate(lengths))
        starts = [0, *ends[:-1]] if ends else []
        if blob.isascii():  # the usual case: decode once, slice characters
            text = blob.decode("ascii")
            domains = [sys.intern(text[a:b]) for a, b in zip(starts, ends, strict=True)]
        else:
            domains = [sys.intern(blob[a:b].decode("utf-8", "surrogatepass"))
                       for a, b in zip(starts, ends, strict=True)]
        if len(set(domains)) != len(domains):
            raise ValueError("pool snapshot repeats a domain")
        dropped_excluded = 0
        for a in excluded_addrs:
            if old.offset(a) in (None, 0):
                raise ValueError(f"pool snapshot excludes {format_address(a)}, outside its pool")
            o = new.offset(a)
            if o is None or o == 0:
                dropped_excluded += 1
            else:
                state._excluded.add(o)
        targets: dict[str, bytes] = {}
        for _ in range(self.u32()):
            di, ttl, updated, count = _TARGET_HEAD.unpack(self.take(_TARGET_HEAD.size))
            v4 = self.take(4 * count)  # little-endian u32s, as the in-memory record keeps them
            raw = b""
            if self.version >= 3:
                raw = self.take(16 * self.u32())
                if raw:
                    v6 = [int.from_bytes(raw[i:i + 16], "big") for i in range(0, len(raw), 16)]
                    if v6[0] <= V4_MAX or v6 != sorted(set(v6)):
                        raise ValueError("pool snapshot has a bad IPv6 target")
            if di >= len(domains) or _finite_time(ttl) is None or _finite_time(updated) is None:
                raise ValueError("pool snapshot has a bad targets entry")
            targets[domains[di]] = _TARGET_RECORD.pack(ttl, updated, count) + v4 + raw
        dropped = 0
        previous_node: str | None = None
        for _ in range(self.u32()):
            name_len, count = _NODE_HEAD.unpack(self.take(_NODE_HEAD.size))
            node = sys.intern(self.take(name_len).decode("utf-8", "surrogatepass"))
            if previous_node is not None and node <= previous_node:
                raise ValueError("pool snapshot nodes are not in order")
            previous_node = node
            offsets = self.array("I", count)
            dom_idx = self.array("I", count)
            used = self.array("d", count)
            if count == 0:
                raise ValueError(f"pool snapshot has an empty node {node!r}")
            if len(set(offsets)) != count or offsets.tolist() != sorted(offsets):
                raise ValueError(f"pool snapshot offsets of node {node!r} are not strictly ascending")
            if offsets[0] == DNS_OFFSET or offsets[-1] >= old.size:
                raise ValueError(f"pool snapshot maps node {node!r} outside its pool")
            if max(dom_idx) >= len(domains) or len(set(dom_idx)) != count:
                raise ValueError(f"pool snapshot has bad or repeated domains for node {node!r}")
            if max(_time_bits(used)) >= _NOT_FINITE_OR_NEGATIVE:
                raise ValueError(f"pool snapshot has a bad last-used time for node {node!r}")
            if not same_pool:
                kept = []
                for o, di, t in zip(offsets, dom_idx, used, strict=True):
                    no = new.offset(old.address(o))
                    if no is None or no == DNS_OFFSET or no in state._excluded:
                        dropped += 1
                    else:
                        kept.append((no, di, t))
                if not kept:
                    continue
                offsets = array("I", [k[0] for k in kept])
                dom_idx = array("I", [k[1] for k in kept])
                used = array("d", [k[2] for k in kept])
            elif not state._excluded.isdisjoint(offsets):
                raise ValueError(f"pool snapshot maps node {node!r} to an excluded address")
            state._restore_node(node, offsets, [domains[i] for i in dom_idx], used)
        if self.pos != len(self.data):
            raise ValueError("pool snapshot has trailing bytes")
        state._clock = clock
        state._legacy = legacy
        state._targets = {d: v for d, v in targets.items() if d in state._domain_refs}
        if dropped or dropped_excluded or len(state._targets) != len(targets):
            state.load_report = Report(warnings=[(
                "pool: restored a snapshot of pool %s into pool %s: dropped %d mappings and %d exclusions "
                "outside the new pool", (list(old.prefixes), list(new.prefixes), dropped, dropped_excluded))])


def _conforms(state: PoolState) -> PoolReader:
    return state  # mypy checks here that PoolState implements the PoolReader protocol
