"""DNS wire format: a hand-written query parser and response encoder.

Only what a server answering queries needs: parse one query (header, questions, the additional section
for EDNS0), and encode a response whose records are all owned by the question name (every answer we
give is: A, AAAA, SOA, NS, and the SOA of a negative answer). Owner names are written as a compression
pointer to the question (offset 12), so a response can reuse the client's question bytes unchanged:
the question case is preserved byte for byte (RFC 8906) and the pre-built fast path only has to glue
the query's ID and question onto ready answer bytes.

Parsing never raises anything but :class:`Malformed` / :class:`FormatError` (the fuzz target checks).
Upstream responses (compression pointers, CNAME chains) are read by :func:`parse_response`: dnslib
took ~115 µs per response here, a third of the cost of a new name.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

HEADER_LEN = 12
OUR_UDP_PAYLOAD = 1232  # RFC 8906 / DNS flag day 2020: a size that avoids IP fragmentation
MIN_UDP_PAYLOAD = 512

# header bits (16-bit flags word)
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
CD = 0x0010
OPCODE_MASK = 0x7800

# rcodes (BADVERS is an extended rcode: 16 = upper bits 1 in the OPT TTL, lower bits 0 in the header)
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16
RCODE_NAMES = {NOERROR: "NOERROR", FORMERR: "FORMERR", SERVFAIL: "SERVFAIL", NXDOMAIN: "NXDOMAIN",
               NOTIMP: "NOTIMP", REFUSED: "REFUSED", BADVERS: "BADVERS"}

# types and classes
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_OPT = 1, 2, 6, 28, 41
TYPE_SVCB, TYPE_HTTPS = 64, 65
CLASS_IN = 1
DO_BIT = 0x8000  # in the OPT record's flags

_OWNER_PTR = b"\xc0\x0c"  # a pointer to the question name at offset 12
_HOSTNAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


class Malformed(Exception):
    """Not worth an answer: shorter than a header, or a response (QR set) sent to us."""


class FormatError(Exception):
    """Has a header but cannot be parsed: answer FORMERR with ``header``'s ID, opcode and RD."""

    def __init__(self, reason: str, ident: int, flags: int) -> None:
        super().__init__(reason)
        self.ident = ident
        self.flags = flags


