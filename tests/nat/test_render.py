"""The pure half of NAT: the desired steer map, its JSON, touches and target refresh (no root, no kernel)."""

from __future__ import annotations

import asyncio
import collections
import ipaddress
from collections.abc import Sequence

import pytest

from appconnector.nat import render
from appconnector.nat.render import Delta, SteerModel, TableSpec, pick_target
from appconnector.nat.seen import PoolRanges, touches
from appconnector.nat.targets import TargetRefresher
from appconnector.pool.addresses import format_address
from appconnector.pool.api import Changes, MappingView
from appconnector.pool.local import LocalPool


def ip(t: str) -> int:
    return int(ipaddress.IPv4Address(t))


N1, N2 = "100.101.0.2", "100.101.0.3"
P1, P2 = ip("100.64.1.1"), ip("100.64.1.2")
R1, R2, R3 = ip("198.51.100.10"), ip("198.51.100.20"), ip("198.51.100.30")


def test_table_is_sized_from_config_and_keeps_seen_out_of_the_steering_rule() -> None:
    pool = (ipaddress.IPv4Network("100.64.1.0/24"), ipaddress.IPv4Network("100.64.9.0/24"))
    spec = TableSpec(interface="tailscale0", pool=pool, max_mappings=123456)
    cmds = render.table_commands(spec)
    objs = [c["add"] for c in cmds if "add" in c]
    sets = {o["set"]["name"]: o["set"] for o in objs if "set" in o}
    maps = {o["map"]["name"]: o["map"] for o in objs if "map" in o}
    assert maps["steer"]["size"] == 123456 and sets["seen"]["size"] == 123456
    assert maps["steer"]["type"] == ["ipv4_addr", "ipv4_addr"] and maps["steer"]["map"] == "ipv4_addr"
    assert [e["prefix"]["addr"] for e in sets["pool"]["elem"]] == ["100.64.1.0", "100.64.9.0"]
    rules = collections.defaultdict(list)
    for o in objs:
        if "rule" in o:
            rules[o["rule"]["chain"]].append(o["rule"]["expr"])
    # the seen update lives alone in its own chain: a full set cannot stop the DNAT
    assert len(rules["seen"]) == 1 and any("set" in e for e in rules["seen"][0])
    assert not any("set" in e for e in rules["steer"][0]) and any("dnat" in e for e in rules["steer"][0])
    masq = rules["masquerade"][0]
    assert {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}} in masq
    assert any(e.get("match", {}).get("right") == "@pool" and "ct" in e["match"]["left"] for e in masq)
    tcp, other, drop = rules["unmapped"]
    assert {"drop": None} in drop and {"counter": "unmapped"} in drop
    for r in (tcp, other, drop):
        assert any(e.get("match", {}).get("right") == "100.64.1.0" for e in r), "the DNS address is exempt"
    # only our table, replaced in the same transaction
    assert cmds[:3] == [{"add": {"table": {"family": "inet", "name": "appconnector"}}},
                        {"delete": {"table": {"family": "inet", "name": "appconnector"}}},
                        {"add": {"table": {"family": "inet", "name": "appconnector"}}}]


