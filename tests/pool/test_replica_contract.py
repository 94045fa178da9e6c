"""The pool contracts of pool/api.py (PoolAccess, ReplicaControl), run against both implementations
(issue 9 item 9): they used to disagree (a ``touch`` with a bad time raised in one and was dropped in the other)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from pathlib import Path

import pytest

from appconnector import config, metrics
from appconnector.pool.api import PoolExhausted
from appconnector.pool.local import LocalPool
from appconnector.pool.replica import RaftReplica
from appconnector.pool.state import InvalidCommand
from tests.replicas import start_replica


def test_touch_never_raises_drops_malformed_marks_and_counts_them(tmp_path: Path, replica_kind: str) -> None:
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone"})

    async def scenario() -> None:
        r = await start_replica(replica_kind, cfg, str(tmp_path / "raft"))
        try:
            a = await r.checkout("n", "a.example", (), 60.0)
            before = metrics.POOL_INVALID_COMMANDS._value.get()
            bad = ["soon", None, math.nan, math.inf, -1.0, True]
            for at in bad:
                r.touch("n", a, "a.example", at)  # type: ignore[arg-type]
            r.touch(7, a, "a.example", r.now())  # type: ignore[arg-type]
            r.touch("n", "100.64.1.1", "a.example", r.now())  # type: ignore[arg-type]
            assert metrics.POOL_INVALID_COMMANDS._value.get() == before + len(bad) + 2
            assert r.status()["queued_touches"] == 0, "nothing malformed was queued"
            r.touch("n", a, "a.example", r.now())
            assert r.status()["queued_touches"] == 1
            found = r.lookup("n", "a.example")
            assert found is not None and found[0] == a
        finally:
            await r.stop()

    asyncio.run(scenario())


def test_pool_time_moves_on_by_elapsed_time_not_the_wall_clock(tmp_path: Path, replica_kind: str) -> None:
    cfg = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone"})

    async def scenario() -> None:
        r = await start_replica(replica_kind, cfg, str(tmp_path / "raft"))
        try:
            await r.checkout("n", "a.example", (), 60.0)
            t0, m0 = r.now(), time.monotonic()
            await asyncio.sleep(0.3)
            t1, m1 = r.now(), time.monotonic()
            assert 0.0 < t1 - t0 <= (m1 - m0) + 0.05
            found = r.lookup("n", "a.example")
            assert found is not None and found[1] <= t1
        finally:
            await r.stop()

    asyncio.run(scenario())


def test_the_replica_counts_and_logs_what_the_state_reports(tmp_path: Path, replica_kind: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The state machine only reports (pool/state.py imports neither metrics nor logging): the replica
    that applied a command is what counts checkout results and ignored commands, and logs them."""
    base = config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone"})
    cfg = dataclasses.replace(base, pool=dataclasses.replace(base.pool, prefixes=("100.64.1.0/31",)))  # 1 address

    def checkouts(result: str) -> float:
        return float(metrics.POOL_CHECKOUTS.labels(result)._value.get())

    async def scenario() -> None:
        r = await start_replica(replica_kind, cfg, str(tmp_path / "raft"))
        try:
            before = {k: checkouts(k) for k in ("new", "hit", "exhausted")}
            exhausted, invalid = metrics.POOL_EXHAUSTED._value.get(), metrics.POOL_INVALID_COMMANDS._value.get()
            a = await r.checkout("n", "a.example", (), 60.0)
            assert await r.checkout("n", "a.example", (), 60.0) == a
            with pytest.raises(PoolExhausted):
                await r.checkout("n", "b.example", (), 60.0)
            assert {k: checkouts(k) - v for k, v in before.items()} == {"new": 1, "hit": 1, "exhausted": 1}
            assert metrics.POOL_EXHAUSTED._value.get() == exhausted + 1
            with caplog.at_level(logging.WARNING, logger="appconnector.pool.state"):
                if isinstance(r, LocalPool):
                    assert isinstance(r.apply(("no_such_command",)), InvalidCommand)
                else:
                    assert isinstance(r, RaftReplica)
                    with pytest.raises(InvalidCommand):
                        await r._write(("no_such_command",))
            assert metrics.POOL_INVALID_COMMANDS._value.get() == invalid + 1
            assert "pool: ignored command: unknown pool command 'no_such_command'" in caplog.text
        finally:
            await r.stop()

    asyncio.run(scenario())
