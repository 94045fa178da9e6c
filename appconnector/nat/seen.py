"""Last-used marks from the kernel: which (node, pool address) pairs carry traffic, as coalesced touches.

Two sources, both read in bulk so the number of Raft entries depends on time, not on flows:

- the timed ``seen`` set, filled by the kernel with (node IP . pool address) of every NEW flow; read
  every few seconds (its timeout is a little longer than the read interval, so it stays small);
- a periodic conntrack dump of pool-bound entries (original destination in the pool): long flows
  show only their first packet to the NAT chains, so without this a day-long SSH session would let
  its address look idle and be reassigned. The dump is read raw (netlink.py): pyroute2's conntrack
  decoder costs ~1 ms per entry (the working note suggested pyroute2 here; measured, it is too slow: docs/design.md §5).

:func:`touches` turns pairs into at most one ``replica.touch`` per (node, address) per round, and only
when the replicated last-used is older than the refresh interval (so a busy mapping costs one mark
per refresh, like a DNS hit). Conntrack helpers here also delete the entries of a reassigned address,
so its old flows stop going to the old domain's address.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Callable, Iterable

from appconnector import metrics
from appconnector.kernel import netlink
from appconnector.nat.render import Key
from appconnector.pool.addresses import V4_MAX
from appconnector.pool.api import Address, PoolAccess


class PoolRanges:
    """Membership test for pool addresses (sorted ranges, binary search)."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        nets = sorted(networks, key=lambda n: int(n.network_address))  # one family: no mixed comparisons
        self._firsts = [int(n.network_address) for n in nets]
        self._lasts = [int(n.broadcast_address) for n in nets]

    def __contains__(self, address: int) -> bool:
        i = bisect.bisect_right(self._firsts, address) - 1
        return i >= 0 and address <= self._lasts[i]


_CT_GET = (1 << 8) | 1            # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_GET
_CT_DELETE = (1 << 8) | 2         # IPCTNL_MSG_CT_DELETE
_CTA_TUPLE_ORIG, _CTA_TUPLE_IP = 1, 1
_CTA_IP_V4_SRC, _CTA_IP_V4_DST = 1, 2
_CTA_IP_V6_SRC, _CTA_IP_V6_DST = 3, 4


def _pool_bound(buf: bytes, start: int, end: int, family: int = socket.AF_INET
                ) -> tuple[int, int, tuple[int, int]] | None:
    """(source, destination, bounds of the CTA_TUPLE_ORIG payload) of one conntrack dump message."""
    find = netlink.find
    orig = find(buf, start, end, _CTA_TUPLE_ORIG)
    ips = orig and find(buf, orig[0], orig[1], _CTA_TUPLE_IP)
    if not orig or not ips:
        return None
    v6 = family == socket.AF_INET6
    size = 16 if v6 else 4
    src = find(buf, ips[0], ips[1], _CTA_IP_V6_SRC if v6 else _CTA_IP_V4_SRC)
    dst = find(buf, ips[0], ips[1], _CTA_IP_V6_DST if v6 else _CTA_IP_V4_DST)
    if src is None or dst is None or dst[1] - dst[0] != size or src[1] - src[0] != size:
        return None
    return int.from_bytes(buf[src[0]:src[1]], "big"), int.from_bytes(buf[dst[0]:dst[1]], "big"), orig


def conntrack_pairs(pool: PoolRanges, pool6: PoolRanges | None = None) -> set[Key]:
    """(node IP, pool address) of every conntrack entry whose original destination is in the pool
    (IPv6 entries too when ``pool6`` is given). A raw netlink dump (see netlink.py: pyroute2's
    decoder costs ~1 ms per entry)."""
    pairs: set[Key] = set()
    for family, ranges in ((socket.AF_INET, pool), (socket.AF_INET6, pool6)):
        if ranges is None:
            continue
        for buf, start, end in netlink.dump(_CT_GET, family):
            entry = _pool_bound(buf, start, end, family)
            if entry is not None and entry[1] in ranges:
                pairs.add((entry[0], entry[1]))
    return pairs


def conntrack_purge(pairs: Iterable[Key]) -> int:
    """Delete conntrack entries whose original tuple goes from node IP to pool address, for each
    (node IP, pool address) in ``pairs`` (either family); returns how many were deleted."""
    wanted = set(pairs)
    deleted = 0
    for family, v6 in ((socket.AF_INET, False), (socket.AF_INET6, True)):
        if not any((a > V4_MAX) is v6 for _, a in wanted):
            continue
        tuples: list[bytes] = []
        for buf, start, end in netlink.dump(_CT_GET, family):
            entry = _pool_bound(buf, start, end, family)
            if entry is not None and (entry[0], entry[1]) in wanted:
                a, b = entry[2]
                tuples.append(netlink.attr(_CTA_TUPLE_ORIG | netlink.NLA_F_NESTED, buf[a:b]))
        errors = netlink.request_all(_CT_DELETE, family, tuples)
        deleted += sum(1 for e in errors if e == 0)  # ENOENT: gone meanwhile
    return deleted


def touches(pairs: Iterable[Key], node_for_ip: Callable[[int], str | None], replica: PoolAccess,
            now: float, refresh: float) -> int:
    """Queue one touch per (node, address) in ``pairs`` whose last-used is older than ``refresh``
    seconds. Pairs of unknown nodes or unmapped addresses are skipped. Returns touches queued."""
    queued = 0
    done: set[tuple[str, Address]] = set()
    for node_ip, address in pairs:
        node = node_for_ip(node_ip)
        if node is None or (node, address) in done:
            continue
        done.add((node, address))
        domain = replica.domain_for(node, address)
        if domain is None:
            continue
        found = replica.lookup(node, domain)
        if found is None or found[0] != address or now - found[1] < refresh:
            continue
        replica.touch(node, address, domain, now)
        queued += 1
    metrics.NAT_TOUCHES.inc(len(done))
    return queued
