"""Puts the desired steer state into the kernel: one nftables transaction per change (run by the
NAT service's worker thread, never on the Raft apply thread or the event loop).

At start (and whenever a delta is refused, e.g. someone flushed our map) the whole table is replaced
in ONE transaction: delete + create + every element. That is atomic, so traffic sees the old table or
the new one, never a gap, and flows already in conntrack keep their NAT. It is also faster than reading
the kernel's map back (listing 100k elements as JSON costs ~1 s) to diff it. Deltas between start-ups
come from :class:`appconnector.nat.render.SteerModel`. Only ``table inet appconnector`` is touched.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping

from appconnector import metrics
from appconnector.kernel.nftables import Nftables, NftError, dump_set_keys
from appconnector.nat import render
from appconnector.nat.render import Delta, Key, TableSpec
from appconnector.pool.api import Address

_PAIR = struct.Struct("!II")  # a seen key: node IP . pool address, network order


class Reconciler:
    """Our nftables table: build, change, read back, remove."""

    def __init__(self, nft: Nftables, spec: TableSpec) -> None:
        self.nft = nft
        self.spec = spec

    def rebuild(self, elements: Mapping[Key, Address]) -> None:
        """Replace the table with one holding exactly ``elements`` (one transaction). Raises NftError."""
        try:
            self.nft.run(render.table_commands(self.spec) + render.element_commands(add=elements))
        except NftError:
            metrics.NAT_RECONCILES.labels("full", "error").inc()
            raise
        metrics.NAT_RECONCILES.labels("full", "ok").inc()
        metrics.NAT_LAST_RECONCILE.set(time.time())

    def apply(self, delta: Delta) -> None:
        """Apply ``delta`` in one transaction. Raises NftError when the kernel refuses it (someone
        flushed our map, or it is full): the caller rebuilds."""
        if not delta:
            return
        try:
            self.nft.run(render.element_commands(add=delta.added, remove=delta.removed))
        except NftError:
            metrics.NAT_RECONCILES.labels("delta", "error").inc()
            raise
        metrics.NAT_RECONCILES.labels("delta", "ok").inc()
        metrics.NAT_LAST_RECONCILE.set(time.time())

    def remove(self) -> None:
        """Delete our table (nothing else); fine when it is already gone."""
        self.nft.run(render.delete_table_commands())

    def exists(self) -> bool:
        try:
            self.nft.list(f"table {render.FAMILY} {render.TABLE}")
        except NftError:
            return False
        return True

    def read_seen(self) -> list[Key]:
        """(node IP, pool address) of flows that started within the seen timeout (raw netlink dump:
        libnftables' listing is far slower for big sets, see nftables.py); IPv6 pairs (from the v6 seen
        set, with ``pool.prefixes6``) carry the v6 pool address."""
        keys = dump_set_keys(render.FAMILY, render.TABLE, render.SEEN)
        metrics.NAT_SEEN_READS.inc()
        pairs = [_PAIR.unpack(k) for k in keys if len(k) == _PAIR.size]
        if self.spec.pool6:
            pairs += [(int.from_bytes(k[:16], "big"), int.from_bytes(k[16:], "big"))
                      for k in dump_set_keys(render.FAMILY, render.TABLE, render.SEEN6) if len(k) == 32]
        return pairs

    def unmapped_counts(self) -> tuple[int, int]:
        """Packets to pool addresses that had no mapping since the table was built: (rejected with a
        reset or ICMP error, dropped over the reject rate limit). One listing for both."""
        counters = self.nft.list(f"counters table {render.FAMILY} {render.TABLE}")
        return render.parse_counter(counters, render.REJECTED), render.parse_counter(counters, render.UNMAPPED)
