"""The answer policy, called directly (pure)."""

from __future__ import annotations

import ipaddress

import dns.message
import dns.rcode

from appconnector.dns import wire
from appconnector.dns.policy import Action, AnswerPolicy, DomainAllowList, Resolution, classify

POOL = [ipaddress.ip_network("100.64.1.0/24")]
IGNORE = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("10.0.0.0/8")]


def test_classify_follows_design_section_4() -> None:
    assert classify(Resolution("failure"), POOL, IGNORE) is Action.FAILURE
    assert classify(Resolution("nxdomain", ttl=60), POOL, IGNORE) is Action.NXDOMAIN
    assert classify(Resolution("nodata", ttl=60), POOL, IGNORE) is Action.NODATA
    assert classify(Resolution("ok", ("8.8.8.8",), 60), POOL, IGNORE) is Action.CHECKOUT
    # upstream natc TestIgnoreDestination: one address inside is enough
    assert classify(Resolution("ok", ("8.8.8.8", "10.1.2.3"), 60), POOL, IGNORE) is Action.PASS_THROUGH
    assert classify(Resolution("ok", ("10.0.0.1", "198.51.100.5"), 60), POOL, IGNORE) is Action.PASS_THROUGH
    assert classify(Resolution("ok", ("100.64.1.9",), 60), POOL, IGNORE) is Action.LOOP


def test_allow_list_wildcards_cover_names_below_only() -> None:
    allow = DomainAllowList(["github.com", "*.Example.com."])
    assert allow.allows("github.com") and not allow.allows("api.github.com")
    assert allow.allows("a.example.com") and allow.allows("a.b.example.com")
    assert not allow.allows("example.com") and not allow.allows("badexample.com")
    assert DomainAllowList([]).allows("anything.at.all")


def _q(rdtype: str = "A", **kw: object) -> wire.Query:
    return wire.parse_query(dns.message.make_query("app.example", rdtype, **kw).to_wire())  # type: ignore[arg-type]


def test_precheck_order_and_rcodes() -> None:
    policy = AnswerPolicy(ttl=120)
    assert policy.precheck(_q()) is None
    assert policy.precheck(_q(use_edns=1)).rcode == wire.BADVERS  # type: ignore[union-attr]
    assert policy.precheck(_q(rdclass="CH")).rcode == wire.REFUSED  # type: ignore[union-attr]
    status = dns.message.make_query("app.example", "A")
    status.set_opcode(2)
    assert policy.precheck(wire.parse_query(status.to_wire())).rcode == wire.NOTIMP  # type: ignore[union-attr]


def test_negative_answers_carry_soa_with_the_smaller_ttl() -> None:
    policy = AnswerPolicy(ttl=120)
    q = _q()
    for reply, rcode in ((policy.nxdomain(q.qname, 30), dns.rcode.NXDOMAIN), (policy.nodata(600), dns.rcode.NOERROR)):
        m = dns.message.from_wire(wire.encode_response(q, reply.rcode, reply.answers, reply.authority))
        assert m.rcode() == rcode and not m.answer
        soa = m.authority[0]
        assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == soa[0].minimum == (30 if rcode else 120)
        # NXDOMAIN: the SOA sits above the missing name; NODATA: at the (existing) name
        assert str(soa.name) == ("example." if rcode else "app.example.")


def test_nxdomain_soa_of_a_single_label_name_is_the_root() -> None:
    q = wire.parse_query(dns.message.make_query("localhost", "A").to_wire())
    reply = AnswerPolicy(ttl=120).nxdomain(q.qname, 30)
    m = dns.message.from_wire(wire.encode_response(q, reply.rcode, reply.answers, reply.authority))
    assert str(m.authority[0].name) == "."


def test_real_records_never_nxdomain_for_aaaa_of_a_name_with_a() -> None:
    policy = AnswerPolicy(ttl=120)
    assert policy.real_records(wire.TYPE_AAAA, Resolution("nodata", ttl=5)).rcode == wire.NOERROR
    assert policy.real_records(wire.TYPE_AAAA, Resolution("failure")).rcode == wire.SERVFAIL
    reply = policy.real_records(wire.TYPE_A, Resolution("ok", ("198.51.100.7",), 30))
    m = dns.message.from_wire(wire.encode_response(_q(), reply.rcode, reply.answers))
    assert m.answer[0][0].address == "198.51.100.7" and m.answer[0].ttl == 30
