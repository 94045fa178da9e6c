"""The answer policy (pure): which rcode and records a query gets, given what we know about its name.

No sockets, no clocks, no pool: the service asks the pool and the upstream resolver, then asks this
module what to say. Every record is owned by the question name (see ``wire``), so a reply is an rcode
and two lists of encoded records.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from appconnector.dns import svcb, wire
from appconnector.dns.wire import Query

# Synthesised SOA/NS (as upstream natc answers them locally for any name). The names sit under
# ".invalid" (RFC 6761) so nothing ever tries to reach them.
NS_NAME = "ns.appconnector.invalid"
HOSTMASTER = "hostmaster.appconnector.invalid"
SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 1, 3600, 600, 86400


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer: an rcode (BADVERS included) and encoded records (owned by the question name)."""

    rcode: int
    answers: tuple[bytes, ...] = ()
    authority: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Resolution:
    """One upstream lookup of (name, type).

    kind: ``ok`` (addresses of the asked type), ``nxdomain``, ``nodata`` (the name exists, no record
    of that type) or ``failure`` (SERVFAIL, REFUSED or silence from every resolver). ``ttl`` is the
    positive TTL (least of the records used) or the negative TTL (SOA minimum), in seconds.
    ``records`` holds the raw RDATA of an SVCB/HTTPS lookup (``addresses`` is then empty).
    """

    kind: Literal["ok", "nxdomain", "nodata", "failure"]
    addresses: tuple[str, ...] = ()
    ttl: int = 0
    detail: str = ""
    records: tuple[bytes, ...] = ()


class Action(Enum):
    """What to do with an A/AAAA name after looking it up upstream."""

    CHECKOUT = "checkout"          # steer it: answer A with the node's pool address
    PASS_THROUGH = "pass_through"  # resolves into pool.ignore_destinations: answer the real records
    NXDOMAIN = "nxdomain"
    NODATA = "nodata"
    FAILURE = "failure"            # SERVFAIL
    LOOP = "loop"                  # the upstream answered with a pool address: SERVFAIL + DNS_LOOPS


Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def _inside(address: str, networks: Networks) -> bool:
    if ":" not in address:  # IPv4 text: integer arithmetic, ipaddress objects cost more than the lookup
        value = int.from_bytes(socket.inet_aton(address), "big")
        return any(net.version == 4 and value & int(net.netmask) == int(net.network_address) for net in networks)
    ip = ipaddress.ip_address(address)
    return any(ip in net for net in networks)


def classify(resolution: Resolution, pool: Networks, ignore: Networks) -> Action:
    """Decide from the upstream A lookup of a name (docs/design.md §4; upstream natc's ``ignoreDestination``:
    one address inside ``ignore`` is enough to pass the name through)."""
    if resolution.kind == "failure":
        return Action.FAILURE
    if resolution.kind == "nxdomain":
        return Action.NXDOMAIN
    if resolution.kind == "nodata" or not resolution.addresses:
        return Action.NODATA
    if any(_inside(a, ignore) for a in resolution.addresses):
        return Action.PASS_THROUGH
    if any(_inside(a, pool) for a in resolution.addresses):
        return Action.LOOP
    return Action.CHECKOUT


