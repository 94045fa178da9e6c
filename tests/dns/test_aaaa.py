"""AAAA with a v6 pool (``pool.prefixes6``): real packets (dnspython) against the service with Unbound
upstream. A name with real AAAA records gets the v6 mirror of the node's pool address (the same
mapping, the same offset as its A answer); a v4-only name keeps NODATA + SOA and spends nothing."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from appconnector.metrics import REGISTRY
from appconnector.pool.addresses import DualSpace
from tests.dns.conftest import POOL, Running, Unbound, make_config

CLIENT = "127.0.0.1"
POOL6 = "fd7a:115c:a1e0:a99c:1::/80"
SPACE = DualSpace([POOL], [POOL6])


def records(m: dns.message.Message, rdtype: dns.rdatatype.RdataType) -> list[str]:
    return sorted(rr.address for rrset in m.answer if rrset.rdtype == rdtype for rr in rrset)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def svc(unbound: Unbound) -> Iterator[Running]:
    r = Running(make_config(upstream=[f"127.0.0.1:{unbound.port}"], pool_prefixes6=POOL6))
    yield r
    r.close()


def v6_of(a: str) -> str:
    mirrored = SPACE.to_v6(int(ipaddress.IPv4Address(a)))
    assert mirrored is not None
    return str(ipaddress.IPv6Address(mirrored))


def test_dual_stack_name_gets_the_v6_mirror_of_its_pool_address(svc: Running) -> None:
    before = metric("appconnector_dns_aaaa_answers_total", result="v6_pool")
    m6 = svc.query("dual.test", "AAAA")
    assert m6.rcode() == dns.rcode.NOERROR
    [v6] = records(m6, dns.rdatatype.AAAA)
    assert ipaddress.IPv6Address(v6) in ipaddress.IPv6Network(POOL6)
    [v4] = records(svc.query("dual.test", "A"), dns.rdatatype.A)
    assert v6 == v6_of(v4)  # one checkout, two families: the same offset
    assert sum(1 for m in svc.pool.mappings() if m.domain == "dual.test") == 1
    # the replicated targets carry both families, so every member's kernel can steer both
    want = sorted([int(ipaddress.ip_address(a)) for a in ("192.0.2.60", "2001:db8::60", "2001:db8::61")])
    assert list(svc.pool.targets("dual.test")) == want
    assert records(svc.query("dual.test", "AAAA"), dns.rdatatype.AAAA) == [v6]  # known: same answer
    assert metric("appconnector_dns_aaaa_answers_total", result="v6_pool") == before + 2


def test_a_first_then_aaaa_gives_the_same_mapping(svc: Running) -> None:
    [v4] = records(svc.query("dual2.test", "A"), dns.rdatatype.A)
    assert records(svc.query("dual2.test", "AAAA", tcp=True), dns.rdatatype.AAAA) == [v6_of(v4)]
    assert svc.pool.targets("dual2.test")[-1] == int(ipaddress.IPv6Address("2001:db8::62"))


def test_v4_only_name_gets_nodata_for_aaaa_and_spends_no_address(svc: Running) -> None:
    before = metric("appconnector_dns_aaaa_answers_total", result="nodata")
    m = svc.query("n3.test", "AAAA")
    assert m.rcode() == dns.rcode.NOERROR and not m.answer
    assert m.authority[0].rdtype == dns.rdatatype.SOA
    assert svc.pool.lookup(CLIENT, "n3.test") is None
    assert records(svc.query("n3.test", "A"), dns.rdatatype.A)
    m = svc.query("n3.test", "AAAA")  # mapped now: still NODATA, its targets have no IPv6
    assert m.rcode() == dns.rcode.NOERROR and not m.answer and m.authority[0].rdtype == dns.rdatatype.SOA
    assert all(t <= 0xFFFFFFFF for t in svc.pool.targets("n3.test"))
    assert metric("appconnector_dns_aaaa_answers_total", result="nodata") == before + 2


def test_aaaa_upstream_inside_the_v6_pool_is_a_loop(svc: Running) -> None:
    before = metric("appconnector_dns_loops_total")
    assert svc.query("loop6.test", "AAAA").rcode() == dns.rcode.SERVFAIL
    assert metric("appconnector_dns_loops_total") == before + 1
    assert svc.pool.lookup(CLIENT, "loop6.test") is None


def test_without_prefixes6_aaaa_stays_nodata(unbound: Unbound, running: Callable[..., Running]) -> None:
    r = running(make_config(upstream=[f"127.0.0.1:{unbound.port}"]))
    m = r.query("dual.test", "AAAA")
    assert m.rcode() == dns.rcode.NOERROR and not m.answer and m.authority[0].rdtype == dns.rdatatype.SOA
    assert r.pool.lookup(CLIENT, "dual.test") is None
