"""The background-round loop: a failing round never ends it; the caller says which failures are retried."""

from __future__ import annotations

import asyncio
import logging

import pytest

from appconnector.periodic import Periodic
from appconnector.pool.api import ReplicaUnavailable


def test_a_failing_round_never_ends_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        rounds = 0
        third = asyncio.Event()

        async def round() -> None:
            nonlocal rounds
            rounds += 1
            if rounds == 1:
                raise ReplicaUnavailable("write not committed (no leader?)")
            if rounds == 2:
                raise KeyError("a bug")
            third.set()

        loop = Periodic("duty", 0.01, round, retried=(ReplicaUnavailable,))
        loop.start()
        try:
            await asyncio.wait_for(third.wait(), 10)
        finally:
            await loop.stop()

    with caplog.at_level(logging.INFO, logger="appconnector.periodic"):
        asyncio.run(body())
    records = [r for r in caplog.records if r.name == "appconnector.periodic"]
    retried, failed = records[0], records[1]
    assert retried.levelno == logging.INFO and retried.exc_info is None
    assert "no leader?" in retried.getMessage() and "next round retries" in retried.getMessage()
    assert failed.levelno == logging.ERROR and failed.exc_info is not None  # a bug keeps its traceback


def test_without_retried_types_every_failure_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        second = asyncio.Event()
        seen = 0

        async def round() -> None:
            nonlocal seen
            seen += 1
            if seen == 1:
                raise ReplicaUnavailable("not committed")
            second.set()

        loop = Periodic("watchdog", 0.01, round)
        loop.start()
        try:
            await asyncio.wait_for(second.wait(), 10)
        finally:
            await loop.stop()

    with caplog.at_level(logging.INFO, logger="appconnector.periodic"):
        asyncio.run(body())
    (record,) = [r for r in caplog.records if r.name == "appconnector.periodic"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