class DomainAllowList:
    """``dns.domains``: empty allows every name; ``example.com`` allows that name only;
    ``*.example.com`` allows every name below example.com (not example.com itself, as in DNS
    wildcards). Names are compared lower-case without the trailing dot."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._exact: set[str] = set()
        self._suffixes: list[str] = []
        for p in patterns:
            p = p.lower().rstrip(".")
            if p.startswith("*."):
                self._suffixes.append("." + p[2:])
            else:
                self._exact.add(p)
        self._all = not patterns

    def allows(self, domain: str) -> bool:
        if self._all or domain in self._exact:
            return True
        return any(domain.endswith(s) for s in self._suffixes)


@dataclass(frozen=True)
class AnswerPolicy:
    """Answers for one configuration. ``ttl`` is the TTL of pool answers and of synthesised records."""

    ttl: int
    allow: DomainAllowList = field(default_factory=lambda: DomainAllowList(()))

    # ---- before anything is looked up -------------------------------------------------------------

    def precheck(self, q: Query) -> Reply | None:
        """A reply that needs no lookup (errors, refusals), or None to go on. RFC 8906 order: opcode,
        question count, EDNS version, class."""
        if q.opcode != 0:
            return Reply(wire.NOTIMP)
        if q.qdcount != 1:
            return Reply(wire.FORMERR)
        if q.edns is not None and q.edns.version != 0:
            return Reply(wire.BADVERS)
        if q.qclass != wire.CLASS_IN:
            return Reply(wire.REFUSED)
        return None

    def domain_allowed(self, domain: str | None) -> bool:
        return domain is not None and self.allow.allows(domain)

    # ---- records ------------------------------------------------------------------------------------

    def soa(self, ttl: int | None = None, owner: bytes | None = None) -> bytes:
        """The SOA we synthesise for any name; its minimum (and TTL) is the negative-caching TTL."""
        t = self.ttl if ttl is None else ttl
        if owner is None:
            return wire.rr_soa(_NS_WIRE, _HOSTMASTER_WIRE, SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, t, t)
        return wire.rr_soa(_NS_WIRE, _HOSTMASTER_WIRE, SOA_SERIAL, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, t, t, owner)

    def local(self, qtype: int) -> Reply:
        """Types answered locally for any name: SOA and NS synthesised, others NODATA."""
        if qtype == wire.TYPE_SOA:
            return Reply(wire.NOERROR, (self.soa(),))
        if qtype == wire.TYPE_NS:
            return Reply(wire.NOERROR, (wire.rr_ns(_NS_WIRE, self.ttl),))
        return self.nodata()

    def nodata(self, negative_ttl: int | None = None) -> Reply:
        """NOERROR, no answer, our SOA in authority (RFC 2308 §2.2)."""
        return Reply(wire.NOERROR, (), (self.soa(self._neg(negative_ttl)),))

    def nxdomain(self, qname: bytes, negative_ttl: int | None = None) -> Reply:
        """NXDOMAIN with our SOA in authority (RFC 2308 §2.1), owned by the parent of ``qname`` (the
        question's wire name): a SOA at the name itself would say the name exists."""
        return Reply(wire.NXDOMAIN, (), (self.soa(self._neg(negative_ttl), wire.parent_owner(qname)),))

    def _neg(self, negative_ttl: int | None) -> int:
        return self.ttl if negative_ttl is None else min(self.ttl, negative_ttl)

    def pool_answer(self, qtype: int, address: int, address6: int | None = None) -> Reply:
        """A → the pool address; AAAA → its v6 pool mirror when the caller has one (the domain has real
        IPv6 addresses and ``pool.prefixes6`` is set), else NODATA (docs/design.md §4)."""
        if qtype == wire.TYPE_A:
            return Reply(wire.NOERROR, (wire.rr_a(address, self.ttl),))
        if address6 is not None:
            return Reply(wire.NOERROR, (wire.rr_aaaa(address6, self.ttl),))
        return self.nodata()

    def real_records(self, qtype: int, resolution: Resolution) -> Reply:
        """Pass-through of the real addresses (names in ``pool.ignore_destinations``). A name that has
        an A record never gets NXDOMAIN for AAAA: NODATA instead."""
        if resolution.kind == "failure":
            return Reply(wire.SERVFAIL)
        if resolution.kind != "ok" or not resolution.addresses:
            return self.nodata(resolution.ttl)
        ttl = min(self.ttl, resolution.ttl)
        if qtype == wire.TYPE_A:
            return Reply(wire.NOERROR, tuple(wire.rr_a(a, ttl) for a in resolution.addresses))
        return Reply(wire.NOERROR, tuple(wire.rr_aaaa(a, ttl) for a in resolution.addresses))

    def service_bindings(self, qtype: int, records: Sequence[svcb.Svcb], ttl: int) -> Reply:
        """HTTPS/SVCB records passed on from upstream, without their address hints (the caller has
        already left out those whose target is not "." or a name we steer); none left → NODATA."""
        if not records:
            return self.nodata(ttl)
        ttl = min(self.ttl, ttl)
        return Reply(wire.NOERROR, tuple(wire.rr_data(qtype, svcb.encode(svcb.without_hints(r)), ttl)
                                         for r in records))


_NS_WIRE = wire.domain_to_wire(NS_NAME)
_HOSTMASTER_WIRE = wire.domain_to_wire(HOSTMASTER)
