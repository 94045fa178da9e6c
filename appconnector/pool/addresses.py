"""The pool's address space: the configured prefixes as one run of offsets.

Offset 0 is the lowest pool address, reserved for DNS and never handed out; offsets 1..size-1 are what a
node may be given. The state machine works in offsets (small dense integers, so per-node tables can be
arrays); this module turns them into IPv4 integers and back in O(log k) for k prefixes. It holds the one
parser of ``pool.prefixes`` and ``pool.prefixes6`` (:func:`pool_networks`, :func:`pool_networks6`; the
config validates through them and turns :class:`PrefixError` into its ``ConfigError``); nothing here
allocates through ipaddress or netaddr, which are far too slow for that.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import socket
import struct
from collections.abc import Sequence
from typing import TypeVar

DNS_OFFSET = 0
"""The reserved offset: the pool's lowest address, where DNS listens."""


class PrefixError(ValueError):
    """A pool prefix that is not a network of the pool's family: ``key`` (``pool.prefixes``), the bad
    ``value`` and what is ``allowed``."""

    def __init__(self, key: str, value: str, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


def pool_networks(prefixes: Sequence[str]) -> list[ipaddress.IPv4Network]:
    """``pool.prefixes`` as networks, ordered numerically (docs/design.md §3)."""
    return _networks("pool.prefixes", prefixes, ipaddress.IPv4Network, "IPv4 prefixes such as \"100.64.1.0/24\"",
                     "IPv4 prefixes only (IPv6 cannot be NATed to IPv4)")


def pool_networks6(prefixes: Sequence[str]) -> list[ipaddress.IPv6Network]:
    """``pool.prefixes6`` as networks, ordered numerically; empty: no IPv6 pool."""
    return _networks("pool.prefixes6", prefixes, ipaddress.IPv6Network,
                     "IPv6 prefixes such as \"fd7a:115c:a1e0:a99c:1::/80\"",
                     "IPv6 prefixes only (the IPv4 pool is pool.prefixes)")


_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _networks(key: str, prefixes: Sequence[str], kind: type[_Net], example: str, only: str) -> list[_Net]:
    nets: list[_Net] = []
    for p in prefixes:
        try:
            net = ipaddress.ip_network(p, strict=True)
        except ValueError as e:
            raise PrefixError(key, p, f"{example} ({e})") from None
        if not isinstance(net, kind):
            raise PrefixError(key, p, only)
        nets.append(net)
    return sorted(nets)


class AddressSpace:
    """Sorted, non-overlapping IPv4 ranges with a bijection offset ↔ address."""

    __slots__ = ("_firsts", "_lasts", "_starts", "prefixes", "size")

    def __init__(self, prefixes: Sequence[str], *, version: int = 4) -> None:
        if isinstance(prefixes, str):
            prefixes = [prefixes]
        nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (
            pool_networks(list(prefixes)) if version == 4 else pool_networks6(list(prefixes)))
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


_PACK4 = struct.Struct("!I")


def format_address(address: int) -> str:
    """Text of an address integer: IPv4 up to :data:`V4_MAX`, else IPv6. The one formatter (logs,
    admin answers, nftables elements): fast enough for 100,000-element batches."""
    if address <= V4_MAX:
        return socket.inet_ntoa(_PACK4.pack(address))
    # not socket.inet_ntop: importing pysyncobj replaces it with a Windows-only stub on every platform
    return ipaddress.IPv6Address(address).compressed


V4_MAX = 0xFFFF_FFFF
"""Address integers up to this are IPv4; above it IPv6 (targets, NAT keys). ::/96 is never a target."""


class DualSpace:
    """The v6 pool as a mirror of the v4 one: the v6 address of a mapping is the v6 pool's address at
    the mapping's v4 offset. One allocation, two families: the mapping is a pure function of the v4
    state, so no second allocator has to agree with the first. ``pool.prefixes6`` must hold every v4
    offset (config validation)."""

    __slots__ = ("v4", "v6")

    def __init__(self, prefixes: Sequence[str], prefixes6: Sequence[str]) -> None:
        self.v4 = AddressSpace(prefixes)
        self.v6 = AddressSpace(prefixes6, version=6) if prefixes6 else None
        if self.v6 is not None and self.v6.size < self.v4.size:
            raise ValueError(f"pool.prefixes6 {list(self.v6.prefixes)} hold fewer addresses than pool.prefixes")

    def to_v6(self, address: int) -> int | None:
        """The v6 pool address of v4 pool address ``address`` (None: no v6 pool, or outside the pool)."""
        o = self.v4.offset(address) if self.v6 is not None else None
        return None if o is None or self.v6 is None else self.v6.address(o)

    def to_v4(self, address6: int) -> int | None:
        """The v4 pool address whose v6 mirror is ``address6`` (None: not a mirrored v6 pool address)."""
        o = self.v6.offset(address6) if self.v6 is not None else None
        return None if o is None or o >= self.v4.size else self.v4.address(o)