@dataclass(frozen=True, slots=True)
class Edns:
    """The client's OPT record: version, DO bit and advertised UDP payload size."""

    version: int
    do: bool
    payload: int


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed query. ``question`` is the raw question section as sent (name, type, class)."""

    ident: int
    flags: int
    qdcount: int
    question: bytes          # raw bytes of the first question (empty when qdcount == 0)
    qname: bytes             # wire name of the first question, as sent (case preserved)
    qtype: int
    qclass: int
    edns: Edns | None

    @property
    def opcode(self) -> int:
        return (self.flags & OPCODE_MASK) >> 11

    def domain(self) -> str | None:
        """The question name as lower-case text without the trailing dot, or None when it is not a
        host name (labels other than letters, digits, '-' and '_', or the root)."""
        return wire_name_to_domain(self.qname)


def wire_name_to_domain(name: bytes) -> str | None:
    """Uncompressed wire name → ``"example.com"`` (lower case), or None if not a host name."""
    labels: list[bytes] = []
    try:
        skip_name(name, 0, allow_pointer=False, labels=labels)
    except ValueError:
        return None
    for label in labels:
        if not _HOSTNAME_BYTES.issuperset(label):
            return None
    return b".".join(labels).decode("ascii").lower() if labels else None


def domain_to_wire(domain: str) -> bytes:
    """``"ns.example"`` → wire name (no compression). Raises ValueError on an over-long label."""
    out = bytearray()
    for label in domain.rstrip(".").split("."):
        if not label:
            continue
        raw = label.encode("ascii")
        if len(raw) > 63:
            raise ValueError(f"label too long: {label!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > 255:
        raise ValueError(f"name too long: {domain!r}")
    return bytes(out)


_MAX_POINTERS = 64  # compression pointers followed in one name before it counts as a loop


def skip_name(data: bytes, pos: int, allow_pointer: bool, labels: list[bytes] | None = None) -> int:
    """The one name walker: walk the name at ``pos`` and return the offset where the message goes on
    after it. Raises ValueError on bad encoding (runs past the end, a reserved label type, longer than
    255 bytes, a pointer where ``allow_pointer`` is False, a pointer loop).

    Without ``labels`` a compression pointer ends the walk unfollowed (skipping a record needs no
    more). With ``labels`` the raw labels are appended to it, following pointers."""
    total = 0
    end = -1  # where the message goes on: after the first pointer, once one was followed
    jumps = 0
    while True:
        if pos >= len(data):
            raise ValueError("name runs past the end")
        n = data[pos]
        if n == 0:
            return pos + 1 if end < 0 else end
        if n & 0xC0 == 0xC0:
            if not allow_pointer:
                raise ValueError("compression pointer where none is allowed")
            if pos + 2 > len(data):
                raise ValueError("truncated compression pointer")
            if labels is None:
                return pos + 2
            if end < 0:
                end = pos + 2
            jumps += 1
            if jumps > _MAX_POINTERS:
                raise ValueError("compression loop")
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            continue
        if n & 0xC0:
            raise ValueError("reserved label type")
        total += n + 1
        if total > 254:
            raise ValueError("name longer than 255 bytes")
        if labels is not None:
            if pos + 1 + n > len(data):
                raise ValueError("name runs past the end")
            labels.append(data[pos + 1:pos + 1 + n])
        pos += 1 + n


def parse_query(data: bytes) -> Query:
    """Parse a query message. Raises Malformed (drop it) or FormatError (answer FORMERR)."""
    if len(data) < HEADER_LEN:
        raise Malformed("shorter than a DNS header")
    ident, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
    if flags & QR:
        raise Malformed("a response, not a query")
    try:
        pos = HEADER_LEN
        question = qname = b""
        qtype = qclass = 0
        for i in range(qd):
            start = pos
            pos = skip_name(data, pos, allow_pointer=i > 0)
            if pos + 4 > len(data):
                raise ValueError("question runs past the end")
            if i == 0:
                qname = data[start:pos]
                qtype, qclass = struct.unpack_from("!HH", data, pos)
                question = data[start:pos + 4]
            pos += 4
        for _ in range(an + ns):
            pos = _skip_rr(data, pos)
        edns: Edns | None = None
        for _ in range(ar):
            start = pos
            pos = skip_name(data, pos, allow_pointer=True)
            if pos + 10 > len(data):
                raise ValueError("record runs past the end")
            rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            if rtype == TYPE_OPT:
                if edns is not None:
                    raise ValueError("more than one OPT record")
                if data[start] != 0:
                    raise ValueError("OPT record not owned by the root")
                edns = Edns(version=(ttl >> 16) & 0xFF, do=bool(ttl & DO_BIT), payload=rclass)
            pos += 10 + rdlen
            if pos > len(data):
                raise ValueError("record data runs past the end")
        if pos != len(data):
            raise ValueError("trailing bytes after the last record")
    except ValueError as e:
        raise FormatError(str(e), ident, flags) from None
    return Query(ident, flags, qd, question, qname, qtype, qclass, edns)


def _skip_rr(data: bytes, pos: int) -> int:
    pos = skip_name(data, pos, allow_pointer=True)
    if pos + 10 > len(data):
        raise ValueError("record runs past the end")
    (rdlen,) = struct.unpack_from("!H", data, pos + 8)
    pos += 10 + rdlen
    if pos > len(data):
        raise ValueError("record data runs past the end")
    return pos


# ---- encoding ------------------------------------------------------------------------------------


def rr_a(address: int | str, ttl: int) -> bytes:
    """An A record owned by the question name."""
    packed = ipaddress.IPv4Address(address).packed
    return _OWNER_PTR + struct.pack("!HHIH", TYPE_A, CLASS_IN, ttl, 4) + packed


def rr_aaaa(address: str | int, ttl: int) -> bytes:
    """An AAAA record owned by the question name."""
    return _OWNER_PTR + struct.pack("!HHIH", TYPE_AAAA, CLASS_IN, ttl, 16) + ipaddress.IPv6Address(address).packed


def rr_data(rtype: int, rdata: bytes, ttl: int) -> bytes:
    """A record of any type owned by the question name, from its encoded RDATA (HTTPS/SVCB)."""
    return _OWNER_PTR + struct.pack("!HHIH", rtype, CLASS_IN, ttl, len(rdata)) + rdata


def rr_ns(target: bytes, ttl: int) -> bytes:
    """An NS record owned by the question name; ``target`` is a wire name."""
    return _OWNER_PTR + struct.pack("!HHIH", TYPE_NS, CLASS_IN, ttl, len(target)) + target


def rr_soa(mname: bytes, rname: bytes, serial: int, refresh: int, retry: int, expire: int,
           minimum: int, ttl: int, owner: bytes = _OWNER_PTR) -> bytes:
    """A SOA record owned by the question name (or ``owner``, see :func:`parent_owner`)."""
    rdata = mname + rname + struct.pack("!5I", serial, refresh, retry, expire, minimum)
    return owner + struct.pack("!HHIH", TYPE_SOA, CLASS_IN, ttl, len(rdata)) + rdata


def parent_owner(qname: bytes) -> bytes:
    """An owner name for the question's parent: a pointer to its second label, or the root for a
    single-label name. An NXDOMAIN's SOA belongs above the name that does not exist."""
    if not qname or qname[0] == 0 or qname[1 + qname[0]] == 0:
        return b"\x00"
    offset = HEADER_LEN + 1 + qname[0]
    return bytes((0xC0 | offset >> 8, offset & 0xFF))


