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
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from appconnector.config import pool_networks
from appconnector.pool.api import Address, Changes, MappingView, Targets

FAMILY = "inet"
TABLE = "appconnector"
STEER = "steer"
SEEN = "seen"
POOL = "pool"
UNMAPPED = "unmapped"            # counter: unmapped packets dropped (over the reject limit)
REJECTED = "unmapped_rejected"   # counter: unmapped packets answered with a reset / ICMP error
REJECT_LIMIT = "reject_rate"     # named limit shared by the reject rules

Key = tuple[int, int]
"""A steer element's key: (node tailnet IPv4, pool address), both as integers."""

_PACK = struct.Struct("!I")


def ip_text(address: int) -> str:
    """IPv4 integer → dotted text (fast path for large element batches)."""
    return socket.inet_ntoa(_PACK.pack(address))


def ip_int(text: str) -> int:
    """Dotted IPv4 text → integer (strict: ``inet_pton``; raises OSError on anything else)."""
    value: int = _PACK.unpack(socket.inet_pton(socket.AF_INET, text))[0]
    return value


def parse_node_ip(node: str) -> int | None:
    """A node string that is itself an IPv4 address (standalone mode), else None."""
    try:
        return ip_int(node)
    except OSError:
        return None


def pick_target(node: str, targets: Targets) -> Address | None:
    """The real address ``node`` is steered to: highest rendezvous hash of (node, target)."""
    if not targets:
        return None
    if len(targets) == 1:
        return targets[0]
    prefix = node.encode() + b"\0"

    def score(target: Address) -> bytes:
        return hashlib.blake2b(prefix + _PACK.pack(target), digest_size=8).digest()

    return max(targets, key=score)


@dataclass(frozen=True, slots=True)
class TableSpec:
    """What shapes our table (not its elements): from the config."""

    interface: str                 # tailnet.interface: where tailnet traffic arrives
    pool: tuple[str, ...]          # pool.prefixes
    max_mappings: int              # nat.max_mappings: size of the steer map and the seen set
    seen_timeout: float = 15.0     # seconds a (node, address) stays in `seen` after a new flow
    # Unmapped packets answered per second (one bucket for the table) before the rest are just
    # dropped: a stale client fails fast, a flood cannot make us a reflector.
    reject_rate: int = 100
    reject_burst: int = 200

    @property
    def dns_address(self) -> int:
        """The reserved lowest pool address (DNS); never dropped as unmapped."""
        return int(pool_networks(self.pool)[0].network_address)


def table_commands(spec: TableSpec) -> list[dict[str, object]]:
    """Replace our table with an empty one of the right shape (``add`` + ``delete`` + create: the
    add makes the delete safe when the table does not exist yet). Run in the same transaction as the
    elements, so traffic sees the old table or the new one, never none."""
    t = {"family": FAMILY, "table": TABLE}
    iif = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": spec.interface}}
    daddr: dict[str, object] = {"payload": {"protocol": "ip", "field": "daddr"}}
    saddr: dict[str, object] = {"payload": {"protocol": "ip", "field": "saddr"}}
    to_pool = {"match": {"op": "==", "left": daddr, "right": f"@{POOL}"}}
    pair = {"concat": [saddr, daddr]}
    not_dns = {"match": {"op": "!=", "left": daddr, "right": ip_text(spec.dns_address)}}
    nets = pool_networks(spec.pool)
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
        {"add": {"counter": {**t, "name": UNMAPPED}}},
        {"add": {"counter": {**t, "name": REJECTED}}},
        {"add": {"limit": {**t, "name": REJECT_LIMIT, "rate": spec.reject_rate, "per": "second",
                           "burst": spec.reject_burst, "unit": "packets"}}},
        # Before DNAT (dstnat is -100) so daddr is still the pool address. Its own chain: when the
        # set is full the update fails and ends only this rule, never the steering (docs/design.md §5).
        chain("seen", "filter", "prerouting", -150),
        rule("seen", iif, to_pool,
             {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}},
             {"set": {"op": "update", "elem": pair, "set": f"@{SEEN}"}}),
        chain("steer", "nat", "prerouting", -100),
        rule("steer", iif, to_pool, {"dnat": {"family": "ip", "addr": {"map": {"key": pair, "data": f"@{STEER}"}}}}),
        # After DNAT: a packet from the tailnet still addressed to the pool had no mapping. Reject it
        # (TCP reset, else ICMP admin-prohibited) so the client fails at once instead of timing
        # out; past the shared rate limit, drop. Each outcome has its own counter.
        chain("unmapped", "filter", "prerouting", -90),
        *(rule("unmapped", iif, to_pool, not_dns, *match, {"limit": REJECT_LIMIT}, {"counter": REJECTED},
               {"reject": verdict}) for match, verdict in _rejects()),
        rule("unmapped", iif, to_pool, not_dns, {"counter": UNMAPPED}, {"drop": None}),
        # Masquerade only what we steered, never every DNAT on the host.
        chain("masquerade", "nat", "postrouting", 100),
        rule("masquerade",
             {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
             {"match": {"op": "==", "left": {"ct": {"key": "ip daddr", "dir": "original"}}, "right": f"@{POOL}"}},
             {"masquerade": None}),
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
    return {"concat": [ip_text(key[0]), ip_text(key[1])]}


def element_commands(add: Mapping[Key, Address] = {}, remove: Iterable[Key] = (),
                     chunk: int = 50_000) -> list[dict[str, object]]:
    """Steer-map deletions, then additions, batched ``chunk`` elements per command (one transaction
    when run together). A changed value is a deletion plus an addition: the kernel refuses to
    overwrite an element's data."""
    t = {"family": FAMILY, "table": TABLE, "name": STEER}
    out: list[dict[str, object]] = []
    removals = [_key_json(k) for k in remove]
    for i in range(0, len(removals), chunk):
        out.append({"delete": {"element": {**t, "elem": removals[i:i + chunk]}}})
    additions = [[_key_json(k), ip_text(v)] for k, v in add.items()]
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

    Node IPs come from the node directory; a node it does not list is taken as its own IPv4 when it
    parses as one (standalone mode), else it has no element until the directory learns it.
    """

    def __init__(self) -> None:
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

    def installed(self, node: str, address: Address) -> bool:
        return bool(self._keys.get((node, address)))

    def node_for_ip(self, ip: int) -> str | None:
        node = self._ip_node.get(ip)
        if node is None and ip_text(ip) in self._by_node:
            return ip_text(ip)
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
            target = pick_target(node, self._targets.get(domain, ()))
            if target is None:
                continue
            keys: dict[Key, Address] = {}
            for ip in node_ips:
                key = (ip, address)
                if owner.setdefault(key, mid) == mid:
                    keys[key] = target
                    elements[key] = target
            if keys:
                self._keys[mid] = keys
        return elements

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
        """Replace the directory's node → tailnet IPv4s; re-render the nodes whose IPs changed."""
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
            target = pick_target(mid[0], self._targets.get(domain, ()))
            if target is not None:
                for ip in self.ips_of(mid[0]):
                    key = (ip, mid[1])
                    if self._owner.setdefault(key, mid) == mid:  # two nodes claiming one IP: first wins
                        keys[key] = target
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
