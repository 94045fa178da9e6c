"""HTTPS (65) / SVCB (64) records: the pure RDATA codec against dnspython, and the service end to end
(dnspython and kdig as clients, Unbound serving HTTPS records as the upstream; a dnslib stub for
malformed data). A steered name's records pass without ipv4hint/ipv6hint, only with a target that is
"." or a name we steer; anything else is NODATA, as before."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator

import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from appconnector.dns import svcb
from appconnector.metrics import REGISTRY
from tests.dns.conftest import Running, StubUpstream, Unbound, make_config

HTTPS, SVCB = dns.rdatatype.HTTPS, dns.rdatatype.SVCB


def rdata(text: str, rdtype: dns.rdatatype.RdataType = HTTPS) -> bytes:
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text).to_wire()


def plain(text: str) -> str:
    """dnspython's presentation of SVCB params without its quotes (as kdig prints them)."""
    return text.replace('"', "")


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# ---- the codec ------------------------------------------------------------------------------------


def test_parse_encode_round_trip_and_hints_removed() -> None:
    raw = rdata("1 svc.example. mandatory=alpn,ipv4hint alpn=h3,h2 port=8443 ipv4hint=192.0.2.1,192.0.2.2 "
                "ech=AAT+DQAA ipv6hint=2001:db8::1 key65000=abc")
    rec = svcb.parse(raw)
    assert rec.priority == 1 and rec.target == b"\x03svc\x07example\x00"
    assert svcb.encode(rec) == raw
    stripped = dns.rdata.from_wire(dns.rdataclass.IN, HTTPS, svcb.encode(svcb.without_hints(rec)), 0,
                                   len(svcb.encode(svcb.without_hints(rec))))
    assert plain(stripped.to_text()) == "1 svc.example. mandatory=alpn alpn=h3,h2 port=8443 ech=AAT+DQAA key65000=abc"
    # mandatory listing only hints goes with them (an empty mandatory is not allowed)
    only = svcb.without_hints(svcb.parse(rdata("1 . mandatory=ipv6hint ipv6hint=2001:db8::1")))
    assert only.params == () and svcb.encode(only) == rdata("1 .")


@pytest.mark.parametrize("raw, why", [
    (b"", "empty"),
    (b"\x00\x01", "no target"),
    (b"\x00\x01\x03ab", "target runs past the end"),
    (b"\x00\x01\xc0\x0c", "compressed target"),
    (b"\x00\x01\x00\x00\x03", "half a param header"),
    (b"\x00\x01\x00\x00\x03\x00\x03\x01\xbb", "param value runs past the end"),
    (b"\x00\x01\x00\x00\x03\x00\x02\x01\xbb\x00\x01\x00\x03\x02h2", "keys decreasing"),
    (b"\x00\x01\x00\x00\x03\x00\x02\x01\xbb\x00\x03\x00\x02\x01\xbb", "key repeated"),
    (b"\x00\x01\x00\x00\x03\x00\x03\x01\xbb\x00", "port of three bytes"),
    (b"\x00\x01\x00\x00\x04\x00\x03\x01\x02\x03", "ipv4hint not a multiple of 4"),
    (b"\x00\x01\x00\x00\x06\x00\x04\x01\x02\x03\x04", "ipv6hint not a multiple of 16"),
    (b"\x00\x01\x00\x00\x01\x00\x03\x05h2", "alpn id runs past the value"),
    (b"\x00\x01\x00\x00\x00\x00\x02\x00\x03", "mandatory names a key the record lacks"),
    (b"\x00\x01\x00\x00\x00\x00\x00", "empty mandatory"),
    (b"\x00\x01\x00\xff\xff\x00\x00", "key 65535"),
    (b"\x00\x01" + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x3f" + b"a" * 63 + b"\x00",
     "target longer than 255 bytes"),
])
def test_malformed_rdata_is_refused_not_crashed(raw: bytes, why: str) -> None:
    with pytest.raises(svcb.Malformed):
        svcb.parse(raw)


# ---- the service ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(unbound: Unbound) -> Iterator[Running]:
    r = Running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]))
    yield r
    r.close()


def records(m: dns.message.Message, rdtype: dns.rdatatype.RdataType = HTTPS) -> list[str]:
    return sorted(plain(rr.to_text()) for rrset in m.answer if rrset.rdtype == rdtype for rr in rrset)


def is_nodata_with_soa(m: dns.message.Message) -> bool:
    return (m.rcode() == dns.rcode.NOERROR and not m.answer
            and [rrset.rdtype for rrset in m.authority] == [dns.rdatatype.SOA])


