"""PoolState semantics (docs/design.md §3), including every behaviour upstream natc's pool tests check
(tailscale/tailscale cmd/natc/ippool/ippool_test.go and consensusippool_test.go)."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import pickle
import subprocess
import sys

import pytest

from appconnector.pool.api import CHECKOUT_RESULTS, PoolExhausted
from appconnector.pool.state import SKEW_LIMIT, InvalidCommand, PoolState

T0 = 1_700_000_000.0
HOUR = 3600.0


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def checkout(state: PoolState, node: str, domain: str, now: float = T0, deadline: float = 0.0,
             targets: tuple[int, ...] = ()) -> int | PoolExhausted:
    """A checkout proposed at pool time ``now``, the leader having ticked the clock to it."""
    state.tick(now)
    results, _ = state.checkout_batch([(node, domain, targets, 60.0)], now, deadline)
    result = results[0]
    assert isinstance(result, int | PoolExhausted)
    return result


# ---- ported from upstream ------------------------------------------------------------------------------


def test_tiny_pool_exhaustion_never_gives_one_address_to_two_domains() -> None:
    # upstream TestIPPoolExhaustion: a /30, five domains asked five times each. Ours reserves the lowest
    # address for DNS, so three domains get addresses and two are refused every round.
    state = PoolState(["100.64.1.0/30"])
    assigned: dict[int, str] = {}
    errors = []
    for _ in range(5):
        for domain in ["a.example.com", "b.example.com", "c.example.com", "d.example.com", "e.example.com"]:
            result = checkout(state, "node-1", domain)
            if isinstance(result, PoolExhausted):
                errors.append(result)
                continue
            assert assigned.setdefault(result, domain) == domain, "an address was given to two domains"
            assert ipaddress.IPv4Address(result) in ipaddress.ip_network("100.64.1.0/30")
            assert result != ip("100.64.1.0"), "the DNS address was handed out"
    assert sorted(assigned) == [ip("100.64.1.1"), ip("100.64.1.2"), ip("100.64.1.3")]
    assert len(errors) == 10
    assert all(e.domain in ("d.example.com", "e.example.com") for e in errors)
    assert "pool exhausted" in str(errors[0])


def test_same_domain_gets_the_same_address_and_reverse_lookup_finds_it() -> None:
    # upstream TestIPPool / TestConsensusIPForDomain / TestConsensusDomainForIP
    state = PoolState(["100.64.0.0/16"])
    a = checkout(state, "node-1", "example.com")
    b = checkout(state, "node-1", "a.example.com")
    assert isinstance(a, int) and isinstance(b, int) and a != b
    assert ipaddress.IPv4Address(a) in ipaddress.ip_network("100.64.0.0/16")
    assert state.domain_for("node-1", a) == "example.com"
    assert checkout(state, "node-1", "example.com") == a


def test_unknown_address_has_no_domain() -> None:
    # upstream TestConsensusDomainForIP / TestConsensusReadDomainForIP
    state = PoolState(["100.64.0.0/16"])
    assert state.domain_for("node-1", ip("100.64.0.1")) is None
    a = checkout(state, "node-1", "example.com")
    assert state.domain_for("node-1", a) == "example.com"
    assert state.domain_for("node-1", ip("100.64.0.2")) is None  # inside the pool, never handed out
    assert state.domain_for("node-1", ip("10.0.0.1")) is None  # outside the pool
    assert state.domain_for("node-2", a) is None  # another node's space


def test_two_address_pool_exhausts_on_the_third_domain() -> None:
    # upstream TestConsensusPoolExhaustion on a /31; with the DNS address reserved a /31 holds one
    # address for nodes, so our two-address pool is a /31 plus one more address.
    state = PoolState(["100.64.0.0/31"])
    assert checkout(state, "node-1", "a.example.com") == ip("100.64.0.1")
    assert isinstance(checkout(state, "node-1", "b.example.com"), PoolExhausted)
    state = PoolState(["100.64.0.0/31", "100.64.0.2/32"])
    assert checkout(state, "node-1", "a.example.com") == ip("100.64.0.1")
    assert checkout(state, "node-1", "b.example.com") == ip("100.64.0.2")
    assert isinstance(checkout(state, "node-1", "c.example.com"), PoolExhausted)


def test_expiry_sequence() -> None:
    # upstream TestConsensusPoolExpiry (its /31 = our two usable addresses)
    state = PoolState(["100.64.0.0/31", "100.64.0.2/32"])
    first, second = ip("100.64.0.1"), ip("100.64.0.2")
    used = T0
    assert checkout(state, "n", "a.example.com", now=used, deadline=0.0) == first
    assert state.domain_for("n", first) == "a.example.com"
    # deadline before the time of use: no reuse, the never-used address comes next
    assert checkout(state, "n", "b.example.com", now=used, deadline=used - HOUR) == second
    # deadline after it: the least recently used address (ties: lowest) is taken over
    assert checkout(state, "n", "c.example.com", now=used, deadline=used + HOUR) == first
    assert state.domain_for("n", first) == "c.example.com"
    assert state.lookup("n", "a.example.com") is None
    # and it stays with c
    assert checkout(state, "n", "c.example.com", now=used, deadline=used + HOUR) == first
    assert state.domain_for("n", first) == "c.example.com"


def test_touch_moves_last_used_forward_and_keeps_the_domain() -> None:
    # upstream TestConsensusPoolApplyMarkLastUsed
    state = PoolState(["100.64.0.0/31"])
    a = checkout(state, "n", "example.com", now=T0)
    assert state.lookup("n", "example.com") == (a, T0)
    later = T0 + HOUR
    state.tick(later)
    state.touch_batch([("n", a, "example.com", later)])
    assert state.lookup("n", "example.com") == (a, later)
    assert state.domain_for("n", a) == "example.com"


def test_snapshot_then_restore_drops_later_allocations() -> None:
    # upstream TestConsensusSnapshot / TestConsensusRestore
    state = PoolState(["100.64.0.0/16"])
    a = checkout(state, "n", "example.com")
    assert a == ip("100.64.0.1")
    snap = state.to_bytes()
    for d in ["b.example.com", "c.example.com", "d.example.com"]:
        checkout(state, "n", d)
    assert state.stats()["mappings"] == 4
    restored = PoolState.from_bytes(snap, ["100.64.0.0/16"])
    assert [(m.node, m.domain, m.address) for m in restored.mappings()] == [("n", "example.com", a)]
    assert restored.domain_for("n", a) == "example.com"
    assert restored.stats()["nodes"] == 1
    # and it allocates as the original did at snapshot time
    assert checkout(restored, "n", "b.example.com") == ip("100.64.0.2")


# ---- allocation order ----------------------------------------------------------------------------------


def test_every_node_has_the_whole_pool() -> None:
    state = PoolState(["100.64.1.0/30"])
    for node in ["a", "b", "c"]:
        assert [checkout(state, node, d) for d in ["x", "y", "z"]] == [ip("100.64.1.1"), ip("100.64.1.2"),
                                                                       ip("100.64.1.3")]
    assert state.stats()["mappings"] == 9


def test_lowest_never_used_comes_before_any_reuse() -> None:
    state = PoolState(["100.64.1.0/29"])
    a = checkout(state, "n", "a", now=T0)
    # a is long expired, but never-used addresses remain: they come first
    b = checkout(state, "n", "b", now=T0 + 10 * HOUR, deadline=T0 + 9 * HOUR)
    assert (a, b) == (ip("100.64.1.1"), ip("100.64.1.2"))


def test_reuse_takes_the_least_recently_used_then_the_lowest() -> None:
    state = PoolState(["100.64.1.0/30"])  # three usable
    checkout(state, "n", "a", now=T0)
    checkout(state, "n", "b", now=T0 + 1)
    checkout(state, "n", "c", now=T0 + 1)
    state.tick(T0 + 2)
    state.touch_batch([("n", ip("100.64.1.1"), "a", T0 + 2)])
    # b (.2) and c (.3) tie on last use: the lowest address goes first; then c, then a
    state.tick(T0 + 3)
    r1, c1 = state.checkout_batch([("n", "d", (), 0.0)], T0 + 3, T0 + 10)
    assert r1 == [ip("100.64.1.2")]
    assert c1.removed == [("n", ip("100.64.1.2"), "b")] and c1.added == [("n", ip("100.64.1.2"), "d")]
    assert checkout(state, "n", "e", now=T0 + 3, deadline=T0 + 10) == ip("100.64.1.3")
    assert checkout(state, "n", "f", now=T0 + 3, deadline=T0 + 10) == ip("100.64.1.1")
    # now every address was used at T0+3: a deadline equal to that reuses nothing (strictly older only)
    assert isinstance(checkout(state, "n", "g", now=T0 + 3, deadline=T0 + 3), PoolExhausted)


def test_a_hit_refreshes_last_used_and_protects_the_address() -> None:
    state = PoolState(["100.64.1.0/30"])
    for d, t in [("a", T0), ("b", T0 + 1), ("c", T0 + 2)]:
        checkout(state, "n", d, now=t)
    checkout(state, "n", "a", now=T0 + 5)  # a hit: a is now the most recent
    assert state.lookup("n", "a") == (ip("100.64.1.1"), T0 + 5)
    assert checkout(state, "n", "d", now=T0 + 6, deadline=T0 + 10) == ip("100.64.1.2")  # b, not a


def test_the_dns_address_is_never_handed_out_in_multi_prefix_pools() -> None:
    state = PoolState(["100.64.2.0/31", "100.64.1.0/31"])  # unsorted on purpose: lowest is 100.64.1.0
    got = [checkout(state, "n", d) for d in "abcd"]
    assert got[:3] == [ip("100.64.1.1"), ip("100.64.2.0"), ip("100.64.2.1")]
    assert isinstance(got[3], PoolExhausted)


def test_batch_results_are_in_request_order_and_one_batch_can_mix_outcomes() -> None:
    state = PoolState(["100.64.1.0/31"])
    results, changes = state.checkout_batch(
        [("n", "a", (), 0.0), ("n", "a", (), 0.0), ("n", "b", (), 0.0), ("m", "b", (), 0.0)], T0, 0.0)
    assert results[0] == results[1] == ip("100.64.1.1")
    assert isinstance(results[2], PoolExhausted) and results[2].domain == "b"
    assert results[3] == ip("100.64.1.1")
    assert changes.added == [("n", ip("100.64.1.1"), "a"), ("m", ip("100.64.1.1"), "b")]


# ---- touch ---------------------------------------------------------------------------------------------


def test_touch_rules() -> None:
    state = PoolState(["100.64.1.0/29"])
    a = checkout(state, "n", "a", now=T0)
    assert isinstance(a, int)
    state.touch_batch([("n", a, "other", T0 + 10)])  # domain differs: no-op
    state.touch_batch([("m", a, "a", T0 + 10)])  # unknown node
    state.touch_batch([("n", a + 1, "a", T0 + 10)])  # unknown address
    state.touch_batch([("n", ip("10.0.0.1"), "a", T0 + 10)])  # outside the pool
    state.tick(T0 + 10)
    assert state.lookup("n", "a") == (a, T0)
    assert state.stats()["mappings"] == 1 and state.domain_for("n", a + 1) is None
    # a touch is a use now on the pool clock, whatever time its proposer read (a member catching up
    # reads the clock late: its mark must not make a live mapping look idle)
    state.touch_batch([("n", a, "a", T0 - 10)])
    assert state.lookup("n", "a") == (a, T0 + 10)
    state.tick(T0 + 20)
    state.touch_batch([("n", a, "a", T0 + 500)])  # and never later than the clock
    assert state.lookup("n", "a") == (a, T0 + 20)


def test_touch_of_a_reassigned_address_does_not_refresh_the_new_domain() -> None:
    state = PoolState(["100.64.1.0/31"])
    a = checkout(state, "n", "old", now=T0)
    assert checkout(state, "n", "new", now=T0 + 200, deadline=T0 + 100) == a
    state.tick(T0 + 250)
    state.touch_batch([("n", a, "old", T0 + 250)])  # a late mark for the old domain
    assert state.lookup("n", "new") == (a, T0 + 200)


def test_touched_address_is_not_reused_before_its_deadline() -> None:
    state = PoolState(["100.64.1.0/31"])
    a = checkout(state, "n", "a", now=T0)
    state.tick(T0 + 200)
    state.touch_batch([("n", a, "a", T0 + 200)])
    assert isinstance(checkout(state, "n", "b", now=T0 + 200, deadline=T0 + 100), PoolExhausted)
    assert checkout(state, "n", "b", now=T0 + 400, deadline=T0 + 201) == a


# ---- targets -------------------------------------------------------------------------------------------


def test_targets_recorded_at_checkout_only_when_the_domain_has_none() -> None:
    state = PoolState(["100.64.1.0/29"])
    _, c1 = state.checkout_batch([("n", "a", (ip("192.0.2.2"), ip("192.0.2.1"), ip("192.0.2.1")), 60.0)],
                                 T0, 0.0)
    assert state.targets("a") == (ip("192.0.2.1"), ip("192.0.2.2"))  # sorted, de-duplicated
    assert c1.targets == {"a": (ip("192.0.2.1"), ip("192.0.2.2"))}
    _, c2 = state.checkout_batch([("m", "a", (ip("198.51.100.1"),), 60.0)], T0 + 1, 0.0)
    assert state.targets("a") == (ip("192.0.2.1"), ip("192.0.2.2"))  # another connector's answer: kept
    assert c2.targets == {}
    assert state.target_info("a") == ((ip("192.0.2.1"), ip("192.0.2.2")), 60.0, T0)
    assert state.targets("never") == ()


def test_set_targets_replaces_and_reports_only_real_changes() -> None:
    state = PoolState(["100.64.1.0/29"])
    checkout(state, "n", "a", targets=(ip("192.0.2.1"),))
    state.tick(T0 + 50)
    c = state.set_targets("a", (ip("192.0.2.9"),), 30.0, T0 + 5)
    assert state.targets("a") == (ip("192.0.2.9"),) and c.targets == {"a": (ip("192.0.2.9"),)}
    c = state.set_targets("a", (ip("192.0.2.9"),), 30.0, T0 + 50)  # same addresses: refresh time only
    assert not c and state.target_info("a") == ((ip("192.0.2.9"),), 30.0, T0 + 50)
    c = state.set_targets("unmapped.example", (ip("192.0.2.9"),), 30.0, T0 + 50)
    assert not c and state.targets("unmapped.example") == ()  # nobody maps it: nothing kept


def test_targets_go_with_the_last_mapping_of_a_domain() -> None:
    state = PoolState(["100.64.1.0/29"])
    checkout(state, "n", "a", targets=(ip("192.0.2.1"),))
    checkout(state, "m", "a")
    c = state.forget(["n"], T0)
    assert state.targets("a") == (ip("192.0.2.1"),) and not c.targets
    c = state.forget(["m"], T0)
    assert state.targets("a") == () and c.targets == {"a": ()}


# ---- forget and exclusions -----------------------------------------------------------------------------


def test_forget_drops_every_mapping_of_the_node_and_only_those() -> None:
    state = PoolState(["100.64.1.0/29"])
    for d in "abc":
        checkout(state, "n", d)
    checkout(state, "m", "a")
    changes = state.forget(["n", "never-seen"], T0)
    assert changes.removed == [("n", ip("100.64.1.1"), "a"), ("n", ip("100.64.1.2"), "b"),
                               ("n", ip("100.64.1.3"), "c")]
    assert state.lookup("n", "a") is None and state.lookup("m", "a") == (ip("100.64.1.1"), T0)
    assert state.stats()["nodes"] == 1
    assert checkout(state, "n", "z") == ip("100.64.1.1")  # a forgotten node starts from the bottom again


def test_excluded_addresses_are_skipped_and_their_mappings_dropped() -> None:
    state = PoolState(["100.64.1.0/29"])
    a, b = checkout(state, "n", "a"), checkout(state, "n", "b")
    changes = state.set_excluded([ip("100.64.1.2"), ip("100.64.1.3"), ip("100.64.1.0"), ip("10.1.1.1")], T0)
    assert changes.removed == [("n", b, "b")]
    assert state.excluded() == [ip("100.64.1.2"), ip("100.64.1.3")]  # DNS and outside addresses ignored
    assert checkout(state, "n", "c") == ip("100.64.1.4")
    assert checkout(state, "fresh", "x") == ip("100.64.1.1")
    assert checkout(state, "fresh", "y") == ip("100.64.1.4")
    # lifted again: the freed addresses are the lowest free ones once more
    state.set_excluded([], T0)
    assert checkout(state, "n", "d") == ip("100.64.1.2")
    assert checkout(state, "n", "e") == ip("100.64.1.3")
    assert checkout(state, "fresh", "z") == ip("100.64.1.2")
    assert a == ip("100.64.1.1")


def test_exclusions_drop_mappings_of_every_node_in_a_stable_order() -> None:
    state = PoolState(["100.64.1.0/29"])
    for node in ["z", "a", "m"]:
        for d in ["x", "y", "w"]:
            checkout(state, node, d)
    changes = state.set_excluded([ip("100.64.1.3"), ip("100.64.1.1")], T0)
    assert changes.removed == [(node, ip(a), d) for node in ["a", "m", "z"]
                               for a, d in [("100.64.1.1", "x"), ("100.64.1.3", "w")]]
    assert state.stats()["mappings"] == 3 and state.stats()["nodes"] == 3
    state.set_excluded([ip("100.64.1.2"), ip("100.64.1.1"), ip("100.64.1.3")], T0)
    assert state.stats()["nodes"] == 0  # nodes left without mappings are gone


def test_excluding_everything_exhausts() -> None:
    state = PoolState(["100.64.1.0/30"])
    state.set_excluded([ip("100.64.1.1"), ip("100.64.1.2"), ip("100.64.1.3")], T0)
    assert isinstance(checkout(state, "n", "a"), PoolExhausted)


# ---- time ----------------------------------------------------------------------------------------------


def test_slow_proposers_stamp_the_pool_clock() -> None:
    state = PoolState(["100.64.1.0/29"])
    checkout(state, "n", "a", now=T0 + 100)
    state.checkout_batch([("n", "b", (), 60.0)], T0, 0.0)  # a proposer whose reading is behind
    assert state.clock == T0 + 100
    assert state.lookup("n", "b") == (ip("100.64.1.2"), T0 + 100), "a checkout is a use now"


def test_only_ticks_move_the_pool_clock() -> None:
    """Issue 9 item 5: commands from a member days fast, however many, leave the clock where it is."""
    state = PoolState(["100.64.1.0/28"])
    state.tick(T0)
    fast = T0 + 3 * 86400
    for i in range(40):
        state.checkout_batch([("n", f"d{i}", (), 60.0)], fast, fast - HOUR)
        state.touch_batch([("n", ip("100.64.1.1"), "d0", fast)])
        state.set_targets(f"d{i}", (ip("192.0.2.1"),), 60.0, fast)
        state.forget(["gone"], fast)
        state.set_excluded([], fast)
        state.exclude([], [], fast)
    assert state.clock == T0
    assert state.stats()["mappings"] == 15, "nothing was reclaimed: the pool ran out instead"
    assert {m.last_used for m in state.mappings()} == {T0}, "stamps clamped to the pool clock"
    assert state.target_info("d1") == ((ip("192.0.2.1"),), 60.0, T0)
    state.tick(T0 - 50)  # a tick never moves it back
    assert state.clock == T0
    state.tick(T0 + HOUR + 1)
    assert state.checkout_batch([("n", "late", (), 60.0)], T0 + HOUR + 1, T0 + 1)[0] == [ip("100.64.1.1")]


def test_a_fast_clock_cannot_reclaim_addresses_early() -> None:
    state = PoolState(["100.64.1.0/31"])
    a = checkout(state, "n", "a", now=T0)
    # a proposer 10 hours fast asks to reuse anything older than 1 hour before its "now": measured from
    # the pool clock that is one hour before it, which nothing is older than
    results, changes = state.checkout_batch([("n", "b", (), 60.0)], T0 + 10 * HOUR, T0 + 9 * HOUR)
    assert isinstance(results[0], PoolExhausted)
    assert state.lookup("n", "a") == (a, T0)
    assert state.clock == T0
    # reported, for the replica to count and log: one skewed time, one exhausted checkout
    assert changes.report.clock_skew == 1 and "ahead of the pool's clock" in changes.report.warnings[0][0]
    assert changes.report.checkouts[CHECKOUT_RESULTS.index("exhausted")] == 1
    # a touch far in the future is clamped to the clock
    state.touch_batch([("n", a, "a", T0 + 100 * HOUR)])
    assert state.lookup("n", "a") == (a, T0)
    # an hour later on the pool clock, the same window does reclaim it
    state.tick(T0 + HOUR + 1)
    assert state.checkout_batch([("n", "b", (), 60.0)], T0 + 10 * HOUR, T0 + 9 * HOUR)[0] == [a]


def test_a_fresh_state_starts_its_clock_at_the_first_time_it_sees() -> None:
    state = PoolState(["100.64.1.0/29"])
    assert state.clock == 0.0
    state.checkout_batch([("n", "a", (), 60.0)], T0, 0.0)
    assert state.clock == T0 and state.lookup("n", "a") == (ip("100.64.1.1"), T0)
    state.checkout_batch([("n", "b", (), 60.0)], T0 + HOUR, 0.0)
    assert state.clock == T0, "after the first, only ticks move it"


def test_a_version_1_snapshot_keeps_the_high_water_rule_until_the_first_tick() -> None:
    state = PoolState(["100.64.1.0/29"])
    checkout(state, "n", "a", now=T0)
    old = _as_version_1(state.to_bytes())
    restored = PoolState.from_bytes(old, ["100.64.1.0/29"])
    assert restored.clock == T0 and restored.legacy_clock
    assert restored.lookup("n", "a") == (ip("100.64.1.1"), T0)
    # journal entries written before the pool clock replay as they were first applied
    restored.checkout_batch([("n", "b", (), 60.0)], T0 + 100, 0.0)
    assert restored.clock == T0 + 100 and restored.lookup("n", "b") == (ip("100.64.1.2"), T0 + 100)
    restored.checkout_batch([("n", "c", (), 60.0)], T0 + HOUR, 0.0)
    assert restored.clock == T0 + 100 + SKEW_LIMIT, "the old rule: at most five minutes per command"
    restored.tick(T0 + 50)
    assert not restored.legacy_clock and restored.clock == T0 + 100 + SKEW_LIMIT
    restored.checkout_batch([("n", "d", (), 60.0)], T0 + HOUR, 0.0)
    assert restored.clock == T0 + 100 + SKEW_LIMIT, "ticked: commands no longer move it"
    again = PoolState.from_bytes(restored.to_bytes(), ["100.64.1.0/29"])
    assert not again.legacy_clock and again.to_bytes() == restored.to_bytes()


def _as_version_1(data: bytes) -> bytes:
    """A snapshot without targets (version 3 then equals version 2) as the version-1 code wrote it: no
    flags byte (and its own checksum)."""
    body = bytearray(data[:-32])
    assert body[6:8] == (3).to_bytes(2, "little") and body[20] == 0
    body[6:8] = (1).to_bytes(2, "little")
    del body[20]  # the header is 20 bytes (magic, version, clock, prefixes); the flags byte follows it
    return bytes(body) + hashlib.sha256(bytes(body)).digest()


# ---- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    (), ("nope",), ("checkout_batch",), ("checkout_batch", None, T0, 0.0), ("checkout_batch", (), "x", 0.0),
    ("touch_batch", 5), ("set_targets", 5, (), 1.0, T0), ("set_targets", "a", ("x",), 1.0, T0),
    ("forget", "n", T0), ("forget", ("n",), float("nan")), ("set_excluded", ("x",), T0), 42, None,
    ("checkout_batch", (), 10**400, 0.0), ("set_targets", "a", (), 10**400, T0),
])
def test_malformed_commands_change_nothing_and_say_why(command: object) -> None:
    state = PoolState(["100.64.1.0/29"])
    checkout(state, "n", "a")
    before = state.to_bytes()
    result, changes = state.apply(command)  # type: ignore[arg-type]
    assert isinstance(result, InvalidCommand) and str(result)
    assert not changes
    assert state.to_bytes() == before
    assert changes.report.invalid == 1 and changes.report.warnings == [("pool: ignored command: %s", (result,))]


def test_malformed_requests_inside_a_batch_fail_alone() -> None:
    state = PoolState(["100.64.1.0/29"])
    results, changes = state.apply(("checkout_batch", (
        ("n", "a", (), 60.0), ("n", 7, (), 60.0), ("n",), ("n", "b", (-1,), 60.0), ("n", "c", (), 10**400),
        "junk", ("n", "d", [ip("192.0.2.1")], 60),
    ), T0, 0.0))
    assert isinstance(results, list)
    assert results[0] == ip("100.64.1.1") and results[6] == ip("100.64.1.2")
    assert all(isinstance(r, InvalidCommand) for r in results[1:6])
    assert [a[2] for a in changes.added] == ["a", "d"]
    report = changes.report
    assert report.invalid == 5 and report.checkouts == [0, 2, 0, 0, 5]  # hit, new, reused, exhausted, error
    assert len(report.warnings) == 1 and report.warnings[0][1][0] == 5
    assert "refused %d malformed requests" in report.warnings[0][0]


def test_odd_but_well_typed_input_does_not_crash() -> None:
    state = PoolState(["100.64.1.0/29"])
    weird = ["", "A.Example.", "\x00\udcff", "x" * 10_000]
    for d in weird:
        assert isinstance(checkout(state, "node\udc80", d), int)
    state.touch_batch([("node\udc80", ip("100.64.1.1"), "", float("inf")), ("x", -1, "a", T0), (1, 2, 3, 4),
                       ("n", 10**400, "a", T0), ("n", ip("100.64.1.1"), "a", 10**400)])
    restored = PoolState.from_bytes(state.to_bytes(), ["100.64.1.0/29"])
    assert restored.to_bytes() == state.to_bytes()
    assert {m.domain for m in restored.mappings()} == set(weird)
    results, _ = state.checkout_batch([("n", "deadline", (), 1.0)], T0, 10**400)  # no usable deadline
    assert isinstance(results[0], int)


# ---- snapshot ------------------------------------------------------------------------------------------


def populated() -> PoolState:
    state = PoolState(["100.64.1.0/28", "100.64.3.0/30"])
    for i, node in enumerate(["n1", "n2", "n3"]):
        for j in range(6 + i):
            checkout(state, node, f"d{j}.example", now=T0 + j, targets=(ip("192.0.2.1") + j,))
    state.set_excluded([ip("100.64.1.5")], T0 + 10)
    state.tick(T0 + 30)
    state.touch_batch([("n1", ip("100.64.1.2"), "d1.example", T0 + 30)])
    state.tick(T0 + 31)
    state.set_targets("d2.example", (ip("198.51.100.7"),), 99.0, T0 + 31)
    return state


def test_snapshot_restores_exactly_and_is_deterministic() -> None:
    state = populated()
    data = state.to_bytes()
    assert data == state.to_bytes()
    restored = PoolState.from_bytes(data, ["100.64.3.0/30", "100.64.1.0/28"])  # same pool, other order
    assert restored.to_bytes() == data and restored.digest() == state.digest()
    assert sorted(restored.mappings(), key=repr) == sorted(state.mappings(), key=repr)
    assert restored.excluded() == state.excluded() and restored.clock == state.clock
    assert restored.target_info("d2.example") == state.target_info("d2.example")
    # both continue identically
    for s in (state, restored):
        s.checkout_batch([("n1", "new.example", (), 0.0), ("n9", "x", (), 0.0)], T0 + 40, T0 + 3)
    assert restored.to_bytes() == state.to_bytes()
    assert pickle.loads(pickle.dumps(state)).digest() == state.digest()


def test_equal_states_have_equal_bytes_whatever_their_history() -> None:
    a, b = PoolState(["100.64.1.0/29"]), PoolState(["100.64.1.0/29"])
    a.checkout_batch([("n", "x", (), 0.0), ("m", "y", (), 0.0)], T0, 0.0)
    b.checkout_batch([("m", "y", (), 0.0)], T0, 0.0)
    b.checkout_batch([("n", "x", (), 0.0)], T0, 0.0)
    assert a.to_bytes() == b.to_bytes()


def test_restore_into_a_changed_pool_drops_what_falls_outside() -> None:
    state = populated()
    restored = PoolState.from_bytes(state.to_bytes(), ["100.64.1.0/29", "100.64.3.0/30"])
    kept = {(m.node, m.domain, m.address) for m in restored.mappings()}
    expected = {(m.node, m.domain, m.address) for m in state.mappings()
                if ipaddress.IPv4Address(m.address) in ipaddress.ip_network("100.64.1.0/29")
                or ipaddress.IPv4Address(m.address) in ipaddress.ip_network("100.64.3.0/30")}
    assert kept == expected and len(kept) < state.stats()["mappings"]
    assert restored.load_report is not None and "dropped" in restored.load_report.warnings[0][0]
    assert PoolState.from_bytes(state.to_bytes(), ["100.64.1.0/28", "100.64.3.0/30"]).load_report is None
    assert restored.excluded() == [ip("100.64.1.5")]
    # n3 held .1-.8 (.5 excluded, .8 now outside): its next address is the new pool's first unused one
    assert checkout(restored, "n3", "fresh", now=T0 + 100) == ip("100.64.3.0")
    # n1 held .1-.6 (.5 excluded): .7 was never used
    assert checkout(restored, "n1", "fresh", now=T0 + 100) == ip("100.64.1.7")
    # new pool whose lowest (DNS) address was a mapped address: that mapping goes too
    moved = PoolState.from_bytes(state.to_bytes(), ["100.64.1.2/31", "100.64.1.4/30"])
    assert all(m.address != ip("100.64.1.2") for m in moved.mappings())
    assert moved.lookup("n1", "d1.example") is None


def test_corrupt_or_unknown_snapshots_are_refused() -> None:
    data = populated().to_bytes()
    prefixes = ["100.64.1.0/28", "100.64.3.0/30"]
    for bad in [b"", b"garbage", data[:-1], data[:40] + bytes([data[40] ^ 1]) + data[41:],
                data[:6] + b"\x09\x00" + data[8:]]:
        with pytest.raises(ValueError):
            PoolState.from_bytes(bad, prefixes)
    with pytest.raises(ValueError, match="version 9"):
        PoolState.from_bytes(data[:6] + b"\x09\x00" + data[8:], prefixes)


def test_stats() -> None:
    state = populated()
    s = state.stats()
    assert s["nodes"] == 3 and s["pool_size"] == 19 and s["excluded"] == 1
    assert s["mappings"] == 6 + 7 + 8 - 3  # the exclusion dropped one mapping per node
    assert s["max_node_use"] == 7 and s["clock"] == T0 + 31


REPLAY_SCRIPT = """
import random, sys
from appconnector.pool.state import PoolState
rng = random.Random(7)
state = PoolState(["100.64.1.0/27", "100.64.3.0/28"])
nodes = [f"node-{i}" for i in range(6)]
domains = [f"d{i}.example" for i in range(40)]
base = 0x64400100
now = 1_700_000_000.0
for step in range(3000):
    now += rng.choice([0, 1, 5, 60])
    kind = rng.random()
    if kind < 0.6:
        reqs = tuple((rng.choice(nodes), rng.choice(domains), (rng.randrange(1, 9),), 30.0) for _ in range(3))
        state.apply(("checkout_batch", reqs, now, now - 120))
    elif kind < 0.85:
        state.apply(("touch_batch", tuple((rng.choice(nodes), base + rng.randrange(40), rng.choice(domains), now)
                                          for _ in range(4))))
    elif kind < 0.9:
        state.apply(("set_targets", rng.choice(domains), (rng.randrange(1, 9),), 30.0, now))
    elif kind < 0.95:
        state.apply(("set_excluded", tuple(base + rng.randrange(40) for _ in range(rng.randrange(3))), now))
    else:
        state.apply(("forget", (rng.choice(nodes),), now))
print(state.digest(), state.stats()["mappings"])
"""


def test_replicas_with_different_hash_seeds_reach_the_same_bytes() -> None:
    # every replica is its own process with its own PYTHONHASHSEED: set and dict internals differ, the
    # state must not
    outputs = set()
    for seed in ("1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", REPLAY_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=120, check=True)
        outputs.add(proc.stdout.strip())
    assert len(outputs) == 1, outputs
    digest, mappings = outputs.pop().split()
    assert len(digest) == 64 and int(mappings) > 50


def test_the_digest_leaves_out_the_pool_clock_and_only_it() -> None:
    a, b = populated(), populated()
    b.tick(T0 + HOUR)
    assert a.digest() == b.digest() and a.to_bytes() != b.to_bytes()
    b.touch_batch([("n1", ip("100.64.1.2"), "d1.example", T0 + HOUR)])
    assert a.digest() != b.digest(), "a stamp of the later clock is in it"
