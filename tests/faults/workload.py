"""Concurrent clients that record what they asked and what they were told, and a nemesis thread.

A :class:`Target` is one way to reach one pool member: its JSON-lines driver (``cluster.MemberTarget``)
or a connector's DNS server (``dnsclient.DnsTarget``). Clients pick a target, a node and a domain at
random and record every operation in a :class:`~tests.faults.history.History`; an operation whose answer
did not come is recorded as unknown (it may or may not have happened).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tests.faults.history import DOMAIN_FOR, LOOKUP, TOUCH, History


class Exhausted(Exception):
    """A definite failure: the pool said no, nothing changed."""


class Unavailable(Exception):
    """No answer, or an error that may hide an applied write (timeouts, no leader, SERVFAIL)."""


class Target(Protocol):
    name: str
    kind: str  # CHECKOUT (a checkout that always refreshes) or RESOLVE (a DNS answer: hit or checkout)

    def checkout(self, node: str, domain: str, timeout: float) -> int: ...

    def lookup(self, node: str, domain: str, timeout: float) -> int | None: ...

    def domain_for(self, node: str, address: int, timeout: float) -> str | None: ...

    def touch(self, node: str, address: int, domain: str, at: float, timeout: float) -> bool: ...


@dataclass
class Mix:
    """What clients do. Weights of checkout / lookup / domain_for / touch."""

    nodes: Sequence[str] = ("n1", "n2", "n3")
    domains: Sequence[str] = tuple(f"d{i}.example.com" for i in range(12))
    checkout: float = 0.7
    lookup: float = 0.15
    domain_for: float = 0.1
    touch: float = 0.05
    timeout: float = 3.0
    think: float = 0.005           # pause between a client's operations
    stale_reads: bool = True       # reads are local (docs/design.md §3): allowed to lag, not to invent


@dataclass
class Stats:
    ok: int = 0
    unknown: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def run_clients(history: History, targets: Callable[[], Sequence[Target]], mix: Mix, clients: int,
                duration: float, seed: int = 1, stop: threading.Event | None = None) -> Stats:
    """Run ``clients`` threads for ``duration`` seconds; ``targets()`` gives the members usable now."""
    stats = Stats()
    lock = threading.Lock()
    stop = stop or threading.Event()
    deadline = time.monotonic() + duration
    seen: dict[tuple[str, str], int] = {}   # (node, domain) → an address this client pool saw

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        name = f"c{i}"
        while not stop.is_set() and time.monotonic() < deadline:
            live = list(targets())
            if not live:
                time.sleep(0.05)
                continue
            t = rng.choice(live)
            node = rng.choice(mix.nodes)
            dom = rng.choice(mix.domains)
            r = rng.random() * (mix.checkout + mix.lookup + mix.domain_for + mix.touch)
            try:
                if r < mix.checkout:
                    op = history.invoke(name, t.kind, node, domain=dom)
                    try:
                        addr = t.checkout(node, dom, mix.timeout)
                    except Exhausted as e:
                        history.fail(op, f"{t.name}: {e}")
                        with lock:
                            stats.failed += 1
                        continue
                    history.ok(op, address=addr, note=t.name)
                    with lock:
                        seen[(node, dom)] = addr
                        stats.ok += 1
                elif r < mix.checkout + mix.lookup:
                    op = history.invoke(name, LOOKUP, node, domain=dom, stale_ok=mix.stale_reads)
                    history.ok(op, address=t.lookup(node, dom, mix.timeout), note=t.name)
                    with lock:
                        stats.ok += 1
                else:
                    with lock:
                        known = list(seen.items())
                    if not known:
                        continue
                    (node, dom), addr = rng.choice(known)
                    if r < mix.checkout + mix.lookup + mix.domain_for:
                        op = history.invoke(name, DOMAIN_FOR, node, address=addr, stale_ok=mix.stale_reads)
                        history.ok(op, domain=t.domain_for(node, addr, mix.timeout), note=t.name)
                    else:
                        at = history.now()
                        op = history.invoke(name, TOUCH, node, domain=dom, address=addr, at=at)
                        if t.touch(node, addr, dom, at, mix.timeout):
                            history.ok(op, note=t.name)
                        else:
                            history.unknown(op, f"{t.name}: queued")
                    with lock:
                        stats.ok += 1
            except Unavailable as e:
                history.unknown(op, f"{t.name}: {e}")
                with lock:
                    stats.unknown += 1
            except Exception as e:  # a harness bug must be seen, not hidden as "unknown"
                history.unknown(op, f"{t.name}: {type(e).__name__}: {e}")
                with lock:
                    stats.unknown += 1
                    stats.errors.append(f"{t.name}: {type(e).__name__}: {e}")
            if mix.think:
                time.sleep(rng.random() * mix.think)

    threads = [threading.Thread(target=client, args=(i,), name=f"acfault-client-{i}", daemon=True)
               for i in range(clients)]
    for th in threads:
        th.start()
    hard_deadline = time.monotonic() + duration + mix.timeout + 10
    for th in threads:
        th.join(max(0.0, hard_deadline - time.monotonic()))
    stuck = [th.name for th in threads if th.is_alive()]
    if stuck:  # an operation that ignores its timeout is a harness bug: make the test fail on it
        stop.set()
        stats.errors.append(f"client threads still running {mix.timeout + 10:g}s after the run ended: {stuck}")
    return stats


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float | None = None
    detail: str = ""


class FaultLog:
    def __init__(self) -> None:
        self.faults: list[Fault] = []
        self._lock = threading.Lock()

    def begin(self, kind: str, target: str, detail: str = "") -> Fault:
        f = Fault(kind, target, time.time(), detail=detail)
        with self._lock:
            self.faults.append(f)
        return f

    def end(self, f: Fault) -> None:
        f.end = time.time()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.faults:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out


