"""Desired NAT state, pure: which steer elements the pool implies, and the nftables JSON that says so.

Nothing here does I/O. :class:`SteerModel` mirrors the replicated mappings, the replicated targets of
each domain and the nodes' tailnet IPv4s, and answers every change with a :class:`Delta` of kernel
elements; :func:`table_commands` and :func:`element_commands` turn that into libnftables JSON.

A steer element is ``(node IP, pool address) → real address``. A domain with several real addresses
spreads its nodes over them by rendezvous hashing of (node, target): deterministic on every replica,
and a target that comes or goes moves only the nodes that must move (``hash mod n`` would reshuffle
nearly all of them).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from appconnector.pool.addresses import V4_MAX, DualSpace, format_address
from appconnector.pool.api import Address, Changes, MappingView, Targets

FAMILY = "inet"
TABLE = "appconnector"
STEER = "steer"
SEEN = "seen"
POOL = "pool"
STEER6, SEEN6, POOL6 = "steer6", "seen6", "pool6"   # the same for IPv6 (pool.prefixes6)
UNMAPPED = "unmapped"            # counter: unmapped packets dropped (over the reject limit)
REJECTED = "unmapped_rejected"   # counter: unmapped packets answered with a reset / ICMP error
REJECT_LIMIT = "reject_rate"     # named limit shared by the reject rules

Key = tuple[int, int]
"""A steer element's key: (node tailnet IP, pool address), both as integers of one family (IPv6 above
:data:`V4_MAX`: a node's tailnet IPv6 and the mapping's v6 pool address)."""

_PACK = struct.Struct("!I")


def ip_int(text: str) -> int:
    """IPv4 or IPv6 text → integer (strict: ``inet_pton``; raises OSError on anything else)."""
    if ":" not in text:
        value: int = _PACK.unpack(socket.inet_pton(socket.AF_INET, text))[0]
        return value
    value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    if value <= V4_MAX:
        raise OSError(f"{text}: ::/96 is not a usable IPv6 address here")
    return value


def parse_node_ip(node: str) -> int | None:
    """A node string that is itself an IP address (standalone mode), else None."""
    try:
        return ip_int(node)
    except OSError:
        return None


def split_targets(targets: Targets) -> tuple[Targets, Targets]:
    """(IPv4, IPv6) parts of a sorted target tuple."""
    i = next((i for i, a in enumerate(targets) if a > V4_MAX), len(targets))
    return targets[:i], targets[i:]


def pick_target(node: str, targets: Targets) -> Address | None:
    """The real address ``node`` is steered to: highest rendezvous hash of (node, target)."""
    if not targets:
        return None
    if len(targets) == 1:
        return targets[0]
    prefix = node.encode() + b"\0"

    def score(target: Address) -> bytes:
        packed = _PACK.pack(target) if target <= V4_MAX else target.to_bytes(16, "big")
        return hashlib.blake2b(prefix + packed, digest_size=8).digest()

    return max(targets, key=score)


@dataclass(frozen=True, slots=True)
class TableSpec:
    """What shapes our table (not its elements): from the NAT settings."""

    interface: str                 # tailnet.interface: where tailnet traffic arrives
    pool: tuple[ipaddress.IPv4Network, ...]  # pool.prefixes
    max_mappings: int              # nat.max_mappings: size of the steer map and the seen set
    seen_timeout: float = 15.0     # seconds a (node, address) stays in `seen` after a new flow
    # Unmapped packets answered per second (one bucket for the table) before the rest are just
    # dropped: a stale client fails fast, a flood cannot make us a reflector.
    reject_rate: int = 100
    reject_burst: int = 200
    pool6: tuple[ipaddress.IPv6Network, ...] = ()  # pool.prefixes6; empty: no IPv6 sets, map or rules

    @property
    def dns_address(self) -> int:
        """The reserved lowest pool address (DNS); never dropped as unmapped."""
        return int(min(self.pool).network_address)


def table_commands(spec: TableSpec) -> list[dict[str, object]]:
    """Replace our table with an empty one of the right shape (``add`` + ``delete`` + create: the
    add makes the delete safe when the table does not exist yet). Run in the same transaction as the
    elements, so traffic sees the old table or the new one, never none."""
    t = {"family": FAMILY, "table": TABLE}
    iif = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": spec.interface}}
    daddr: dict[str, object] = {"payload": {"protocol": "ip", "field": "daddr"}}
    to_pool = {"match": {"op": "==", "left": daddr, "right": f"@{POOL}"}}
    not_dns = {"match": {"op": "!=", "left": daddr, "right": format_address(spec.dns_address)}}
    nets = sorted(spec.pool)
    families = [_V4, _V6] if spec.pool6 else [_V4]
    pool_elems = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets]

    def chain(name: str, kind: str, hook: str, prio: int) -> dict[str, object]:
        return {"add": {"chain": {**t, "name": name, "type": kind, "hook": hook, "prio": prio,
                                  "policy": "accept"}}}

    def rule(chain_name: str, *expr: object) -> dict[str, object]:
        return {"add": {"rule": {**t, "chain": chain_name, "expr": list(expr)}}}

    return [
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"table": {"family": FAMILY, "name": TABLE}}},
        {"add": {"set": {**t, "name": POOL, "type": "ipv4_addr", "flags": ["interval"], "elem": pool_elems}}},
        {"add": {"map": {**t, "name": STEER, "type": ["ipv4_addr", "ipv4_addr"], "map": "ipv4_addr",
                         "size": spec.max_mappings}}},
        # The kernel adds (node IP . pool address) of each new flow; we read and expire it. The
        # timeout flag makes the kernel pick a backend that supports updates from the packet path.
        {"add": {"set": {**t, "name": SEEN, "type": ["ipv4_addr", "ipv4_addr"], "flags": ["timeout"],
                         "timeout": max(1, round(spec.seen_timeout)), "size": spec.max_mappings}}},
        *_v6_objects(spec, t),
        {"add": {"counter": {**t, "name": UNMAPPED}}},
        {"add": {"counter": {**t, "name": REJECTED}}},
        {"add": {"limit": {**t, "name": REJECT_LIMIT, "rate": spec.reject_rate, "per": "second",
                           "burst": spec.reject_burst, "unit": "packets"}}},
        # Before DNAT (dstnat is -100) so daddr is still the pool address. Its own chain: when the
        # set is full the update fails and ends only this rule, never the steering (docs/design.md §5).
        chain("seen", "filter", "prerouting", -150),
        *(rule("seen", iif, {"match": {"op": "==", "left": f.daddr, "right": f"@{f.pool}"}},
               {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
               {"set": {"op": "update", "elem": f.pair, "set": f"@{f.seen}"}}) for f in families),
        chain("steer", "nat", "prerouting", -100),
        *(rule("steer", iif, {"match": {"op": "==", "left": f.daddr, "right": f"@{f.pool}"}},
               {"dnat": {"family": f.proto, "addr": {"map": {"key": f.pair, "data": f"@{f.steer}"}}}})
          for f in families),
        # After DNAT: a packet from the tailnet still addressed to the pool had no mapping. Reject it
        # (TCP reset, else ICMP admin-prohibited) so the client fails at once instead of timing
        # out; past the shared rate limit, drop. Each outcome has its own counter.
        chain("unmapped", "filter", "prerouting", -90),
        *(rule("unmapped", iif, to_pool, not_dns, *match, {"limit": REJECT_LIMIT}, {"counter": REJECTED},
               {"reject": verdict}) for match, verdict in _rejects()),
        rule("unmapped", iif, to_pool, not_dns, {"counter": UNMAPPED}, {"drop": None}),
        # The v6 pool has no DNS address to spare (DNS listens on the v4 one).
        *(r for f in families[1:] for r in (
            *(rule("unmapped", iif, {"match": {"op": "==", "left": f.daddr, "right": f"@{f.pool}"}}, *match,
                   {"limit": REJECT_LIMIT}, {"counter": REJECTED}, {"reject": verdict})
              for match, verdict in _rejects()),
            rule("unmapped", iif, {"match": {"op": "==", "left": f.daddr, "right": f"@{f.pool}"}},
                 {"counter": UNMAPPED}, {"drop": None}))),
        # Masquerade only what we steered, never every DNAT on the host.
        chain("masquerade", "nat", "postrouting", 100),
        *(rule("masquerade",
               {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
               {"match": {"op": "==", "left": {"ct": {"key": f"{f.proto} daddr", "dir": "original"}},
                          "right": f"@{f.pool}"}},
               {"masquerade": None}) for f in families),
    ]


@dataclass(frozen=True, slots=True)
class _Family:
    """The names and payload expressions one address family's rules use."""

    proto: str    # "ip" or "ip6"
    pool: str
    steer: str
    seen: str

    @property
    def daddr(self) -> dict[str, object]:
        return {"payload": {"protocol": self.proto, "field": "daddr"}}

    @property
    def pair(self) -> dict[str, object]:
        return {"concat": [{"payload": {"protocol": self.proto, "field": "saddr"}}, self.daddr]}


