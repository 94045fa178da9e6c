"""The pure half of v6 steering (pool.prefixes6): table shape, element batches per family, the model's
v6 elements for a node's tailnet IPv6, the derivation v4 offset ↔ v6 address, and the replicated
v6 targets (state, snapshot). No root, no kernel."""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import pytest

from appconnector.config import ConfigError, load
from appconnector.nat import render
from appconnector.nat.render import SteerModel, TableSpec
from appconnector.pool.addresses import DualSpace
from appconnector.pool.api import Changes
from appconnector.pool.state import InvalidCommand, PoolState


def ip(t: str) -> int:
    return int(ipaddress.ip_address(t))


POOL, POOL6 = "100.64.1.0/24", "fd7a:115c:a1e0:a99c:1::/80"
SPACE = DualSpace([POOL], [POOL6])
N4, N6 = "100.101.0.2", "fd7a:115c:a1e0::2"
P1 = ip("100.64.1.1")
R4, R6, R6B = ip("198.51.100.10"), ip("2001:db8::10"), ip("2001:db8::11")


def test_derivation_is_the_v4_offset_in_the_v6_pool_both_ways() -> None:
    assert SPACE.to_v6(P1) == ip("fd7a:115c:a1e0:a99c:1::1")
    assert SPACE.to_v6(ip("100.64.1.255")) == ip("fd7a:115c:a1e0:a99c:1::ff")
    assert SPACE.to_v4(ip("fd7a:115c:a1e0:a99c:1::ff")) == ip("100.64.1.255")
    assert SPACE.to_v4(ip("fd7a:115c:a1e0:a99c:1::100")) is None  # beyond the v4 pool: mirrors nothing
    assert SPACE.to_v6(ip("100.64.2.1")) is None and DualSpace([POOL], []).to_v6(P1) is None
    two = DualSpace(["100.64.1.0/24", "100.64.9.0/24"], ["fd00::/120", "fd00:1::/120"])
    assert two.to_v6(ip("100.64.9.3")) == ip("fd00:1::3")  # offset 259 falls in the second v6 prefix


@pytest.mark.parametrize(("prefixes6", "why"), [
    ("fd00::/121", "at least as many addresses as pool.prefixes"),
    ("10.0.0.0/8", "IPv6 prefixes only"),
    ("fd00::1/64", "IPv6 prefixes such as"),
    ("::ffff:0:0/100", "prefixes outside ::ffff:0:0/96"),
])
def test_prefixes6_errors_name_the_key(prefixes6: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"pool\.prefixes6") as e:
        load(None, env={"APPCONNECTOR_POOL_PREFIXES": POOL, "APPCONNECTOR_POOL_PREFIXES6": prefixes6})
    assert why in str(e.value)


def test_prefixes6_default_off_and_env_override() -> None:
    assert load(None, env={}).pool.prefixes6 == ()
    assert load(None, env={"APPCONNECTOR_POOL_PREFIXES6": POOL6}).pool.prefixes6 == (POOL6,)


def test_table_has_v6_objects_and_rules_only_with_a_v6_pool() -> None:
    v4, v6 = ipaddress.IPv4Network(POOL), ipaddress.IPv6Network(POOL6)
    plain = render.table_commands(TableSpec(interface="tailscale0", pool=(v4,), max_mappings=10))
    assert "ip6" not in repr(plain) and "steer6" not in repr(plain)
    cmds = render.table_commands(TableSpec(interface="tailscale0", pool=(v4,), max_mappings=10, pool6=(v6,)))
    objs = [c["add"] for c in cmds if "add" in c]
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}
    maps = {o["map"]["name"]: o["map"] for o in objs if "map" in o}
    assert maps["steer6"]["type"] == ["ipv6_addr", "ipv6_addr"] and maps["steer6"]["map"] == "ipv6_addr"
    assert sets["pool6"]["elem"] == [{"prefix": {"addr": "fd7a:115c:a1e0:a99c:1::", "len": 80}}]
    assert sets["seen6"]["flags"] == ["timeout"]
    rules: dict[str, list[str]] = {}
    for o in objs:
        if "rule" in o:
            rules.setdefault(o["rule"]["chain"], []).append(repr(o["rule"]["expr"]))
    assert any("'ip6'" in r and "@steer6" in r and "'dnat'" in r for r in rules["steer"])
    assert any("'ip6'" in r and "@seen6" in r for r in rules["seen"])
    assert any("ip6 daddr" in r and "@pool6" in r and "masquerade" in r for r in rules["masquerade"])
    v6_unmapped = [r for r in rules["unmapped"] if "@pool6" in r]
    assert any("tcp reset" in r for r in v6_unmapped) and any("icmpx" in r for r in v6_unmapped)
    assert any("'drop'" in r for r in v6_unmapped)


