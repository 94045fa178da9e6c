"""Domain normalisation and the pool's address space (the pieces PoolState builds on)."""

from __future__ import annotations

import ipaddress

import pytest

from appconnector.pool.addresses import AddressSpace
from appconnector.pool.names import normalise_domain


@pytest.mark.parametrize(("name", "want"), [
    ("GitHub.COM.", "github.com"), ("github.com", "github.com"), ("a", "a"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("_sip._tcp.Example.org", "_sip._tcp.example.org"), ("a" * 63 + ".com", "a" * 63 + ".com"),
    (".".join(["a" * 62] * 4) + "a", ".".join(["a" * 62] * 4) + "a"),  # 252 characters
])
def test_valid_names_are_lower_cased_without_the_trailing_dot(name: str, want: str) -> None:
    assert normalise_domain(name) == want


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"), (".", "empty"), ("a..b", "empty label"), ("github.com..", "empty label"),
    (".github.com", "empty label"), ("a" * 64 + ".com", "63"), ("a." * 127 + "ab", "253"),
    ("git hub.com", "no spaces"), ("bücher.de", "printable ASCII"), ("a\x00b", "printable ASCII"),
    (b"github.com", "text"), (None, "text"),
])
def test_invalid_names_say_why(name: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        normalise_domain(name)  # type: ignore[arg-type]


def test_only_ascii_letters_are_lowered() -> None:
    # DNS compares case-insensitively in ASCII only (RFC 4343); other bytes are refused anyway
    assert normalise_domain("ABC-XYZ.Example") == "abc-xyz.example"


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def test_offsets_run_across_prefixes_in_address_order() -> None:
    space = AddressSpace(["10.0.2.0/31", "10.0.0.0/30", "10.0.5.7/32"])
    assert space.prefixes == ("10.0.0.0/30", "10.0.2.0/31", "10.0.5.7/32")
    assert space.size == 7 and space.usable == 6 and space.dns_address == ip("10.0.0.0")
    addrs = ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.2.0", "10.0.2.1", "10.0.5.7"]
    for offset, a in enumerate(addrs):
        assert space.address(offset) == ip(a) and space.offset(ip(a)) == offset
    for outside in ["9.255.255.255", "10.0.0.4", "10.0.1.255", "10.0.2.2", "10.0.5.6", "10.0.5.8"]:
        assert space.offset(ip(outside)) is None and ip(outside) not in space
    with pytest.raises(IndexError):
        space.address(7)
    with pytest.raises(IndexError):
        space.address(-1)


def test_large_pools_map_both_ways() -> None:
    space = AddressSpace(["100.64.0.0/10"])
    assert space.size == 1 << 22
    assert space.address(space.size - 1) == ip("100.127.255.255")
    assert space.offset(ip("100.100.100.100")) == ip("100.100.100.100") - ip("100.64.0.0")


@pytest.mark.parametrize(("prefixes", "why"), [
    ([], "at least one"), (["10.0.0.1/24"], "pool.prefixes"), (["fd00::/64"], "IPv4"),
    (["10.0.0.0/24", "10.0.0.128/25"], "overlap"), (["10.0.0.1/32"], "at least two"), (["nonsense"], "pool.prefixes"),
])
def test_bad_pools_are_refused_with_a_reason(prefixes: list[str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        AddressSpace(prefixes)


def test_equal_pools_compare_equal_whatever_the_order() -> None:
    assert AddressSpace(["10.0.1.0/24", "10.0.0.0/24"]) == AddressSpace(["10.0.0.0/24", "10.0.1.0/24"])
    assert AddressSpace(["10.0.0.0/24"]) != AddressSpace(["10.0.0.0/25"])