_V4 = _Family("ip", POOL, STEER, SEEN)
_V6 = _Family("ip6", POOL6, STEER6, SEEN6)


def _v6_objects(spec: TableSpec, t: dict[str, str]) -> list[dict[str, object]]:
    """The v6 pool set, steer map and seen set (nothing without ``pool.prefixes6``)."""
    if not spec.pool6:
        return []
    elems = [{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in sorted(spec.pool6)]
    return [
        {"add": {"set": {**t, "name": POOL6, "type": "ipv6_addr", "flags": ["interval"], "elem": elems}}},
        {"add": {"map": {**t, "name": STEER6, "type": ["ipv6_addr", "ipv6_addr"], "map": "ipv6_addr",
                         "size": spec.max_mappings}}},
        {"add": {"set": {**t, "name": SEEN6, "type": ["ipv6_addr", "ipv6_addr"], "flags": ["timeout"],
                         "timeout": max(1, round(spec.seen_timeout)), "size": spec.max_mappings}}},
    ]


def _rejects() -> list[tuple[tuple[object, ...], dict[str, object]]]:
    """(extra matches, reject verdict) per kind of packet, in rule order. ``icmpx`` is nftables'
    family-neutral form: ICMP type 3 code 13 for IPv4, ICMPv6 type 1 code 1 for IPv6."""
    tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    return [((tcp,), {"type": "tcp reset"}),
            ((), {"type": "icmpx", "expr": "admin-prohibited"})]


def delete_table_commands() -> list[dict[str, object]]:
    """Remove our table if it exists (and only ours)."""
    return [{"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}}]


def _key_json(key: Key) -> dict[str, object]:
    return {"concat": [format_address(key[0]), format_address(key[1])]}


def element_commands(add: Mapping[Key, Address] = {}, remove: Iterable[Key] = (),
                     chunk: int = 50_000) -> list[dict[str, object]]:
    """Steer-map deletions, then additions, batched ``chunk`` elements per command (one transaction
    when run together). A changed value is a deletion plus an addition: the kernel refuses to
    overwrite an element's data."""
    out: list[dict[str, object]] = []
    gone, new = list(remove), add.items()
    for name, v6 in ((STEER, False), (STEER6, True)):  # the family of a key is its pool address's
        t = {"family": FAMILY, "table": TABLE, "name": name}
        removals = [_key_json(k) for k in gone if (k[1] > V4_MAX) is v6]
        for i in range(0, len(removals), chunk):
            out.append({"delete": {"element": {**t, "elem": removals[i:i + chunk]}}})
    for name, v6 in ((STEER, False), (STEER6, True)):
        t = {"family": FAMILY, "table": TABLE, "name": name}
        additions = [[_key_json(k), format_address(v)] for k, v in new if (k[1] > V4_MAX) is v6]
        for i in range(0, len(additions), chunk):
            out.append({"add": {"element": {**t, "elem": additions[i:i + chunk]}}})
    return out


def parse_counter(objects: Iterable[Mapping[str, object]], name: str) -> int:
    """Packets of the counter called ``name`` in ``list counter(s) …`` JSON output."""
    for obj in objects:
        c = obj.get("counter")
        if isinstance(c, dict) and c.get("name") == name:
            return int(c.get("packets", 0))
    return 0


@dataclass(slots=True)
class Delta:
    """Kernel element changes: delete ``removed`` first, then add ``added`` (an update is both)."""

    removed: list[Key] = field(default_factory=list)
    added: dict[Key, Address] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.removed or self.added)


class PendingDelta:
    """Kernel changes recorded and not yet applied, coalesced into one :class:`Delta`; past ``limit``
    keys the backlog is dropped for one full rebuild (cheaper than a huge delta, and bounded memory).

    Merging keeps the kernel rule "delete, then add": a key whose addition has not reached the kernel
    is simply forgotten when it is removed again; a key the kernel may hold stays in ``removed``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.rebuild = False
        self._removed: dict[Key, None] = {}   # an ordered set
        self._added: dict[Key, Address] = {}

    def __len__(self) -> int:
        return len(self._removed) + len(self._added)

    def __bool__(self) -> bool:
        return self.rebuild or bool(self._removed or self._added)

    def add(self, delta: Delta) -> None:
        if self.rebuild:
            return
        for key in delta.removed:
            if key in self._added:
                del self._added[key]
            else:
                self._removed[key] = None
        self._added.update(delta.added)
        if len(self) > self.limit:
            self.mark_rebuild()

    def mark_rebuild(self) -> None:
        self.rebuild = True
        self._removed, self._added = {}, {}

    def take(self) -> tuple[bool, Delta]:
        """(rebuild needed, the coalesced delta), and start empty."""
        out = (self.rebuild, Delta(list(self._removed), self._added))
        self.rebuild = False
        self._removed, self._added = {}, {}
        return out


def flatten(parts: Iterable[Mapping[Key, Address]]) -> dict[Key, Address]:
    """One element dict from :meth:`SteerModel.parts`."""
    out: dict[Key, Address] = {}
    for part in parts:
        out.update(part)
    return out


MappingId = tuple[str, Address]
"""(node, pool address): a mapping as NAT sees it."""


class SteerModel:
    """The desired steer map, kept in step with the pool's changes. Not thread-safe: callers lock.

    Node IPs come from the node directory; a node it does not list is taken as its own IP when it
    parses as one (standalone mode), else it has no element until the directory learns it. With a v6
    pool (``space``), a node's tailnet IPv6 is steered from the mapping's v6 mirror to the domain's real
    IPv6 addresses, its IPv4 from the v4 address to the real IPv4 ones.
    """

    def __init__(self, space: DualSpace | None = None) -> None:
        self._space = space if space is not None and space.v6 is not None else None
        self._node_ips: dict[str, tuple[int, ...]] = {}
        self._ip_node: dict[int, str] = {}                     # node IP → node, for the seen set
        self._clear()

    def _clear(self) -> None:
        self._domain: dict[MappingId, str] = {}
        self._by_domain: dict[str, set[MappingId]] = {}
        self._by_node: dict[str, set[Address]] = {}
        self._targets: dict[str, Targets] = {}
        self._keys: dict[MappingId, dict[Key, Address]] = {}  # what each mapping installs
        self._owner: dict[Key, MappingId] = {}                 # who holds each kernel key
        self._n6 = 0                                           # keys of _owner that are IPv6

    # -- reads ---------------------------------------------------------------------------------------
    def elements(self) -> dict[Key, Address]:
        """Every desired element (a copy)."""
        return {k: v for keys in self._keys.values() for k, v in keys.items()}

    def parts(self) -> list[dict[Key, Address]]:
        """Every mapping's elements, cheap to take under the caller's lock (a C-level copy of the outer
        list): the per-mapping dicts are never changed in place (a change replaces them), so
        :func:`flatten` can merge them later, outside the lock."""
        return list(self._keys.values())

    def __len__(self) -> int:
        return len(self._owner)

    def count6(self) -> int:
        """Elements that are IPv6."""
        return self._n6

    def installed(self, node: str, address: Address) -> bool:
        return bool(self._keys.get((node, address)))

    def node_for_ip(self, ip: int) -> str | None:
        node = self._ip_node.get(ip)
        if node is None and format_address(ip) in self._by_node:
            return format_address(ip)
        return node

    def domains(self) -> list[str]:
        return list(self._by_domain)

    def mapping_count(self) -> int:
        return len(self._domain)

    def ips_of(self, node: str) -> tuple[int, ...]:
        ips = self._node_ips.get(node)
        if ips is not None:
            return ips
        ip = parse_node_ip(node)
        return (ip,) if ip is not None else ()

    # -- changes -------------------------------------------------------------------------------------
    def reset(self, mappings: Iterable[MappingView], targets_of: Mapping[str, Targets]) -> dict[Key, Address]:
        """Forget everything and mirror ``mappings``; returns the full element set. (The same rules as
        :meth:`apply`, in one pass with a per-node IP cache: it runs at every start.)"""
        self._clear()
        self._targets = {d: tuple(sorted(t)) for d, t in targets_of.items()}
        ips: dict[str, tuple[int, ...]] = {}
        elements: dict[Key, Address] = {}
        owner = self._owner
        for m in mappings:
            node, address, domain = m.node, m.address, m.domain
            mid = (node, address)
            self._add_mapping(node, address, domain)
            node_ips = ips.get(node)
            if node_ips is None:
                node_ips = ips[node] = self.ips_of(node)
            keys: dict[Key, Address] = {}
            for key, target in self._wanted(node, address, node_ips, self._targets.get(domain, ())):
                if owner.setdefault(key, mid) == mid:
                    keys[key] = target
                    elements[key] = target
                    self._n6 += key[1] > V4_MAX
            if keys:
                self._keys[mid] = keys
        return elements

    def _wanted(self, node: str, address: Address, node_ips: tuple[int, ...],
                targets: Targets) -> Iterable[tuple[Key, Address]]:
        """The (key, real address) pairs mapping (node, address) asks for, per family."""
        v4, v6 = split_targets(targets) if self._space is not None else (targets, ())
        t4 = pick_target(node, v4)
        t6 = pick_target(node, v6)
        address6 = self._space.to_v6(address) if t6 is not None and self._space is not None else None
        for ip in node_ips:
            if ip <= V4_MAX:
                if t4 is not None:
                    yield (ip, address), t4
            elif address6 is not None and t6 is not None:
                yield (ip, address6), t6

    def flow_keys(self, node: str, address: Address) -> list[Key]:
        """Every (node IP, pool address) pair a flow of this mapping can have, both families: what a
        conntrack purge looks for."""
        address6 = self._space.to_v6(address) if self._space is not None else None
        keys: list[Key] = []
        for ip in self.ips_of(node):
            if ip <= V4_MAX:
                keys.append((ip, address))
            elif address6 is not None:
                keys.append((ip, address6))
        return keys

    def apply(self, changes: Changes) -> Delta:
        """Mirror one applied pool command."""
        touched: set[MappingId] = set()
        for node, address, _domain in changes.removed:
            mid = (node, address)
            if mid in self._domain:
                self._drop_mapping(mid)
                touched.add(mid)
        for node, address, domain in changes.added:
            mid = (node, address)
            if mid in self._domain:
                self._drop_mapping(mid)
            self._add_mapping(node, address, domain)
            touched.add(mid)
        for domain, targets in changes.targets.items():
            self._targets[domain] = tuple(sorted(targets))
            touched.update(self._by_domain.get(domain, ()))
        return self._rerender(touched)

    def set_node_ips(self, node_ips: Mapping[str, Iterable[str]]) -> Delta:
        """Replace the directory's node → tailnet IPs (both families); re-render the nodes whose IPs changed."""
        new = {n: tuple(sorted(i for i in map(parse_node_ip, ips) if i is not None)) for n, ips in node_ips.items()}
        return self._replace_ips(new)

    def adopt_node_ips(self, other: SteerModel) -> Delta:
        """Take ``other``'s node IPs (a model built aside takes over from the live one)."""
        return self._replace_ips(other._node_ips)

    def _replace_ips(self, new: dict[str, tuple[int, ...]]) -> Delta:
        changed = {n for n in set(new) | set(self._node_ips) if new.get(n) != self._node_ips.get(n)}
        self._set_ips(new)  # shared, never changed in place: a change replaces the dict
        touched = {(n, a) for n in changed for a in self._by_node.get(n, ())}
        return self._rerender(touched)

    # -- internals -----------------------------------------------------------------------------------
    def _set_ips(self, node_ips: dict[str, tuple[int, ...]]) -> None:
        self._node_ips = node_ips
        self._ip_node = {ip: n for n, ips in node_ips.items() for ip in ips}

    def _add_mapping(self, node: str, address: Address, domain: str) -> None:
        mid = (node, address)
        self._domain[mid] = domain
        self._by_domain.setdefault(domain, set()).add(mid)
        self._by_node.setdefault(node, set()).add(address)

    def _drop_mapping(self, mid: MappingId) -> None:
        domain = self._domain.pop(mid)
        peers = self._by_domain[domain]
        peers.discard(mid)
        if not peers:
            del self._by_domain[domain]
            self._targets.pop(domain, None)
        addrs = self._by_node[mid[0]]
        addrs.discard(mid[1])
        if not addrs:
            del self._by_node[mid[0]]

    def _render(self, mid: MappingId) -> None:
        """Compute ``mid``'s elements from the model and claim their keys."""
        domain = self._domain.get(mid)
        keys: dict[Key, Address] = {}
        if domain is not None:
            for key, target in self._wanted(mid[0], mid[1], self.ips_of(mid[0]), self._targets.get(domain, ())):
                if self._owner.setdefault(key, mid) == mid:  # two nodes claiming one IP: first wins
                    keys[key] = target
                    self._n6 += key[1] > V4_MAX
        if keys:
            self._keys[mid] = keys
        else:
            self._keys.pop(mid, None)

    def _rerender(self, touched: set[MappingId]) -> Delta:
        old: dict[Key, Address] = {}
        for mid in touched:
            for k, v in self._keys.pop(mid, {}).items():
                old[k] = v
                del self._owner[k]
                self._n6 -= k[1] > V4_MAX
        new: dict[Key, Address] = {}
        for mid in touched:
            self._render(mid)
            new.update(self._keys.get(mid, {}))
        delta = Delta()
        for k, v in old.items():
            if new.get(k) != v:
                delta.removed.append(k)
        for k, v in new.items():
            if old.get(k) != v:
                delta.added[k] = v
        return delta