def test_element_commands_put_each_family_in_its_own_map() -> None:
    k4, k6 = (ip(N4), P1), (ip(N6), SPACE.to_v6(P1) or 0)
    cmds = render.element_commands(add={k4: R4, k6: R6}, remove=[k6])
    names = [(verb, body["element"]["name"]) for c in cmds for verb, body in c.items()]
    assert names == [("delete", "steer6"), ("add", "steer"), ("add", "steer6")]
    assert cmds[2]["add"]["element"]["elem"] == [[{"concat": [N6, "fd7a:115c:a1e0:a99c:1::1"]}, "2001:db8::10"]]


def test_model_steers_the_nodes_ipv6_to_the_domains_ipv6() -> None:
    model = SteerModel(SPACE)
    model.set_node_ips({"n": [N4, N6]})
    delta = model.apply(Changes(added=[("n", P1, "dual.test")], targets={"dual.test": (R4, R6, R6B)}))
    p6 = SPACE.to_v6(P1)
    assert p6 is not None
    assert delta.added[(ip(N4), P1)] == R4
    assert delta.added[(ip(N6), p6)] in (R6, R6B) and len(delta.added) == 2
    assert model.count6() == 1 and model.node_for_ip(ip(N6)) == "n"
    assert sorted(model.flow_keys("n", P1)) == sorted([(ip(N4), P1), (ip(N6), p6)])
    # a v4-only domain: no v6 element; the node's IPv6 pool traffic is then rejected as unmapped
    delta = model.apply(Changes(targets={"dual.test": (R4,)}))
    assert delta.removed == [(ip(N6), p6)] and model.count6() == 0
    assert model.reset([], {}) == {} and model.count6() == 0


def test_without_a_v6_pool_a_nodes_ipv6_gets_nothing() -> None:
    model = SteerModel()
    model.set_node_ips({"n": [N4, N6]})
    delta = model.apply(Changes(added=[("n", P1, "d")], targets={"d": (R4, R6)}))
    assert delta.added == {(ip(N4), P1): R4}


def test_state_replicates_v6_targets_through_its_snapshot() -> None:
    st = PoolState([POOL])
    st.checkout_batch([("n", "dual.test", (R6, R4, R6), 60.0)], 1000.0, 0.0)
    assert st.targets("dual.test") == (R4, R6)  # sorted, de-duplicated, IPv4 first
    st.set_targets("dual.test", (R6B, R4), 60.0, 1001.0)
    copy = PoolState.from_bytes(st.to_bytes(), [POOL])
    assert copy.targets("dual.test") == (R4, R6B) and copy.digest() == st.digest()
    assert copy.lookup("n", "dual.test") == st.lookup("n", "dual.test")


@pytest.mark.parametrize("junk", [(1 << 128,), (-1,), ("2001:db8::1",), (True,), (1.5,)])
def test_state_refuses_junk_targets_without_raising_from_apply(junk: tuple[object, ...]) -> None:
    st = PoolState([POOL])
    st.checkout_batch([("n", "d", (R4,), 60.0)], 1000.0, 0.0)
    before = st.digest()
    result, _ = st.apply(("set_targets", "d", junk, 60.0, 1000.0))
    assert isinstance(result, InvalidCommand) and st.digest() == before


def test_state_reads_a_version_2_snapshot() -> None:
    st = PoolState([POOL])
    st.checkout_batch([("n", "d", (R4,), 60.0)], 1000.0, 0.0)
    data = st.to_bytes()[:-32]
    # version 2 is version 3 without the IPv6 count after each target entry's IPv4 array: here one
    # entry holding one address (count 1, then the address), followed by a zero count to drop
    entry = struct.pack("<I", 1) + struct.pack("<I", R4)
    i = data.index(entry) + len(entry)
    assert data[i:i + 4] == bytes(4)
    body = bytearray(data[:i] + data[i + 4:])
    body[6:8] = struct.pack("<H", 2)
    restored = PoolState.from_bytes(bytes(body) + hashlib.sha256(body).digest(), [POOL])
    assert restored.targets("d") == (R4,) and restored.lookup("n", "d") == st.lookup("n", "d")
    assert restored.digest() == st.digest()  # written back as version 3, the same state


def test_element_text_survives_pysyncobj_import() -> None:
    """pysyncobj (tcp_connection → win_inet_pton) replaces socket.inet_ntop with a Windows-only stub on
    every platform; v6 element text must not depend on it (found by the product's v6 e2e test)."""
    import pysyncobj.tcp_connection  # noqa: F401  (the import is the point)

    cmds = render.element_commands(add={(ip(N6), SPACE.to_v6(P1) or 0): R6})
    assert cmds[0]["add"]["element"]["elem"] == [[{"concat": [N6, "fd7a:115c:a1e0:a99c:1::1"]}, "2001:db8::10"]]
