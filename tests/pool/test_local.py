"""LocalPool: the pool contracts (PoolAccess, ReplicaControl) in one process (what DNS and NAT tests run against)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from appconnector.pool.api import Changes, PoolExhausted, PoolReader, ReplicaUnavailable
from appconnector.pool.local import LocalPool
from appconnector.pool.state import InvalidCommand

T0 = 1_700_000_000.0


def ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An observer that also reads the pool from inside its callback (the state lock must be free)."""

    def __init__(self, pool: LocalPool) -> None:
        self.pool = pool
        self.resets: list[list[tuple[str, str, int]]] = []
        self.changes: list[Changes] = []
        self.seen_inside: list[str | None] = []

    def on_reset(self, reader: PoolReader) -> None:
        self.resets.append(sorted((m.node, m.domain, m.address) for m in reader.mappings()))

    def on_changes(self, changes: Changes) -> None:
        self.changes.append(changes)
        for node, address, _ in changes.added:
            self.seen_inside.append(self.pool.domain_for(node, address))


def sync(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop (no pytest asyncio plugin in this project)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


@sync
async def test_checkout_lookup_and_exhaustion() -> None:
    pool = LocalPool(["100.64.1.0/31", "100.64.1.2/32"], clock=Clock())
    await pool.start()
    try:
        a = await pool.checkout("n", "a.example", (ip("192.0.2.1"),), 60.0)
        assert a == ip("100.64.1.1")
        assert await pool.checkout("n", "a.example", (), 60.0) == a
        assert await pool.checkout("n", "b.example", (), 60.0) == ip("100.64.1.2")
        with pytest.raises(PoolExhausted) as e:
            await pool.checkout("n", "c.example", (), 60.0)
        assert e.value.node == "n" and e.value.domain == "c.example"
        assert pool.lookup("n", "a.example") == (a, T0)
        assert pool.domain_for("n", a) == "a.example"
        assert pool.targets("a.example") == (ip("192.0.2.1"),)
        assert {(m.domain, m.address) for m in pool.mappings()} == {("a.example", a), ("b.example", a + 1)}
        assert pool.is_leader() and pool.status()["role"] == "leader"
    finally:
        await pool.stop()


@sync
async def test_addresses_are_reused_after_reuse_after() -> None:
    clock = Clock()
    pool = LocalPool(["100.64.1.0/31"], reuse_after=120.0, clock=clock)
    a = await pool.checkout("n", "old", (), 60.0)
    clock.now += 60
    with pytest.raises(PoolExhausted):
        await pool.checkout("n", "new", (), 60.0)
    clock.now += 121
    assert await pool.checkout("n", "new", (), 60.0) == a
    assert pool.lookup("n", "old") is None


@sync
async def test_touches_are_coalesced_and_flushed_within_a_second() -> None:
    clock = Clock()
    pool = LocalPool(["100.64.1.0/29"], reuse_after=120.0, clock=clock, touch_flush_interval=0.2)
    recorder = Recorder(pool)
    pool.add_observer(recorder)
    await pool.start()
    try:
        a = await pool.checkout("n", "a", (), 60.0)
        clock.now = T0 + 60  # pool time moves on: a flushed mark stamps it
        for t in (T0 + 5, T0 + 50, T0 + 20):
            pool.touch("n", a, "a", t)
        pool.touch("n", a, "wrong-domain", T0 + 99)
        pool.touch("n", a, "a", "not a time")  # type: ignore[arg-type]  # dropped, never raises
        assert pool.status()["queued_touches"] == 2
        deadline = time.monotonic() + 3.0
        while pool.lookup("n", "a") != (a, T0 + 60):
            assert time.monotonic() < deadline, "touch not flushed in time"
            await asyncio.sleep(0.02)
        assert pool.status()["queued_touches"] == 0
        assert len(recorder.changes) == 1  # touches report no changes
        # the touch protects the address: at T0+150 it is only 90 s idle
        clock.now = T0 + 150
        a2 = await pool.checkout("n", "b", (), 60.0)
        assert a2 != a
    finally:
        await pool.stop()


@sync
async def test_stop_flushes_queued_touches_and_refuses_writes_after() -> None:
    clock = Clock()
    pool = LocalPool(["100.64.1.0/29"], clock=clock, touch_flush_interval=3600)
    await pool.start()
    a = await pool.checkout("n", "a", (), 60.0)
    clock.now = T0 + 30
    pool.touch("n", a, "a", T0 + 30)
    await pool.stop()
    assert pool.lookup("n", "a") == (a, T0 + 30)
    with pytest.raises(ReplicaUnavailable):
        await pool.checkout("n", "b", (), 60.0)


@sync
async def test_observers_get_a_reset_then_every_change_in_order() -> None:
    pool = LocalPool(["100.64.1.0/29"], clock=Clock())
    await pool.checkout("n", "a", (), 60.0)
    recorder = Recorder(pool)
    pool.add_observer(recorder)
    assert recorder.resets == [[("n", "a", ip("100.64.1.1"))]]
    await pool.checkout("n", "b", (ip("192.0.2.1"),), 60.0)
    await pool.checkout("n", "b", (), 60.0)  # a hit changes nothing
    await pool.set_targets("b", (ip("192.0.2.2"),), 30.0)
    await pool.set_excluded([ip("100.64.1.1")])
    await pool.forget(["n"])
    assert [(c.added, c.removed, c.targets) for c in recorder.changes] == [
        ([("n", ip("100.64.1.2"), "b")], [], {"b": (ip("192.0.2.1"),)}),
        ([], [], {"b": (ip("192.0.2.2"),)}),
        ([], [("n", ip("100.64.1.1"), "a")], {}),
        ([], [("n", ip("100.64.1.2"), "b")], {"b": ()}),
    ]
    assert recorder.seen_inside == ["b"]  # the observer could read the pool while being called


@sync
async def test_a_failing_observer_does_not_stop_the_others() -> None:
    pool = LocalPool(["100.64.1.0/29"], clock=Clock())

    class Broken:
        def on_reset(self, reader: PoolReader) -> None:
            pass

        def on_changes(self, changes: Changes) -> None:
            raise RuntimeError("boom")

    recorder = Recorder(pool)
    pool.add_observer(Broken())
    pool.add_observer(recorder)
    assert await pool.checkout("n", "a", (), 60.0) == ip("100.64.1.1")
    assert len(recorder.changes) == 1


@sync
async def test_bad_writes_raise_and_change_nothing() -> None:
    pool = LocalPool(["100.64.1.0/29"], clock=Clock())
    await pool.checkout("n", "a", (), 60.0)
    before = pool.digest()
    with pytest.raises(InvalidCommand):
        await pool.set_targets("a", ("not-an-address",), 30.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidCommand):
        await pool.checkout("n", "b", (), -1.0)
    assert pool.digest() == before
    with pytest.raises(ValueError, match="reuse_after"):
        LocalPool(["100.64.1.0/29"], reuse_after=0)


def test_concurrent_checkouts_from_threads_stay_consistent() -> None:
    pool = LocalPool(["100.64.0.0/20"], clock=Clock())
    results: dict[tuple[str, str], int] = {}
    lock = threading.Lock()

    def worker(node: str) -> None:
        for i in range(200):
            domain = f"d{i % 50}.example"
            address = asyncio.run(pool.checkout(node, domain, (), 60.0))
            with lock:
                assert results.setdefault((node, domain), address) == address

    threads = [threading.Thread(target=worker, args=(f"node-{k % 3}",)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for node in ("node-0", "node-1", "node-2"):
        mine = sorted(a for (n, _), a in results.items() if n == node)
        assert mine == list(range(ip("100.64.0.1"), ip("100.64.0.1") + 50))  # dense, lowest first, no repeats
    assert pool.stats()["mappings"] == 150