def test_https_of_a_steered_name_passes_without_hints(svc: Running) -> None:
    passed, foreign = metric("appconnector_dns_svcb_records_total", result="passed"), \
        metric("appconnector_dns_svcb_records_total", result="foreign_target")
    m = svc.query("svc.test", "HTTPS")
    assert m.rcode() == dns.rcode.NOERROR
    # alpn, port, ech intact; the hints gone (and from mandatory); nothere.test's record left out
    assert records(m) == ["1 . alpn=h3,h2 port=8443 ech=AAT+DQAA", "2 other.test. mandatory=alpn alpn=h2"]
    assert metric("appconnector_dns_svcb_records_total", result="passed") == passed + 2
    assert metric("appconnector_dns_svcb_records_total", result="foreign_target") == foreign + 1
    assert records(svc.query("svc.test", "SVCB"), SVCB) == ["1 . port=853"]
    assert records(svc.query("svc.test", "HTTPS", tcp=True)) == records(m)


def test_https_answers_are_cached_like_other_upstream_answers(svc: Running) -> None:
    svc.query("alias2.test", "HTTPS")
    hits = metric("appconnector_dns_upstream_cache_total", result="hit")
    misses = metric("appconnector_dns_upstream_cache_total", result="miss")
    assert records(svc.query("alias2.test", "HTTPS")) == ["0 svc.test."]
    assert metric("appconnector_dns_upstream_cache_total", result="miss") == misses
    assert metric("appconnector_dns_upstream_cache_total", result="hit") > hits


def test_foreign_target_and_foreign_alias_are_nodata(svc: Running) -> None:
    assert is_nodata_with_soa(svc.query("foreign.test", "HTTPS"))   # ServiceMode towards a pass-through name
    assert is_nodata_with_soa(svc.query("alias.test", "HTTPS"))     # AliasMode towards it
    assert records(svc.query("alias2.test", "HTTPS")) == ["0 svc.test."]  # AliasMode to a name we steer


def test_names_outside_the_pool_rules_get_what_they_got_before(svc: Running, unbound: Unbound,
                                                               running: Callable[..., Running]) -> None:
    assert is_nodata_with_soa(svc.query("ignored.test", "HTTPS"))   # pool.ignore_destinations
    assert is_nodata_with_soa(svc.query("app.test", "HTTPS"))       # steered, upstream has no HTTPS
    assert svc.query("nothere.test", "HTTPS").rcode() == dns.rcode.NOERROR  # as for every non-A/AAAA type
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], dns_domains="app.test"))
    assert r.query("svc.test", "HTTPS").rcode() == dns.rcode.REFUSED  # outside dns.domains
    # inside dns.domains, but other.test is not: its record is left out
    r2 = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], dns_domains="svc.test"))
    assert records(r2.query("svc.test", "HTTPS")) == ["1 . alpn=h3,h2 port=8443 ech=AAT+DQAA"]
    # dns.verify_upstream = false never asks upstream: NODATA as before
    r3 = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], dns_verify_upstream="false"))
    assert is_nodata_with_soa(r3.query("svc.test", "HTTPS"))


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_kdig_sees_no_hints(svc: Running, transport: str) -> None:
    if shutil.which("kdig") is None:
        pytest.skip("needs kdig (apt-get install knot-dnsutils)")
    out = subprocess.run(["kdig", f"@{svc.host}", "-p", str(svc.port), transport, "+short", "svc.test", "HTTPS"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert sorted(out.split("\n")[:-1]) == ["1 . alpn=h3,h2 port=8443 ech=AAT+DQAA",
                                            "2 other.test. mandatory=alpn alpn=h2"], out
    assert "hint" not in out and "192.0.2" not in out and "2001:db8" not in out


def test_malformed_upstream_record_is_nodata_and_counted(running: Callable[..., Running]) -> None:
    stub = StubUpstream()
    try:
        r = running(make_config(upstream=[f"127.0.0.1:{stub.port}"]))
        before = metric("appconnector_dns_svcb_records_total", result="malformed")
        stub.https_rdata = b"\x00\x01\x00\x00\x04\x00\x05\xc0\x00\x02\x01\x02"  # a 5-byte ipv4hint
        assert is_nodata_with_soa(r.query("bad.example", "HTTPS"))
        assert metric("appconnector_dns_svcb_records_total", result="malformed") == before + 1
        stub.https_rdata = rdata("1 . alpn=h2 ipv4hint=192.0.2.99")
        assert records(r.query("good.example", "HTTPS")) == ["1 . alpn=h2"]  # the same service still answers
    finally:
        stub.close()
