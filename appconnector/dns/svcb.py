"""SVCB / HTTPS record data (RFC 9460), pure: parse, drop the address hints, encode.

RDATA is ``SvcPriority (u16) | TargetName (uncompressed wire name) | SvcParams``; each SvcParam is
``key (u16) | length (u16) | value``, keys strictly increasing. We pass upstream HTTPS/SVCB answers
for steered names on, but ``ipv4hint`` / ``ipv6hint`` carry the service's real addresses: a client
using them would go around the connector, so they are removed (and from ``mandatory`` too, or the
record would name a key it lacks). Everything else (alpn, port, ech, unknown keys) is kept byte for
byte. Parsing raises nothing but :class:`Malformed` (the fuzz target ``tests/dns/fuzz_svcb.py``
checks, against dnspython's reading).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from appconnector.dns import wire

TYPE_SVCB, TYPE_HTTPS = 64, 65
KEY_MANDATORY, KEY_ALPN, KEY_NO_DEFAULT_ALPN, KEY_PORT, KEY_IPV4HINT, KEY_ECH, KEY_IPV6HINT = 0, 1, 2, 3, 4, 5, 6
KEY_INVALID = 65535             # RFC 9460 §14.3.2: reserved, never on the wire
HINTS = frozenset((KEY_IPV4HINT, KEY_IPV6HINT))
ROOT = b"\x00"

_U16 = struct.Struct("!H")


class Malformed(ValueError):
    """RDATA that is not a valid SVCB/HTTPS record."""


@dataclass(frozen=True, slots=True)
class Svcb:
    """One record: priority (0 = AliasMode), the target as an uncompressed wire name, and the
    params as (key, value bytes) in increasing key order."""

    priority: int
    target: bytes
    params: tuple[tuple[int, bytes], ...] = ()

    @property
    def alias(self) -> bool:
        return self.priority == 0


def parse(rdata: bytes) -> Svcb:
    """Parse one record's RDATA. Raises Malformed."""
    if len(rdata) < 3:
        raise Malformed("shorter than a priority and a target")
    (priority,) = _U16.unpack_from(rdata, 0)
    try:  # RFC 9460 §2.2: TargetName is never compressed
        pos = wire.skip_name(rdata, 2, allow_pointer=False)
    except ValueError as e:
        raise Malformed(f"target name: {e}") from None
    target = rdata[2:pos]
    params: list[tuple[int, bytes]] = []
    last = -1
    while pos < len(rdata):
        if pos + 4 > len(rdata):
            raise Malformed("param header runs past the end")
        key, length = struct.unpack_from("!HH", rdata, pos)
        pos += 4
        if key <= last:
            raise Malformed("param keys not strictly increasing")
        if key == KEY_INVALID:
            raise Malformed("reserved param key 65535")
        if pos + length > len(rdata):
            raise Malformed(f"param {key} value runs past the end")
        value = rdata[pos:pos + length]
        _check_value(key, value)
        params.append((key, value))
        last = key
        pos += length
    record = Svcb(priority, target, tuple(params))
    _check_mandatory(record)
    return record


def _check_value(key: int, value: bytes) -> None:
    """The lengths RFC 9460 §7 fixes for the keys it defines (others are opaque)."""
    n = len(value)
    if key == KEY_MANDATORY and (n == 0 or n % 2):
        raise Malformed("mandatory: not a non-empty list of keys")
    if key == KEY_ALPN:
        if n == 0:
            raise Malformed("alpn: empty")
        i = 0
        while i < n:
            if value[i] == 0 or i + 1 + value[i] > n:
                raise Malformed("alpn: bad protocol id length")
            i += 1 + value[i]
    if key == KEY_NO_DEFAULT_ALPN and n:
        raise Malformed("no-default-alpn: has a value")
    if key == KEY_PORT and n != 2:
        raise Malformed("port: not two bytes")
    if key == KEY_IPV4HINT and (n == 0 or n % 4):
        raise Malformed("ipv4hint: not a list of IPv4 addresses")
    if key == KEY_IPV6HINT and (n == 0 or n % 16):
        raise Malformed("ipv6hint: not a list of IPv6 addresses")


def _check_mandatory(record: Svcb) -> None:
    """RFC 9460 §8: mandatory lists present keys, in increasing order, never itself."""
    values = dict(record.params)
    raw = values.get(KEY_MANDATORY)
    if raw is None:
        return
    keys = [_U16.unpack_from(raw, i)[0] for i in range(0, len(raw), 2)]
    if any(b <= a for a, b in itertools.pairwise(keys)):
        raise Malformed("mandatory: keys not strictly increasing")
    if KEY_MANDATORY in keys or any(k not in values for k in keys):
        raise Malformed("mandatory: lists itself or a key the record lacks")


def without_hints(record: Svcb) -> Svcb:
    """The record with ``ipv4hint`` and ``ipv6hint`` removed, also from ``mandatory`` (a mandatory
    list left empty goes too: RFC 9460 does not allow an empty one)."""
    params: list[tuple[int, bytes]] = []
    for key, value in record.params:
        if key in HINTS:
            continue
        if key == KEY_MANDATORY:
            keys = [value[i:i + 2] for i in range(0, len(value), 2)]
            value = b"".join(k for k in keys if _U16.unpack(k)[0] not in HINTS)
            if not value:
                continue
        params.append((key, value))
    return Svcb(record.priority, record.target, tuple(params))


def encode(record: Svcb) -> bytes:
    """RDATA of ``record`` (params written in the order held: parse keeps them increasing)."""
    out = bytearray(_U16.pack(record.priority))
    out += record.target
    for key, value in record.params:
        out += struct.pack("!HH", key, len(value))
        out += value
    return bytes(out)