def opt_record(do: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT record: our UDP payload size, version 0, DO copied from the query, no options."""
    return b"\x00" + struct.pack("!HHBBHH", TYPE_OPT, OUR_UDP_PAYLOAD, ext_rcode, 0, DO_BIT if do else 0, 0)


def response_flags(query_flags: int, rcode: int, *, aa: bool = True, tc: bool = False) -> int:
    """QR set, opcode/RD/CD copied, AA as asked, Z/AD/RA cleared, the low four rcode bits."""
    flags = QR | (query_flags & (OPCODE_MASK | RD | CD)) | (rcode & 0xF)
    if aa:
        flags |= AA
    if tc:
        flags |= TC
    return flags


def encode_response(query: Query, rcode: int, answers: Sequence[bytes] = (), authority: Sequence[bytes] = (),
                    *, udp_limit: int | None = None, aa: bool = True) -> bytes:
    """The response to ``query``: its question (as sent), the records, our OPT when it sent one.

    ``udp_limit`` is the most the client can take over UDP; a bigger response loses its records and
    gets TC set, so the client retries over TCP (RFC 7766). Records must be owned by the question
    name (see :func:`rr_a`) and therefore need a question. A query with an opcode other than QUERY
    gets the header alone: the rest of such a message need not be a question section.
    """
    if query.flags & OPCODE_MASK:
        return encode_error(query.ident, query.flags, rcode)
    opt = b""
    if query.edns is not None:
        opt = opt_record(query.edns.do, rcode >> 4)
    question = query.question
    if not question:
        answers = authority = ()
    body = b"".join(answers) + b"".join(authority)
    tc = False
    if udp_limit is not None and HEADER_LEN + len(question) + len(body) + len(opt) > udp_limit:
        body, answers, authority, tc = b"", (), (), True
    header = struct.pack("!6H", query.ident, response_flags(query.flags, rcode, aa=aa, tc=tc),
                         1 if question else 0, len(answers), len(authority), 1 if opt else 0)
    return header + question + body + opt


def encode_error(ident: int, query_flags: int, rcode: int) -> bytes:
    """A header-only response (FORMERR for garbage, NOTIMP for an unknown opcode we could not parse)."""
    return struct.pack("!6H", ident, response_flags(query_flags, rcode), 0, 0, 0, 0)


def udp_limit(query: Query) -> int:
    """How big a UDP response to this query may be."""
    if query.edns is None:
        return MIN_UDP_PAYLOAD
    return max(MIN_UDP_PAYLOAD, min(query.edns.payload, OUR_UDP_PAYLOAD))


def rcode_of(response: bytes) -> int:
    """The full rcode of an encoded response (header bits plus the OPT's extended bits)."""
    rcode = response[3] & 0xF
    if response[11] and response[-11] == 0 and response[-10:-8] == b"\x00\x29":
        rcode |= response[-6] << 4
    return rcode


# ---- upstream responses ----------------------------------------------------------------------------

TYPE_CNAME = 5


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record of an upstream response: lower-case owner name without the trailing dot,
    and for CNAME the target name, for A/AAAA the address text, for SOA the minimum field, for
    SVCB/HTTPS the raw RDATA (its target name is never compressed, so it stands alone)."""

    name: str
    rtype: int
    ttl: int
    value: str | int | bytes | None


@dataclass(frozen=True, slots=True)
class Response:
    ident: int
    flags: int
    rcode: int
    qname: str
    qtype: int
    answers: tuple[Record, ...]
    authority: tuple[Record, ...]

    @property
    def truncated(self) -> bool:
        return bool(self.flags & TC)


def build_query(ident: int, domain: str, qtype: int, payload: int = OUR_UDP_PAYLOAD) -> bytes:
    """A recursive query (RD set) with an OPT record, for the upstream resolvers."""
    return (struct.pack("!6H", ident, RD, 1, 0, 0, 1) + domain_to_wire(domain) + struct.pack("!HH", qtype, CLASS_IN)
            + b"\x00" + struct.pack("!HHIH", TYPE_OPT, payload, 0, 0))


def _name_at(data: bytes, pos: int) -> tuple[str, int]:
    """Read a possibly compressed name; returns (lower-case text without the dot, offset after it)."""
    labels: list[bytes] = []
    end = skip_name(data, pos, allow_pointer=True, labels=labels)
    return b".".join(labels).decode("latin-1").lower(), end


def parse_response(data: bytes) -> Response:
    """Parse an upstream response (answer and authority sections). Raises ValueError when malformed."""
    if len(data) < HEADER_LEN:
        raise ValueError("shorter than a DNS header")
    ident, flags, qd, an, ns, _ar = struct.unpack_from("!6H", data)
    if not flags & QR or qd != 1:
        raise ValueError("not a response to one question")
    qname, pos = _name_at(data, HEADER_LEN)
    if pos + 4 > len(data):
        raise ValueError("question runs past the end")
    (qtype,) = struct.unpack_from("!H", data, pos)
    pos += 4
    sections: list[list[Record]] = [[], []]
    for i, count in enumerate((an, ns)):
        for _ in range(count):
            name, pos = _name_at(data, pos)
            if pos + 10 > len(data):
                raise ValueError("record runs past the end")
            rtype, _rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
            pos += 10
            if pos + rdlen > len(data):
                raise ValueError("record data runs past the end")
            value: str | int | bytes | None = None
            if rtype == TYPE_A and rdlen == 4:
                value = socket.inet_ntoa(data[pos:pos + 4])
            elif rtype == TYPE_AAAA and rdlen == 16:
                value = str(ipaddress.IPv6Address(data[pos:pos + 16]))
            elif rtype == TYPE_CNAME:
                value = _name_at(data, pos)[0]
            elif rtype == TYPE_SOA:
                after = _name_at(data, _name_at(data, pos)[1])[1]
                if after + 20 > pos + rdlen:
                    raise ValueError("short SOA")
                value = struct.unpack_from("!I", data, after + 16)[0]
            elif rtype in (TYPE_SVCB, TYPE_HTTPS):
                value = data[pos:pos + rdlen]
            sections[i].append(Record(name, rtype, ttl & 0x7FFFFFFF, value))
            pos += rdlen
    return Response(ident, flags, flags & 0xF, qname, qtype, tuple(sections[0]), tuple(sections[1]))
