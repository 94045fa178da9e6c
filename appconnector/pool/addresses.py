"""The pool's address space: the configured prefixes as one run of offsets.

Offset 0 is the lowest pool address, reserved for DNS and never handed out; offsets 1..size-1 are what a
node may be given. The state machine works in offsets (small dense integers, so per-node tables can be
arrays); this module turns them into IPv4 integers and back in O(log k) for k prefixes. Parsing goes
through :func:`appconnector.config.pool_networks` (the one parser of ``pool.prefixes``); nothing here
allocates through ipaddress or netaddr, which are far too slow for that.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
from collections.abc import Sequence

from appconnector.config import pool_networks

DNS_OFFSET = 0
"""The reserved offset: the pool's lowest address, where DNS listens."""


class AddressSpace:
    """Sorted, non-overlapping IPv4 ranges with a bijection offset ↔ address."""

    __slots__ = ("_firsts", "_lasts", "_starts", "prefixes", "size")

    def __init__(self, prefixes: Sequence[str]) -> None:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        nets = pool_networks(list(prefixes))
        if not nets:
            raise ValueError("pool.prefixes: at least one IPv4 prefix is needed")
        for a, b in itertools.pairwise(nets):
            if a.overlaps(b):
                raise ValueError(f"pool.prefixes: {a} and {b} overlap")
        self.prefixes: tuple[str, ...] = tuple(str(n) for n in nets)
        self._firsts: list[int] = [int(n.network_address) for n in nets]  # first address of each range
        self._lasts: list[int] = [int(n.broadcast_address) for n in nets]  # last address, inclusive
        self._starts: list[int] = []  # offset of each range's first address
        total = 0
        for n in nets:
            self._starts.append(total)
            total += n.num_addresses
        self.size: int = total
        if total < 2:
            raise ValueError(f"pool.prefixes {list(self.prefixes)}: at least two addresses (one is reserved for DNS)")

    @property
    def usable(self) -> int:
        """Addresses a node may be given (the pool less the DNS address)."""
        return self.size - 1

    @property
    def dns_address(self) -> int:
        return self._firsts[0]

    def address(self, offset: int) -> int:
        """The IPv4 integer at ``offset``; ``IndexError`` outside 0..size-1."""
        if not 0 <= offset < self.size:
            raise IndexError(f"offset {offset} outside the pool (0..{self.size - 1})")
        i = bisect.bisect_right(self._starts, offset) - 1
        return self._firsts[i] + (offset - self._starts[i])

    def offset(self, address: int) -> int | None:
        """The offset of IPv4 integer ``address``, or None when it is outside the pool."""
        i = bisect.bisect_right(self._firsts, address) - 1
        if i < 0 or address > self._lasts[i]:
            return None
        return self._starts[i] + (address - self._firsts[i])

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.offset(address) is not None

    def ranges(self) -> list[tuple[int, int]]:
        """(first, last) IPv4 integers of each range, ascending, last inclusive."""
        return list(zip(self._firsts, self._lasts, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AddressSpace) and self.prefixes == other.prefixes

    def __hash__(self) -> int:
        return hash(self.prefixes)

    def __repr__(self) -> str:
        return f"AddressSpace({list(self.prefixes)!r})"


def format_address(address: int) -> str:
    """Dotted-quad text of an IPv4 integer (for logs and errors)."""
    return str(ipaddress.IPv4Address(address))
