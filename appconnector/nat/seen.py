"""Last-used marks from the kernel: which (node, pool address) pairs carry traffic, as coalesced touches.

Two sources, both read in bulk so the number of Raft entries depends on time, not on flows:

- the timed ``seen`` set, filled by the kernel with (node IP . pool address) of every NEW flow; read
  every few seconds (its timeout is a little longer than the read interval, so it stays small);
- a periodic conntrack dump of pool-bound entries (original destination in the pool): long flows
  show only their first packet to the NAT chains, so without this a day-long SSH session would let
  its address look idle and be reassigned.

:func:`touches` turns pairs into at most one ``replica.touch`` per (node, address) per round, and only
when the replicated last-used is older than the refresh interval (so a busy mapping costs one mark
per refresh, like a DNS hit). Conntrack helpers here also delete the entries of a reassigned address,
so its old flows stop going to the old domain's address.
"""

from __future__ import annotations

import bisect
import socket
from collections.abc import Callable, Iterable

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from appconnector import metrics
from appconnector.config import pool_networks
from appconnector.nat.render import Key, ip_int, ip_text
from appconnector.pool.api import Address, Replica


class PoolRanges:
    """Membership test for pool addresses (sorted ranges, binary search)."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        nets = pool_networks(tuple(prefixes))
        self._firsts = [int(n.network_address) for n in nets]
        self._lasts = [int(n.broadcast_address) for n in nets]

    def __contains__(self, address: int) -> bool:
        i = bisect.bisect_right(self._firsts, address) - 1
        return i >= 0 and address <= self._lasts[i]


def conntrack_pairs(pool: PoolRanges) -> set[Key]:
    """(node IP, pool address) of every IPv4 conntrack entry whose original destination is in the pool."""
    pairs: set[Key] = set()
    with Conntrack() as ct:
        for entry in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=socket.AF_INET)):
            t = entry.tuple_orig
            if t.daddr is None or t.saddr is None:
                continue
            daddr = ip_int(t.daddr)
            if daddr in pool:
                pairs.add((ip_int(t.saddr), daddr))
    return pairs


def conntrack_purge(pairs: Iterable[Key]) -> int:
    """Delete conntrack entries whose original tuple is (node IP → pool address); returns how many."""
    deleted = 0
    with Conntrack() as ct:
        for node_ip, address in pairs:
            want = NFCTAttrTuple(family=socket.AF_INET, saddr=ip_text(node_ip), daddr=ip_text(address))
            entries = list(ct.dump_entries(tuple_orig=want))
            for entry in entries:
                try:
                    ct.delete(entry)
                    deleted += 1
                except OSError:  # gone meanwhile (NetlinkError is an OSError)
                    pass
    return deleted


def touches(pairs: Iterable[Key], node_for_ip: Callable[[int], str | None], replica: Replica,
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
