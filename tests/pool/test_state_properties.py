"""Property tests of PoolState (hypothesis, stateful): random command sequences against a plain reference
model that scans the pool the slow, obvious way, plus the invariants of docs/design.md §3.

Bounded by default (a few seconds); APPCONNECTOR_LONG=1 runs many more and longer sequences.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from appconnector.pool.addresses import AddressSpace
from appconnector.pool.api import PoolExhausted
from appconnector.pool.state import PoolState

LONG = os.environ.get("APPCONNECTOR_LONG") == "1"
SETTINGS = settings(
    max_examples=400 if LONG else 40,
    stateful_step_count=80 if LONG else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # Shrinking a failing sequence can take hypothesis minutes: only the long run shrinks. A default-run
    # failure prints its unshrunk steps; rerun with APPCONNECTOR_LONG=1 for the minimal one.
    phases=list(Phase) if LONG else [Phase.explicit, Phase.reuse, Phase.generate],
)

POOLS = [
    ["100.64.1.0/29"],
    ["100.64.1.0/31", "100.64.1.2/32"],
    ["100.64.1.0/30", "100.64.9.0/31", "100.64.4.4/32"],
]
NODES = ["n1", "n2", "n3"]
DOMAINS = ["a", "b", "c", "d", "e", "f", "g", "h"]
TARGETS = st.lists(st.integers(0, 5).map(lambda i: 0xC0000200 + i), max_size=3).map(tuple)


class Reference:
    """docs/design.md §3 written the obvious way: dicts and full scans, no cleverness.

    Time follows the invariant of issue 9 item 5, not the code's arithmetic: there is one pool clock;
    only ticks move it (never back; a fresh pool starts at the first time it sees); every last-used is
    a pool-clock reading; and an address is reusable only when its last use is older than the reuse
    window the proposer asked for (now - deadline) *measured back from the pool clock*, and older than
    the proposer's own deadline too. Proposer times, however far ahead, move nothing.
    """

    def __init__(self, prefixes: list[str]) -> None:
        self.space = AddressSpace(prefixes)
        self.maps: dict[str, dict[int, list[Any]]] = {}  # node → offset → [domain, last_used]
        self.excluded: set[int] = set()
        self.targets: dict[str, tuple[int, ...]] = {}
        self.clock = 0.0

    def saw(self, t: float) -> None:
        if self.clock == 0.0:
            self.clock = t

    def tick(self, value: float) -> None:
        self.clock = max(self.clock, value)

    def reusable_before(self, now: float, deadline: float) -> float:
        """Last uses strictly before this may be reused: idle for the window on the pool clock."""
        return min(deadline, self.clock - (now - deadline))

    def mapped_domains(self) -> set[str]:
        return {dom for m in self.maps.values() for dom, _ in m.values()}

    def drop_orphan_targets(self) -> None:
        live = self.mapped_domains()
        self.targets = {d: t for d, t in self.targets.items() if d in live}

    def checkout(self, requests: list[tuple[str, str, tuple[int, ...]]], now: float, deadline: float
                 ) -> list[object]:
        self.saw(now)
        t = self.clock  # a checkout is a use now, on the pool clock
        deadline = self.reusable_before(now, deadline)
        results: list[object] = []
        for node, domain, targets in requests:
            m = self.maps.setdefault(node, {})
            hit = [o for o, (dom, _) in m.items() if dom == domain]
            if hit:
                m[hit[0]][1] = max(m[hit[0]][1], t)
                offset = hit[0]
            else:
                free = [o for o in range(1, self.space.size) if o not in m and o not in self.excluded]
                expired = sorted((lu, o) for o, (_, lu) in m.items() if lu < deadline)
                if free:
                    offset = free[0]
                elif expired:
                    offset = expired[0][1]
                    del m[offset]
                    self.drop_orphan_targets()
                else:
                    results.append(PoolExhausted(node, domain))
                    continue
                m[offset] = [domain, t]
            if targets and domain not in self.targets:
                self.targets[domain] = tuple(sorted(set(targets)))
            results.append(self.space.address(offset))
        return results

    def touch(self, entries: list[tuple[str, int, str, float]]) -> None:
        for node, address, domain, at in entries:
            self.saw(at)
            t = self.clock  # a mark is a use now, on the pool clock (the proposer's time is not trusted)
            offset = self.space.offset(address)
            entry = self.maps.get(node, {}).get(offset) if offset is not None else None
            if entry is not None and entry[0] == domain and t > entry[1]:
                entry[1] = t

    def set_targets(self, domain: str, targets: tuple[int, ...], now: float) -> None:
        self.saw(now)
        if domain in self.mapped_domains():
            if targets:
                self.targets[domain] = tuple(sorted(set(targets)))
            else:
                self.targets.pop(domain, None)

    def forget(self, nodes: list[str], now: float) -> None:
        self.saw(now)
        for node in nodes:
            self.maps.pop(node, None)
        self.drop_orphan_targets()

    def set_excluded(self, addresses: list[int], now: float) -> None:
        self.exclude(addresses, sorted(self.space.address(o) for o in self.excluded), now)

    def exclude(self, added: list[int], lifted: list[int], now: float) -> None:
        self.saw(now)
        add = {o for o in map(self.space.offset, added) if o}
        self.excluded = (self.excluded - {o for o in map(self.space.offset, lifted) if o}) | add
        for m in self.maps.values():
            for o in list(m):
                if o in self.excluded:
                    del m[o]
        self.drop_orphan_targets()

    def view(self) -> set[tuple[str, str, int, float]]:
        return {(n, dom, self.space.address(o), lu) for n, m in self.maps.items() for o, (dom, lu) in m.items()}


def state_view(state: PoolState) -> set[tuple[str, str, int, float]]:
    return {(m.node, m.domain, m.address, m.last_used) for m in state.mappings()}


def same_results(got: list[object], want: list[object]) -> bool:
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        if isinstance(w, PoolExhausted):
            if not (isinstance(g, PoolExhausted) and (g.node, g.domain) == (w.node, w.domain)):
                return False
        elif g != w:
            return False
    return True


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[Any, ...]] = []
        self.now = 10_000.0
        self.last_checkout: tuple[Any, ...] | None = None

    @initialize(pool=st.sampled_from(POOLS))
    def start(self, pool: list[str]) -> None:
        self.prefixes = pool
        self.state = PoolState(pool)
        self.ref = Reference(pool)
        self.pool_addresses = [self.ref.space.address(o) for o in range(self.ref.space.size)]

    def run(self, command: tuple[Any, ...]) -> object:
        self.log.append(command)
        result, _ = self.state.apply(command)
        return result

    def advance(self, step: int) -> float:
        # mostly small steps and ties; sometimes backwards (a slow proposer) or a jump (a fast one)
        self.now = max(0.0, self.now + step)
        return self.now

    @rule(requests=st.lists(st.tuples(st.sampled_from(NODES), st.sampled_from(DOMAINS), TARGETS),
                            min_size=1, max_size=4),
          step=st.sampled_from([0, 0, 1, 5, 30, 120, -40, 1000]), reuse=st.sampled_from([0, 1, 5, 30, 60, 200]))
    def checkout(self, requests: list[tuple[str, str, tuple[int, ...]]], step: int, reuse: int) -> None:
        now = self.advance(step)
        deadline = now - reuse
        before = {(m.node, m.address): (m.domain, m.last_used) for m in self.state.mappings()}
        clock = self.state.clock
        result = self.run(("checkout_batch", tuple((n, d, t, 60.0) for n, d, t in requests), now, deadline))
        assert isinstance(result, list)
        assert same_results(result, self.ref.checkout(requests, now, deadline)), (result, requests)
        # an address changes domain only when its last use was before the deadline passed in, and it had
        # been idle for the whole window on the pool clock, which the command did not move
        assert self.state.clock == clock or clock == 0.0
        for m in self.state.mappings():
            old = before.get((m.node, m.address))
            if old is not None and old[0] != m.domain:
                assert old[1] < deadline and old[1] < clock - (now - deadline), (m, old, deadline, clock)
        self.last_checkout = (requests, now, deadline, result, len(self.log))

    @precondition(lambda self: self.last_checkout is not None and self.last_checkout[4] == len(self.log))
    @rule()
    def retry_last_checkout(self) -> None:
        # pysyncobj may report an applied write as failed; the proposer's retry right after it
        # must give the same answers (idempotent) and leave the state as it was, skewed or not
        requests, now, deadline, first, _ = self.last_checkout
        before = self.state.to_bytes()
        result = self.run(("checkout_batch", tuple((n, d, t, 60.0) for n, d, t in requests), now, deadline))
        assert isinstance(result, list)
        assert same_results(result, first)
        assert same_results(result, self.ref.checkout(requests, now, deadline))
        assert self.state.to_bytes() == before
        self.last_checkout = (requests, now, deadline, first, len(self.log))

    @rule(step=st.sampled_from([0, 1, 5, 30, 120, 1000, -20]))
    def tick(self, step: int) -> None:
        # the leader's reading: the pool clock plus time it measured (a stale leader's may be behind)
        value = max(0.0, self.ref.clock + step)
        self.run(("tick", value))
        self.ref.tick(value)

    @rule(data=st.data(), step=st.sampled_from([0, 1, 20, -30, 2000]))
    def touch(self, data: st.DataObject, step: int) -> None:
        mapped = [(m.node, m.address, m.domain) for m in self.state.mappings()]
        choices = st.tuples(st.sampled_from(NODES), st.sampled_from(self.pool_addresses), st.sampled_from(DOMAINS))
        if mapped:
            choices = st.one_of(st.sampled_from(mapped), choices)
        picked = data.draw(st.lists(choices, max_size=4))
        at = self.advance(step)
        entries = [(n, a, d, at - i) for i, (n, a, d) in enumerate(picked)]
        self.run(("touch_batch", tuple(entries)))
        self.ref.touch(entries)

    @rule(domain=st.sampled_from(DOMAINS), addresses=TARGETS, step=st.sampled_from([0, 10]))
    def set_targets(self, domain: str, addresses: tuple[int, ...], step: int) -> None:
        now = self.advance(step)
        self.run(("set_targets", domain, addresses, 30.0, now))
        self.ref.set_targets(domain, addresses, now)

    @rule(nodes=st.lists(st.sampled_from([*NODES, "stranger"]), max_size=2))
    def forget(self, nodes: list[str]) -> None:
        self.run(("forget", tuple(nodes), self.now))
        self.ref.forget(nodes, self.now)

    @rule(data=st.data())
    def set_excluded(self, data: st.DataObject) -> None:
        addresses = data.draw(st.lists(st.sampled_from([*self.pool_addresses, 0x0A000001]), max_size=3))
        self.run(("set_excluded", tuple(addresses), self.now))
        self.ref.set_excluded(addresses, self.now)

    @rule(data=st.data())
    def exclude(self, data: st.DataObject) -> None:
        pick = st.lists(st.sampled_from([*self.pool_addresses, 0x0A000001]), max_size=3)
        added, lifted = data.draw(pick), data.draw(pick)
        self.run(("exclude", tuple(added), tuple(lifted), self.now))
        self.ref.exclude(added, lifted, self.now)

    @rule()
    def snapshot_round_trip(self) -> None:
        data = self.state.to_bytes()
        restored = PoolState.from_bytes(data, list(reversed(self.prefixes)))
        assert restored.to_bytes() == data
        self.state = restored  # carry on from the restored copy: it must behave exactly the same

    @invariant()
    def matches_reference(self) -> None:
        assert state_view(self.state) == self.ref.view()
        assert self.state.clock == self.ref.clock
        for domain in DOMAINS:
            assert self.state.targets(domain) == self.ref.targets.get(domain, ())

    @invariant()
    def maps_are_inverse_and_inside_the_pool(self) -> None:
        space = self.state.space
        excluded = set(self.state.excluded())
        per_node: dict[str, set[int]] = {}
        for m in self.state.mappings():
            assert m.address in space and m.address != space.dns_address and m.address not in excluded
            assert self.state.domain_for(m.node, m.address) == m.domain
            assert self.state.lookup(m.node, m.domain) == (m.address, m.last_used)
            assert m.address not in per_node.setdefault(m.node, set()), "one address, two domains"
            per_node[m.node].add(m.address)
        for node in NODES:
            for a in self.pool_addresses:
                d = self.state.domain_for(node, a)
                assert d is None or self.state.lookup(node, d) == (a, self.state.lookup(node, d)[1])  # type: ignore[index]
        assert self.state.stats()["mappings"] == sum(len(v) for v in per_node.values())

    @precondition(lambda self: len(self.log) > 0)
    @invariant()
    def replay_gives_the_same_bytes(self) -> None:
        if len(self.log) % 7:  # replay costs O(log); every 7th step is plenty
            return
        replica = PoolState(self.prefixes)
        for command in self.log:
            replica.apply(command)
        assert replica.to_bytes() == self.state.to_bytes()
        assert replica.digest() == self.state.digest()

    def teardown(self) -> None:
        if not hasattr(self, "state"):
            return
        replica = PoolState(self.prefixes)
        for command in self.log:
            replica.apply(command)
        assert replica.to_bytes() == self.state.to_bytes()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = SETTINGS


@SETTINGS
@given(
    pool=st.sampled_from(POOLS),
    new_pool=st.sampled_from([["100.64.1.0/30"], ["100.64.1.2/31", "100.64.9.0/30"], ["100.64.1.4/30"],
                              ["100.64.1.0/29", "100.64.4.4/32"]]),
    requests=st.lists(st.tuples(st.sampled_from(NODES), st.sampled_from(DOMAINS)), max_size=25),
    excluded=st.lists(st.integers(0, 7).map(lambda i: 0x64400100 + i), max_size=2),
    more=st.lists(st.tuples(st.sampled_from(NODES), st.sampled_from(DOMAINS)), max_size=10),
)
def test_restore_into_another_pool_keeps_what_fits_and_allocates_like_the_reference(
        pool: list[str], new_pool: list[str], requests: list[tuple[str, str]], excluded: list[int],
        more: list[tuple[str, str]]) -> None:
    state = PoolState(pool)
    state.set_excluded(excluded, 1000.0)
    for i, (node, domain) in enumerate(requests):
        state.checkout_batch([(node, domain, (), 60.0)], 1000.0 + i, 1000.0 + i - 5)
    restored = PoolState.from_bytes(state.to_bytes(), new_pool)
    new_space = AddressSpace(new_pool)
    ref = Reference(new_pool)
    ref.clock = state.clock
    ref.excluded = {o for o in map(new_space.offset, state.excluded()) if o}
    for m in state.mappings():
        o = new_space.offset(m.address)
        if o:  # inside the new pool and not its DNS address
            ref.maps.setdefault(m.node, {})[o] = [m.domain, m.last_used]
    assert state_view(restored) == ref.view()
    now = state.clock
    for node, domain in more:
        now += 3
        restored.tick(now)
        ref.tick(now)
        got, _ = restored.checkout_batch([(node, domain, (), 60.0)], now, now - 4)
        assert same_results(got, ref.checkout([(node, domain, ())], now, now - 4))
    assert state_view(restored) == ref.view()
    assert PoolState.from_bytes(restored.to_bytes(), new_pool).to_bytes() == restored.to_bytes()


@settings(max_examples=200 if LONG else 30, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400), st.integers(0, 255))
def test_damaged_snapshots_raise_value_error_only(noise: bytes, at: int, xor: int) -> None:
    state = PoolState(["100.64.1.0/29"])
    state.checkout_batch([("n", "a", (1,), 60.0), ("m", "b", (), 60.0)], 1000.0, 0.0)
    data = bytearray(state.to_bytes())
    if at < len(data) and xor:
        data[at] ^= xor
        candidates = [bytes(data), noise, bytes(data[:at]) + noise]
    else:
        candidates = [noise, bytes(data) + noise[:1]]
    for candidate in candidates:
        try:
            restored = PoolState.from_bytes(candidate, ["100.64.1.0/29"])
        except ValueError:
            continue
        assert restored.to_bytes() == candidate  # only an intact snapshot is accepted


JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.just(10**400)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5) | st.binary(max_size=3),
    lambda inner: st.tuples(inner, inner) | st.tuples(inner, inner, inner, inner) | st.lists(inner, max_size=3),
    max_leaves=12,
)
COMMAND_NAMES = st.sampled_from(["checkout_batch", "touch_batch", "set_targets", "forget", "set_excluded", "exclude",
                                 "tick", "x"])


@settings(max_examples=600 if LONG else 100, deadline=None)
@given(commands=st.lists(st.one_of(
    st.tuples(COMMAND_NAMES).flatmap(lambda n: st.lists(JUNK, max_size=5).map(lambda rest: (*n, *rest))),
    JUNK,
), max_size=8))
def test_apply_never_raises_and_the_state_stays_sound(commands: list[Any]) -> None:
    state = PoolState(["100.64.1.0/29"])
    state.checkout_batch([("n", "a", (), 60.0)], 1000.0, 0.0)
    for command in commands:
        result, _ = state.apply(command)
        assert result is None or isinstance(result, list | Exception)
    data = state.to_bytes()
    assert PoolState.from_bytes(data, ["100.64.1.0/29"]).to_bytes() == data
    for m in state.mappings():
        assert state.domain_for(m.node, m.address) == m.domain