def test_unmapped_traffic_is_rejected_within_a_shared_limit_then_dropped() -> None:
    spec = TableSpec(interface="tailscale0", pool=(ipaddress.IPv4Network("100.64.1.0/24"),), max_mappings=16,
                     reject_rate=7, reject_burst=9)
    objs = [c["add"] for c in render.table_commands(spec) if "add" in c]
    limits = [o["limit"] for o in objs if "limit" in o]
    assert [(x["name"], x["rate"], x["per"], x["burst"], x["unit"]) for x in limits] == \
        [("reject_rate", 7, "second", 9, "packets")]
    assert {o["counter"]["name"] for o in objs if "counter" in o} == {"unmapped", "unmapped_rejected"}
    tcp, other, drop = [o["rule"]["expr"] for o in objs if "rule" in o and o["rule"]["chain"] == "unmapped"]
    l4tcp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}
    # TCP gets a reset, everything else (UDP, ICMP, both families) ICMP admin-prohibited; the limit
    # comes before the counter and the verdict, so a packet over the limit falls through to the drop
    assert l4tcp in tcp and tcp[-3:] == [{"limit": "reject_rate"}, {"counter": "unmapped_rejected"},
                                         {"reject": {"type": "tcp reset"}}]
    assert l4tcp not in other and other[-3:] == [{"limit": "reject_rate"}, {"counter": "unmapped_rejected"},
                                                 {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]
    assert not any("limit" in e for e in drop) and drop[-2:] == [{"counter": "unmapped"}, {"drop": None}]


def test_element_commands_delete_before_add_and_batch() -> None:
    cmds = render.element_commands(add={(1, 2): 3, (4, 5): 6, (7, 8): 9}, remove=[(1, 2)], chunk=2)
    assert [next(iter(c)) for c in cmds] == ["delete", "add", "add"]
    assert cmds[0]["delete"]["element"]["elem"] == [{"concat": ["0.0.0.1", "0.0.0.2"]}]
    assert cmds[1]["add"]["element"]["elem"][0] == [{"concat": ["0.0.0.1", "0.0.0.2"]}, "0.0.0.3"]
    assert len(cmds[2]["add"]["element"]["elem"]) == 1


def test_parse_counter_output() -> None:
    listing = [{"counter": {"name": "unmapped", "packets": 7, "bytes": 420}},
               {"counter": {"name": "unmapped_rejected", "packets": 3, "bytes": 180}}]
    assert render.parse_counter(listing, "unmapped") == 7
    assert render.parse_counter(listing, "unmapped_rejected") == 3
    assert render.parse_counter([], "unmapped") == 0


def test_pick_target_is_deterministic_spreads_and_moves_few_nodes() -> None:
    nodes = [f"n{i}" for i in range(3000)]
    two = {n: pick_target(n, (R1, R2)) for n in nodes}
    assert two == {n: pick_target(n, (R1, R2)) for n in nodes}
    counts = collections.Counter(two.values())
    assert min(counts.values()) > 1200, counts
    three = {n: pick_target(n, (R1, R2, R3)) for n in nodes}
    moved = [n for n in nodes if three[n] != two[n]]
    assert all(three[n] == R3 for n in moved), "adding a target only moves nodes onto it"
    assert 700 < len(moved) < 1300
    assert pick_target("x", ()) is None and pick_target("x", (R1,)) == R1


def test_model_mirrors_checkouts_removals_and_targets() -> None:
    m = SteerModel()
    d = m.apply(Changes(added=[(N1, P1, "a.example")], targets={"a.example": (R1,)}))
    assert d.added == {(ip(N1), P1): R1} and d.removed == []
    assert m.installed(N1, P1) and m.node_for_ip(ip(N1)) == N1
    # a mapping whose domain has no targets yet has no element
    d = m.apply(Changes(added=[(N2, P1, "b.example")]))
    assert not d and not m.installed(N2, P1)
    d = m.apply(Changes(targets={"b.example": (R2,)}))
    assert d.added == {(ip(N2), P1): R2}
    # a changed target is a delete plus an add of the same key (the kernel will not overwrite data)
    d = m.apply(Changes(targets={"a.example": (R3,)}))
    assert d.removed == [(ip(N1), P1)] and d.added == {(ip(N1), P1): R3}
    # reassignment of an address to another domain
    d = m.apply(Changes(removed=[(N1, P1, "a.example")], added=[(N1, P1, "b.example")]))
    assert d.removed == [(ip(N1), P1)] and d.added == {(ip(N1), P1): R2}
    d = m.apply(Changes(removed=[(N1, P1, "b.example"), (N2, P1, "b.example")]))
    assert sorted(d.removed) == sorted([(ip(N1), P1), (ip(N2), P1)]) and len(m) == 0
    assert m.domains() == []


def test_model_uses_directory_ips_and_follows_their_changes() -> None:
    m = SteerModel()
    m.set_node_ips({"nodeA": ["100.101.0.7"]})
    m.apply(Changes(added=[("nodeA", P1, "a.example"), ("nodeB", P1, "a.example")], targets={"a.example": (R1,)}))
    assert m.elements() == {(ip("100.101.0.7"), P1): R1}, "nodeB is unknown and not an IP: no element yet"
    d = m.set_node_ips({"nodeA": ["100.101.0.8"], "nodeB": ["100.101.0.9"]})
    assert d.removed == [(ip("100.101.0.7"), P1)]
    assert d.added == {(ip("100.101.0.8"), P1): R1, (ip("100.101.0.9"), P1): R1}
    assert m.node_for_ip(ip("100.101.0.9")) == "nodeB"


def test_reset_rebuilds_everything() -> None:
    m = SteerModel()
    m.apply(Changes(added=[(N1, P2, "old.example")], targets={"old.example": (R1,)}))
    full = m.reset([MappingView(N1, "a.example", P1, 0.0), MappingView(N2, "a.example", P1, 0.0)],
                   {"a.example": (R2,)})
    assert full == {(ip(N1), P1): R2, (ip(N2), P1): R2}
    assert not m.installed(N1, P2)
    assert Delta() == Delta() and not Delta()


def test_pool_ranges() -> None:
    r = PoolRanges([ipaddress.IPv4Network("100.64.9.0/24"), ipaddress.IPv4Network("100.64.1.0/30")])
    assert ip("100.64.1.3") in r and ip("100.64.1.4") not in r and ip("100.64.9.255") in r
    assert ip("100.64.8.255") not in r


def test_touches_mark_each_pair_once_and_only_when_stale() -> None:
    async def run() -> None:
        now = [1000.0]
        pool = LocalPool(["100.64.1.0/24"], clock=lambda: now[0])
        await pool.start()
        a = await pool.checkout(N1, "a.example", (R1,), 60)
        now[0] = 1250.0
        pairs = [(ip(N1), a)] * 50 + [(ip(N2), a), (ip(N1), P2 + 5)]  # unknown node, unmapped address
        assert touches(pairs, format_address, pool, now=1100.0, refresh=200) == 0, "fresh: no mark"
        assert touches(pairs, format_address, pool, now=1250.0, refresh=200) == 1
        pool.flush_touches()
        found = pool.lookup(N1, "a.example")
        assert found is not None and found[1] == 1250.0
        await pool.stop()

    asyncio.run(run())


def test_target_refresher_proposes_only_changes_and_keeps_last_on_failure() -> None:
    async def run() -> None:
        now = [1000.0]
        pool = LocalPool(["100.64.1.0/24"], clock=lambda: now[0])
        await pool.start()
        await pool.checkout(N1, "a.example", (R1,), 60)
        answers: dict[str, Sequence[int] | Exception] = {"a.example": [R1]}
        asked: list[str] = []

        async def resolver(domain: str) -> tuple[Sequence[int], float]:
            asked.append(domain)
            answer = answers[domain]
            if isinstance(answer, Exception):
                raise answer
            return answer, 60.0

        r = TargetRefresher(pool, resolver, lambda: ["a.example"], min_ttl=30, clock=lambda: now[0])
        for _ in range(3):
            now[0] += 31
            await r.round()
        assert asked and r.proposals == 0, "unchanged addresses cost no Raft entry"
        answers["a.example"] = [R2, R1]
        now[0] += 61
        await r.round()
        assert r.proposals == 1 and pool.targets("a.example") == (R1, R2)
        answers["a.example"] = OSError("upstream down")
        now[0] += 61
        await r.round()
        assert pool.targets("a.example") == (R1, R2), "a failed refresh keeps the last addresses"
        answers["a.example"] = []
        now[0] += 61
        await r.round()
        assert pool.targets("a.example") == (R1, R2), "an empty answer keeps them too"
        await pool.stop()

    asyncio.run(run())


@pytest.mark.parametrize("node", ["100.101.0.2", "nStableID"])
def test_parse_node_ip(node: str) -> None:
    assert (render.parse_node_ip(node) is not None) == (node[0].isdigit())


def test_reset_and_incremental_changes_agree() -> None:
    """Start-up (reset) and live mirroring (apply) must render the same kernel elements."""
    import random

    rng = random.Random(7)
    targets = {f"d{j}.example": tuple(sorted(rng.sample([R1, R2, R3], rng.randint(1, 3)))) for j in range(20)}
    nodes = [f"100.101.0.{i}" for i in range(1, 40)] + ["stableA", "stableB"]
    views = [MappingView(n, f"d{rng.randrange(20)}.example", P1 + k, 0.0) for k, n in enumerate(nodes * 3)]
    live = SteerModel()
    live.set_node_ips({"stableA": ["100.101.1.1", "100.101.1.2"], "stableB": ["100.101.1.3"]})
    installed: dict[render.Key, int] = {}
    live.apply(Changes(targets=targets))
    for v in views:
        d = live.apply(Changes(added=[(v.node, v.address, v.domain)]))
        for k in d.removed:
            del installed[k]
        installed.update(d.added)
    fresh = SteerModel()
    fresh.set_node_ips({"stableA": ["100.101.1.1", "100.101.1.2"], "stableB": ["100.101.1.3"]})
    assert fresh.reset(views, targets) == live.elements() == installed
    assert len(installed) == 39 * 3 + 3 * 3


def test_netlink_decoders_read_keys_and_tuples() -> None:
    """The raw dump decoders, on messages laid out as the kernel sends them."""
    import struct

    from appconnector.kernel import netlink, nftables
    from appconnector.nat import seen

    nested = netlink.NLA_F_NESTED

    def elem(key: bytes) -> bytes:
        inner = (netlink.attr(1 | nested, netlink.attr(1, key))       # NFTA_SET_ELEM_KEY / DATA_VALUE
                 + netlink.attr(4, struct.pack("!Q", 15000))          # TIMEOUT
                 + netlink.attr(5, struct.pack("!Q", 9000)))          # EXPIRATION
        return netlink.attr(1 | nested, inner)                        # NFTA_LIST_ELEM

    k1, k2 = struct.pack("!II", ip(N1), P1), struct.pack("!II", ip(N2), P2)
    msg = (netlink.attr(1, b"appconnector\0") + netlink.attr(2, b"seen\0")
           + netlink.attr(3 | nested, elem(k1) + elem(k2)))
    keys: list[bytes] = []
    nftables._collect_keys(msg, 0, len(msg), keys)
    assert keys == [k1, k2]

    ip_attrs = netlink.attr(1, struct.pack("!I", ip(N1))) + netlink.attr(2, struct.pack("!I", P1))
    proto = netlink.attr(1, b"\x11") + netlink.attr(2, struct.pack("!H", 4000)) + netlink.attr(3, struct.pack("!H", 53))
    tuple_orig = netlink.attr(1 | nested, ip_attrs) + netlink.attr(2 | nested, proto)
    ct = netlink.attr(1 | nested, tuple_orig) + netlink.attr(3, struct.pack("!I", 0))
    found = seen._pool_bound(ct, 0, len(ct))
    assert found is not None and found[:2] == (ip(N1), P1)
    a, b = found[2]
    assert ct[a:b] == tuple_orig, "the original tuple is sent back verbatim to delete the entry"
    assert seen._pool_bound(netlink.attr(3, b"\0\0\0\0"), 0, 8) is None


def test_pending_delta_coalesces_in_kernel_order_and_turns_a_long_backlog_into_a_rebuild() -> None:
    k1, k2, k3 = (1, P1), (2, P1), (3, P1)
    p = render.PendingDelta(limit=4)
    p.add(Delta(removed=[k1], added={k1: R2}))   # kernel held k1 → R1: replace it
    p.add(Delta(removed=[k1], added={k1: R3}))   # replaced again before the worker ran
    p.add(Delta(added={k2: R1}))
    p.add(Delta(removed=[k2]))                   # never reached the kernel: nothing to do for it
    rebuild, d = p.take()
    assert not rebuild and d.removed == [k1] and d.added == {k1: R3}
    assert not p and p.take() == (False, Delta())
    p.add(Delta(added={(i, P2): R1 for i in range(5)}))  # past the limit: one rebuild instead
    assert p.rebuild and len(p) == 0
    p.add(Delta(added={k3: R1}))
    assert p.take() == (True, Delta()) and not p


def test_model_parts_flatten_to_its_elements_and_do_not_change_with_the_model() -> None:
    m = SteerModel()
    m.reset([MappingView(N1, "a.example", P1, 0.0)], {"a.example": (R1,)})
    parts = m.parts()
    m.apply(Changes(removed=[(N1, P1, "a.example")], added=[(N2, P2, "b.example")], targets={"b.example": (R2,)}))
    assert render.flatten(parts) == {(ip(N1), P1): R1}
    assert render.flatten(m.parts()) == m.elements() == {(ip(N2), P2): R2}


def test_the_model_follows_a_state_replaced_while_changes_keep_coming() -> None:
    """The NAT worker rebuilds its model aside after every state replacement (a snapshot install)
    while the apply path keeps recording changes (another thread here, as pysyncobj's is); whatever
    the interleaving, it ends equal to a model built from the final state (kernel part off: this is
    the model alone)."""
    import threading
    import time

    from appconnector.config import load
    from appconnector.nat.service import NatService
    from appconnector.nat.settings import NatSettings

    async def body() -> None:
        cfg = load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone", "APPCONNECTOR_NAT_ENABLED": "false",
                              "APPCONNECTOR_POOL_PREFIXES": "100.64.0.0/16"})
        pool = LocalPool(cfg.pool.prefixes)
        await pool.start()
        now = time.time()
        pool.apply(("checkout_batch", tuple((f"100.101.0.{i % 9}", f"pre{i}.example", (R1 + i % 3,), 60.0)
                                            for i in range(10000)), now, now - 3600))
        nat = NatService(NatSettings.from_config(cfg), pool, None)
        await nat.start()
        done = threading.Event()

        def writer() -> None:  # the apply thread: changes keep coming while the model is rebuilt
            for j in range(2000):
                t = time.time()
                pool.apply(("checkout_batch", ((f"100.101.0.{j % 9}", f"w{j}.example", (R2,), 60.0),), t, t - 3600))
                if j % 500 == 0:
                    pool.apply(("forget", (f"100.101.0.{j % 9}",), t))
                time.sleep(0.0002)
            done.set()

        try:
            thread = threading.Thread(target=writer)
            thread.start()
            while not done.is_set():
                nat.on_reset(pool)  # as a snapshot install does
                await asyncio.sleep(0.25)
            thread.join()
            deadline = time.monotonic() + 30
            while nat.status()["pending"]:
                assert time.monotonic() < deadline, nat.status()
                await asyncio.sleep(0.02)
            views = list(pool.mappings())
            fresh = SteerModel()
            fresh.reset(views, {d: pool.targets(d) for d in {v.domain for v in views}})
            st = nat.status()
            assert st["mappings"] == fresh.mapping_count() == len(views)
            assert st["steer_elements"] == len(fresh)
            assert sorted(nat.domains()) == sorted(fresh.domains())
        finally:
            await nat.stop()
            await pool.stop()

    asyncio.run(body())
