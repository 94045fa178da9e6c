"""A recorded history of pool operations and a linearizability checker for it.

Clients record every operation as an invocation and a completion (wall times from one clock, the
harness's). The checker decides whether every answer a client saw is consistent with one sequential
order of the operations that respects real time (an operation that completed before another was
invoked comes first), under a model of the pool semantics (docs/design.md §3):

* a (node, domain) keeps its address until that address is reassigned to another domain of the same
  node, which is allowed only once the mapping's last use is older than ``reuse_after``;
* an address means at most one domain for a node at a time;
* an operation that timed out (``unknown``) may or may not have taken effect; a definite failure
  (pool exhausted) changed nothing.

The search is Wing & Gong's with Lowe's memoisation (as in Porcupine), partitioned per (node, domain)
and per (node, address): every operation touches one or two keys, and a history is linearizable for
this model only if each partition is. Partitioning makes the search cheap but it is a necessary, not a
sufficient, condition for unknown operations (one unknown checkout may be placed with different
addresses in different partitions); definite answers are checked exactly.

Times: the replica stamps a command with its proposer's clock, somewhere inside the operation's
[call, return] window. Last-used times are therefore tracked as lower bounds (the call time of the last
operation that certainly refreshed the mapping), and a reassignment is allowed when even that lower
bound is old enough at the latest moment the reassigning command could have been stamped. This is
permissive on purpose: an anomaly reported is a real one. ``clock_slack`` widens the window for a
member whose clock is skewed.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INF = float("inf")

# Operation kinds.
CHECKOUT = "checkout"      # PoolAccess.checkout: node, domain → address. A success refreshes last-used.
RESOLVE = "resolve"        # a DNS A answer: a local hit or a checkout, so last-used may or may not move.
LOOKUP = "lookup"          # local read: (node, domain) → address | None
DOMAIN_FOR = "domain_for"  # local read: (node, address) → domain | None
TOUCH = "touch"            # last-used mark (node, address, domain, at); acknowledged only if the harness saw it applied
KINDS = (CHECKOUT, RESOLVE, LOOKUP, DOMAIN_FOR, TOUCH)

OK = "ok"
FAIL = "fail"        # definite failure: nothing changed (pool exhausted)
UNKNOWN = "unknown"  # timed out or failed in a way that may have applied (ReplicaUnavailable, SERVFAIL)


def fmt_addr(a: int | None) -> str:
    return "-" if a is None else str(ipaddress.IPv4Address(a))


def as_addr(a: int | str | None) -> int | None:
    if a is None:
        return None
    return int(ipaddress.IPv4Address(a)) if isinstance(a, str) else int(a)


@dataclass
class Op:
    """One operation. For CHECKOUT/RESOLVE/LOOKUP the result is ``address``; for DOMAIN_FOR it is
    ``domain``. ``ret`` is None while pending and for unknown outcomes (treated as never returning)."""

    id: int
    client: str
    kind: str
    node: str
    domain: str | None
    address: int | None
    call: float
    ret: float | None = None
    status: str = UNKNOWN
    at: float | None = None   # touch time
    note: str = ""            # where it came from (member, error text)
    candidates: tuple[int, ...] = ()  # unknown checkouts: the addresses it could have returned (set by check)
    stale_ok: bool = False    # a local read of a replica that may lag: may observe any earlier state

    def describe(self) -> str:
        window = f"[{self.call:.3f} .. {'∞' if self.ret is None else f'{self.ret:.3f}'}]"
        if self.kind in (CHECKOUT, RESOLVE):
            res = fmt_addr(self.address) if self.status == OK else self.status
            text = f"{self.kind}({self.node}, {self.domain}) → {res}"
        elif self.kind == LOOKUP:
            text = f"lookup({self.node}, {self.domain}) → {fmt_addr(self.address)}"
        elif self.kind == DOMAIN_FOR:
            text = f"domain_for({self.node}, {fmt_addr(self.address)}) → {self.domain or '-'}"
        else:
            text = f"touch({self.node}, {fmt_addr(self.address)}, {self.domain}, at={self.at}) {self.status}"
        extra = f" ({self.note})" if self.note else ""
        return f"op#{self.id} {self.client} {text} {window}{extra}"

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("id", "client", "kind", "node", "domain", "address", "call", "ret",
                                               "status", "at", "note", "stale_ok")}


class History:
    """Thread-safe recorder. ``invoke`` before sending, then exactly one of ``ok``/``fail``/``unknown``;
    an operation never completed counts as unknown."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        import time
        self._clock = clock or time.time
        self._lock = threading.Lock()
        self.ops: list[Op] = []

    def now(self) -> float:
        return self._clock()

    def invoke(self, client: str, kind: str, node: str, domain: str | None = None,
               address: int | str | None = None, at: float | None = None, call: float | None = None,
               stale_ok: bool = False) -> Op:
        """Record a call. ``stale_ok``: a read of one replica's local state, which the product allows to
        lag behind the cluster (it may be placed anywhere before its return, not only after its call)."""
        if kind not in KINDS:
            raise ValueError(f"unknown operation kind {kind!r}")
        with self._lock:
            op = Op(len(self.ops), client, kind, node, domain, as_addr(address),
                    self.now() if call is None else call, at=at, stale_ok=stale_ok)
            self.ops.append(op)
            return op

    def ok(self, op: Op, *, address: int | str | None = None, domain: str | None = None,
           ret: float | None = None, note: str = "") -> Op:
        """Complete ``op``. Pass the result: ``address`` for checkout/resolve/lookup (None = not mapped),
        ``domain`` for domain_for (None = not mapped)."""
        op.ret = self.now() if ret is None else ret
        op.status = OK
        if op.kind in (CHECKOUT, RESOLVE, LOOKUP):
            op.address = as_addr(address)
        elif op.kind == DOMAIN_FOR:
            op.domain = domain
        op.note = note or op.note
        return op

    def fail(self, op: Op, note: str = "", ret: float | None = None) -> Op:
        op.ret = self.now() if ret is None else ret
        op.status = FAIL
        op.note = note or op.note
        return op

    def unknown(self, op: Op, note: str = "") -> Op:
        op.ret = None
        op.status = UNKNOWN
        op.note = note or op.note
        return op

    def record_state(self, member: str, mappings: Iterable[tuple[str, str, int]], at: float | None = None) -> None:
        """A replica's whole state read at one moment (after the run): every (node, domain, address) it
        holds becomes a read, and so does the absence of every (node, domain) and (node, address) that
        the history mentions but the replica does not hold."""
        t = self.now() if at is None else at
        held = {(n, d): a for n, d, a in mappings}
        by_addr = {(n, a): d for (n, d), a in held.items()}
        with self._lock:
            known_nd = {(o.node, o.domain) for o in self.ops if o.domain is not None}
            known_na = {(o.node, o.address) for o in self.ops if o.address is not None}
        for (n, d), a in sorted(held.items()):
            op = self.invoke(f"state:{member}", LOOKUP, n, domain=d, call=t)
            self.ok(op, address=a, ret=t, note=f"state of {member}")
        for n, d in sorted(known_nd - set(held), key=str):
            assert d is not None
            op = self.invoke(f"state:{member}", LOOKUP, n, domain=d, call=t)
            self.ok(op, address=None, ret=t, note=f"state of {member}")
        for n, a in sorted(known_na - set(by_addr), key=str):
            op = self.invoke(f"state:{member}", DOMAIN_FOR, n, address=a, call=t)
            self.ok(op, domain=None, ret=t, note=f"state of {member}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(json.dumps(o.to_json()) for o in self.ops) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> History:
        h = cls()
        for line in Path(path).read_text().splitlines():
            if line.strip():
                h.ops.append(Op(**json.loads(line)))
        return h

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.ops:
            k = f"{o.kind}:{o.status}"
            out[k] = out.get(k, 0) + 1
        return out


# ---- the model --------------------------------------------------------------------------------------

# Partition states. By domain: (address, last-used lower bound); by address: (domain, lower bound).
# The lower bound is None when no mapping exists.
DomainState = tuple[int | None, float | None]
AddressState = tuple[str | None, float | None]
State = tuple[Any, float | None]


def _later(lb: float | None, t: float) -> float:
    return t if lb is None else max(lb, t)


@dataclass(frozen=True)
class Model:
    reuse_after: float
    clock_slack: float = 0.0
    timeless: bool = False
    """No reassignment can happen within the history (reuse_after longer than it): last-used bounds are
    not tracked, which keeps the search's states few (Lowe's cache then prunes almost everything)."""

    def evictable(self, lb: float | None, latest: float) -> bool:
        """May a mapping last used no earlier than ``lb`` be reassigned by a command stamped by ``latest``?"""
        if lb is None:
            return True
        if self.timeless:
            return False
        return lb + self.reuse_after < latest + self.clock_slack

    def stamp(self, op: Op) -> float:
        """The earliest the command of ``op`` could have been stamped."""
        return 0.0 if self.timeless else op.call - self.clock_slack

    def touched(self, op: Op) -> float:
        assert op.at is not None
        return 0.0 if self.timeless else op.at - self.clock_slack

    def lb_text(self, lb: float | None) -> str:
        if lb is None:
            return "never"
        return "within the history" if self.timeless else f"≥ {lb:.3f}"

    # Per (node, domain): the value is the address.
    def step_domain(self, st: State, op: Op) -> tuple[list[State], str]:
        addr, lb = st
        latest = INF if op.ret is None else op.ret
        if op.kind in (CHECKOUT, RESOLVE):
            if op.status == FAIL:
                return [st], ""
            cands = [op.address] if op.status == OK else list(op.candidates)
            outs: list[State] = [st] if op.status == UNKNOWN else []
            for a in cands:
                if addr == a:
                    outs.append((a, _later(lb, self.stamp(op)) if op.kind == CHECKOUT else lb))
                elif addr is None or self.evictable(lb, latest):
                    outs.append((a, self.stamp(op)))
            if outs:
                return outs, ""
            reason = (f"({op.node}, {op.domain}) held {fmt_addr(addr)} (last used {self.lb_text(lb)}, "
                      f"reusable only after {self.reuse_after:g}s), yet {fmt_addr(op.address)} was answered: "
                      f"an acknowledged mapping was lost")
            return outs, reason
        if op.kind in (LOOKUP, DOMAIN_FOR):
            want = op.address
            if want == addr:
                return [st], ""
            if want is None and self.evictable(lb, latest):
                return [(None, None)], ""
            reason = (f"read {fmt_addr(want)} for ({op.node}, {op.domain}) but the latest acknowledged value is "
                      f"{fmt_addr(addr)} (last used {self.lb_text(lb)})"
                      + (": a stale read or lost write" if addr is not None else ": never allocated"))
            return [], reason
        # touch: it refreshes the mapping if it still exists; the address may have been reassigned (an
        # eviction this partition cannot see), which turns the touch into a no-op.
        if op.status == OK and addr == op.address and op.at is not None:
            outs = [(addr, _later(lb, self.touched(op)))]
            if self.evictable(lb, latest):
                outs.append((None, None))
            return outs, ""
        return [st], ""

    # Per (node, address): the value is the domain.
    def step_address(self, st: State, op: Op) -> tuple[list[State], str]:
        dom, lb = st
        latest = INF if op.ret is None else op.ret
        if op.kind in (CHECKOUT, RESOLVE):
            if op.status == FAIL:
                return [st], ""
            outs: list[State] = [st] if op.status == UNKNOWN else []
            d = op.domain
            if dom == d:
                outs.append((d, _later(lb, self.stamp(op)) if op.kind == CHECKOUT else lb))
            elif dom is None or self.evictable(lb, latest):
                outs.append((d, self.stamp(op)))
            if outs:
                return outs, ""
            reason = (f"{fmt_addr(op.address)} already meant {dom} for node {op.node} "
                      f"(last used {self.lb_text(lb)}, reusable only after {self.reuse_after:g}s), "
                      f"yet it was answered for {d}: one address, two domains")
            return outs, reason
        if op.kind in (LOOKUP, DOMAIN_FOR):
            want = op.domain
            if want == dom:
                return [st], ""
            reason = (f"read {fmt_addr(op.address)} → {want or '-'} for node {op.node} but the latest "
                      f"acknowledged owner is {dom or '-'}: a stale read or lost write")
            return [], reason
        if op.status == OK and dom == op.domain and op.at is not None:
            return [(dom, _later(lb, self.touched(op)))], ""
        return [st], ""


# ---- the search -------------------------------------------------------------------------------------


@dataclass
class _Entry:
    op: Op
    is_call: bool
    index: int
    match: _Entry | None = None
    prev: _Entry | None = None
    next: _Entry | None = None


@dataclass
class Anomaly:
    partition: str
    op: Op
    reasons: list[str]
    order: list[Op]          # the longest prefix that could be ordered (last ops shown)
    state: str

    def explain(self) -> str:
        lines = [f"not linearizable: {self.partition}",
                 f"  cannot place {self.op.describe()}"]
        lines += [f"  because {r}" for r in dict.fromkeys(self.reasons) if r]
        lines.append(f"  after ordering {len(self.order)} operations, state {self.state}; the last of them:")
        lines += [f"    {o.describe()}" for o in self.order[-5:]]
        return "\n".join(lines)


@dataclass
class Verdict:
    ok: bool
    operations: int
    partitions: int
    anomalies: list[Anomaly] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def explain(self) -> str:
        head = (f"{self.operations} operations in {self.partitions} partitions: "
                + ("linearizable" if self.ok else f"{len(self.anomalies)} anomalies"))
        return "\n".join([head, *(a.explain() for a in self.anomalies)])


SEARCH_BUDGET = 300_000
"""Steps tried per partition before the search gives up (reported as an anomaly: undecided)."""


def _linearize(ops: list[Op], step: Callable[[State, Op], tuple[list[State], str]], init: State,
               name: str, state_text: Callable[[State], str], budget: int | None = None) -> Anomaly | None:
    """Wing-Gong search with Lowe's cache over one partition; None when linearizable.

    Reads that may lag (``stale_ok``) are not searched (each could go anywhere before its return, which
    makes the search exponential): once the other operations are ordered, each such read must match a
    state of that order reached by operations invoked before the read returned.
    """
    budget = SEARCH_BUDGET if budget is None else budget
    lagging = [o for o in ops if o.stale_ok]
    ops = [o for o in ops if not o.stale_ok]
    if not ops:
        ops_states: list[tuple[Op | None, State]] = [(None, init)]
        return _check_lagging(lagging, ops_states, step, name, state_text)
    events: list[tuple[float, int, int, Op, bool]] = []
    for i, op in enumerate(ops):
        events.append((-INF if op.stale_ok else op.call, 0, i, op, True))
        events.append((INF if op.ret is None else op.ret, 1, i, op, False))
    events.sort(key=lambda e: (e[0], e[1], e[2]))   # a call at the same instant as a return: concurrent
    head = _Entry(ops[0], True, -1)
    prev = head
    calls: dict[int, _Entry] = {}
    for _, _, i, op, is_call in events:
        e = _Entry(op, is_call, i, prev=prev)
        prev.next = e
        prev = e
        if is_call:
            calls[i] = e
        else:
            calls[i].match = e

    def lift(e: _Entry) -> None:
        assert e.prev is not None and e.match is not None and e.match.prev is not None
        e.prev.next = e.next
        if e.next:
            e.next.prev = e.prev
        m = e.match
        m.prev.next = m.next  # type: ignore[union-attr]
        if m.next:
            m.next.prev = m.prev

    def unlift(e: _Entry) -> None:
        m = e.match
        assert m is not None and m.prev is not None and e.prev is not None
        m.prev.next = m
        if m.next:
            m.next.prev = m
        e.prev.next = e
        if e.next:
            e.next.prev = e

    # Lagging reads are matched as the order grows: ``seen`` has a bit for each read that a state of the
    # order so far matches, reached only by operations invoked before the read returned (a replica's
    # state is a prefix of the log). It is part of the cache key: two orders that reach the same state
    # may differ in what the lagging reads could have seen on the way.
    rets = [INF if r.ret is None else r.ret for r in lagging]
    everything = (1 << len(lagging)) - 1

    def sees(seen: int, last_call: float, st: State) -> int:
        for i, r in enumerate(lagging):
            if not seen >> i & 1 and last_call < rets[i] and step(st, r)[0]:
                seen |= 1 << i
        return seen

    state = init
    done = 0
    seen = sees(0, -INF, init)
    last_call = -INF  # the latest invocation among the operations placed
    cache: set[tuple[int, State, int]] = set()
    stack: list[tuple[_Entry, State, list[State], int, float]] = []
    best: tuple[int, list[Op], State] = (-1, [], init)
    entry = head.next
    tried = 0
    lag_anomaly: Anomaly | None = None
    while True:
        if head.next is None:
            # Every operation placed: the lagging reads must fit this order. If they do not, another order
            # (e.g. an unknown checkout that did take effect, which a lagging read then saw) may: go on.
            if seen == everything:
                return None
            lag_anomaly = lag_anomaly or _check_lagging(lagging, _order_states(stack, state, init), step, name,
                                                        state_text)
        else:
            assert entry is not None
            tried += 1
            if tried > budget:
                anomaly = _explain(ops, step, best, name, state_text)
                anomaly.reasons.insert(0, f"undecided: the search tried {budget} steps (a very concurrent or "
                                          "very wrong history)")
                return anomaly
            if entry.is_call:
                bit = 1 << entry.index
                outs, _ = step(state, entry.op)
                after = max(last_call, entry.op.call)
                fresh = [(st, sees(seen, after, st)) for st in outs]
                fresh = [(st, sn) for st, sn in fresh if (done | bit, st, sn) not in cache]
                if fresh:
                    (nxt, nseen), rest = fresh[0], [st for st, _ in fresh[1:]]
                    cache.add((done | bit, nxt, nseen))
                    stack.append((entry, state, rest, seen, last_call))
                    lift(entry)
                    state, done, seen, last_call = nxt, done | bit, nseen, after
                    if len(stack) > best[0]:
                        best = (len(stack), [s[0].op for s in stack], state)
                    entry = head.next
                    continue
                entry = entry.next
                continue
        # Backtrack: a return of an operation not yet placed, or an order the lagging reads do not fit.
        if not stack:
            return lag_anomaly if lag_anomaly is not None else _explain(ops, step, best, name, state_text)
        top, before, rest, before_seen, before_call = stack.pop()
        unlift(top)
        done &= ~(1 << top.index)
        after = max(before_call, top.op.call)
        options = [(st, sees(before_seen, after, st)) for st in rest]
        options = [(st, sn) for st, sn in options if (done | (1 << top.index), st, sn) not in cache]
        if options:
            (nxt, nseen) = options[0]
            cache.add((done | (1 << top.index), nxt, nseen))
            stack.append((top, before, [st for st, _ in options[1:]], before_seen, before_call))
            lift(top)
            state, done, seen, last_call = nxt, done | (1 << top.index), nseen, after
            entry = head.next
        else:
            state, seen, last_call = before, before_seen, before_call
            entry = top.next

def _order_states(stack: list[tuple[_Entry, State, list[State], int, float]], state: State,
                  init: State) -> list[tuple[Op | None, State]]:
    """The state after each operation of a complete order (for the lagging reads). Each frame's
    successor state is the next frame's "before"; the last one's is the current state."""
    order_states: list[tuple[Op | None, State]] = [(None, init)]
    order_states += [(stack[i][0].op, stack[i + 1][1]) for i in range(len(stack) - 1)]
    if stack:
        order_states.append((stack[-1][0].op, state))
    return order_states


def _check_lagging(lagging: list[Op], order_states: list[tuple[Op | None, State]],
                   step: Callable[[State, Op], tuple[list[State], str]], name: str,
                   state_text: Callable[[State], str]) -> Anomaly | None:
    for read in sorted(lagging, key=lambda o: o.ret or INF):
        ret = INF if read.ret is None else read.ret
        seen: list[State] = []
        for op, st in order_states:
            if op is not None and op.call >= ret:
                break
            seen.append(st)
        if not any(step(st, read)[0] for st in seen):
            reason = step(seen[-1], read)[1]
            placed = [op for op, _ in order_states[1:len(seen)] if op is not None]
            return Anomaly(name, read, [f"{reason} (a lagging read: no state before it returned matches)"],
                           placed, state_text(seen[-1]))
    return None


def _explain(ops: list[Op], step: Callable[[State, Op], tuple[list[State], str]],
             best: tuple[int, list[Op], State], name: str, state_text: Callable[[State], str]) -> Anomaly:
    _, order, state = best
    placed = {o.id for o in order}
    # The operation that blocks: the earliest-returning one not placed in the deepest order.
    pending = sorted((o for o in ops if o.id not in placed), key=lambda o: (INF if o.ret is None else o.ret, o.call))
    stuck = pending[0]
    _, reason = step(state, stuck)
    reasons = [reason]
    if not reason:  # it fits here but something concurrent ordered before it does not: name those
        for o in pending[1:]:
            if o.call <= (stuck.ret or INF):
                r = step(state, o)[1]
                if r:
                    reasons.append(f"{r} [{o.describe()}]")
    return Anomaly(name, stuck, reasons, order, state_text(state))


def check(history: History | Iterable[Op], reuse_after: float, clock_slack: float = 0.0) -> Verdict:
    """Check every (node, domain) and (node, address) partition of ``history``."""
    ops = list(history.ops if isinstance(history, History) else history)
    times = [t for o in ops for t in (o.call, o.ret) if t is not None and t not in (INF, -INF)]
    span = (max(times) - min(times)) if times else 0.0
    model = Model(reuse_after, clock_slack, timeless=reuse_after > span + 2 * clock_slack + 1.0)
    by_domain: dict[tuple[str, str], list[Op]] = {}
    by_address: dict[tuple[str, int], list[Op]] = {}
    seen_addrs: dict[tuple[str, str], set[int]] = {}
    for o in ops:
        if o.status == OK and o.domain is not None and o.address is not None:
            seen_addrs.setdefault((o.node, o.domain), set()).add(o.address)
    checked = 0
    for o in ops:
        if o.status == FAIL and o.kind in (CHECKOUT, RESOLVE):
            checked += 1
            continue  # changed nothing, observed nothing
        if o.status == UNKNOWN and o.kind in (LOOKUP, DOMAIN_FOR):
            continue  # an unanswered read tells nothing
        if o.status == UNKNOWN and o.kind == TOUCH:
            continue  # may only raise last-used; the checker keeps lower bounds
        checked += 1
        assert o.domain is not None or o.kind == DOMAIN_FOR
        if o.kind in (CHECKOUT, RESOLVE) and o.status == UNKNOWN:
            assert o.domain is not None
            cands = sorted(seen_addrs.get((o.node, o.domain), set()))
            o.candidates = tuple(cands)
            by_domain.setdefault((o.node, o.domain), []).append(o)
            for a in cands:
                c = _copy(o, a)
                by_address.setdefault((o.node, a), []).append(c)
            continue
        if o.domain is not None:
            by_domain.setdefault((o.node, o.domain), []).append(o)
        if o.address is not None:
            by_address.setdefault((o.node, o.address), []).append(o)
    anomalies: list[Anomaly] = []
    for (n, d), part in sorted(by_domain.items()):
        a = _linearize(part, model.step_domain, (None, None), f"node {n} domain {d}",
                       lambda s, d=d: f"{d} → {fmt_addr(s[0])}")
        if a:
            anomalies.append(a)
    for (n, addr), part in sorted(by_address.items()):
        a = _linearize(part, model.step_address, (None, None), f"node {n} address {fmt_addr(addr)}",
                       lambda s, addr=addr: f"{fmt_addr(addr)} → {s[0] or '-'}")
        if a:
            anomalies.append(a)
    return Verdict(not anomalies, checked, len(by_domain) + len(by_address), anomalies,
                   History.counts(_as_history(ops)))


def _copy(o: Op, address: int) -> Op:
    return Op(o.id, o.client, o.kind, o.node, o.domain, address, o.call, o.ret, o.status, o.at, o.note,
              stale_ok=o.stale_ok)


def _as_history(ops: list[Op]) -> History:
    h = History()
    h.ops = ops
    return h


def no_two_domains(mappings: Iterable[tuple[str, str, int]]) -> list[str]:
    """Problems in one replica's state: an address held by two domains of one node."""
    owner: dict[tuple[str, int], str] = {}
    problems = []
    for n, d, a in mappings:
        if (n, a) in owner and owner[(n, a)] != d:
            problems.append(f"node {n}: {fmt_addr(a)} means both {owner[(n, a)]} and {d}")
        owner[(n, a)] = d
    return problems


__all__ = ["CHECKOUT", "DOMAIN_FOR", "FAIL", "LOOKUP", "OK", "RESOLVE", "TOUCH", "UNKNOWN", "Anomaly",
           "History", "Model", "Op", "Verdict", "check", "fmt_addr", "no_two_domains"]
