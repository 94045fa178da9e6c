"""Fuzz target for the SVCB/HTTPS RDATA codec (``appconnector/dns/svcb.py``).

Properties, for any bytes at all:
  * ``svcb.parse`` raises nothing but ``svcb.Malformed``;
  * what it accepts encodes back to the same bytes, and, where dnspython (an independent codec) reads
    the same RDATA, both see the same priority, target name and param keys, with the same values for
    the keys dnspython keeps opaque or that we pass on untouched;
  * ``without_hints`` of an accepted record is accepted again, has no ipv4hint/ipv6hint (nor in
    mandatory), keeps every other param byte for byte, and dnspython still reads it when it read the
    original (a client must not be handed a record it cannot parse);
  * the HTTPS answer built from it (``AnswerPolicy.service_bindings``) parses with dnspython.

In the test suite (``test_fuzz_svcb.py``) hypothesis runs a bounded number of examples; set
``APPCONNECTOR_LONG=1`` for a long run. For millions of inputs run the mutation fuzzer:

    .venv/bin/python -m tests.dns.fuzz_svcb --iterations 2000000 [--seed N]
"""

from __future__ import annotations

import io
import sys

import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from appconnector.dns import svcb, wire
from appconnector.dns.policy import AnswerPolicy
from tests.dns.fuzz_wire import run

POLICY = AnswerPolicy(ttl=120)
QUERY = wire.parse_query(dns.message.make_query("svc.example", "HTTPS", use_edns=0).to_wire())


def _rdata(text: str, rdtype: str = "HTTPS") -> bytes:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text).to_wire()


SEEDS = [
    _rdata("1 . alpn=h3,h2 port=8443 ipv4hint=192.0.2.1,192.0.2.2 ech=AAT+DQAA ipv6hint=2001:db8::1"),
    _rdata("2 svc.example. mandatory=alpn,ipv4hint alpn=h2 ipv4hint=192.0.2.3"),
    _rdata("1 . mandatory=ipv6hint no-default-alpn alpn=h2 ipv6hint=2001:db8::2,2001:db8::3 key65000=abc"),
    _rdata("0 alias.example."),
    _rdata("0 ."),
    _rdata("16 x.y.example. port=53 key7=/dns-query{?dns}", "SVCB"),
]


def _theirs(data: bytes) -> dns.rdata.Rdata | None:
    try:
        return dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.HTTPS, data, 0, len(data))
    except Exception:  # dnspython raises FormError, but also ValueError/struct errors on garbage
        return None


def _param_wire(rd: dns.rdata.Rdata, key: int) -> bytes:
    """dnspython's encoding of one param value (to compare with ours byte for byte)."""
    param = rd.params[key]  # type: ignore[attr-defined]
    if param is None:  # a key without a value (no-default-alpn)
        return b""
    buf = io.BytesIO()
    param.to_wire(buf)
    return buf.getvalue()


def check(data: bytes) -> None:
    """Raise AssertionError when a property above fails for ``data``."""
    where = f"rdata {data.hex()}"
    try:
        ours = svcb.parse(data)
    except svcb.Malformed:
        return
    assert svcb.encode(ours) == data, f"does not encode back: {where}"
    theirs = _theirs(data)
    if theirs is not None:
        assert theirs.priority == ours.priority, f"priority: {where}"  # type: ignore[attr-defined]
        assert theirs.target.to_wire() == ours.target, f"target: {where}"  # type: ignore[attr-defined]
        keys = sorted(int(k) for k in theirs.params)  # type: ignore[attr-defined]
        assert keys == [k for k, _ in ours.params], f"param keys {keys}: {where}"
        for key, value in ours.params:
            assert _param_wire(theirs, key) == value, f"param {key} value: {where}"
    stripped = svcb.without_hints(ours)
    again = svcb.parse(svcb.encode(stripped))  # raises Malformed (a failed property) if we broke it
    assert again == stripped, f"stripped record reads back differently: {where}"
    kept = [(k, v) for k, v in ours.params if k not in svcb.HINTS and k != svcb.KEY_MANDATORY]
    assert [(k, v) for k, v in stripped.params if k != svcb.KEY_MANDATORY] == kept, f"params lost: {where}"
    for key, value in stripped.params:
        assert key not in svcb.HINTS, f"a hint survived: {where}"
        if key == svcb.KEY_MANDATORY:
            listed = {int.from_bytes(value[i:i + 2], "big") for i in range(0, len(value), 2)}
            assert not listed & svcb.HINTS, f"mandatory still lists a hint: {where}"
    if theirs is not None:
        out = svcb.encode(stripped)
        assert _theirs(out) is not None, f"dnspython reads the original but not ours: {where} → {out.hex()}"
        reply = POLICY.service_bindings(svcb.TYPE_HTTPS, [ours], 300)
        answer = wire.encode_response(QUERY, reply.rcode, reply.answers, reply.authority)
        try:
            m = dns.message.from_wire(answer)
        except dns.exception.DNSException as e:
            raise AssertionError(f"dnspython cannot read our HTTPS answer for {where}: {e!r}") from e
        [rrset] = m.answer
        assert rrset.name == dns.name.from_text("svc.example") and rrset.ttl == POLICY.ttl, f"answer: {where}"


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, SEEDS, check, max_random=40)


if __name__ == "__main__":
    sys.exit(main())
