"""The background-round loop: a failing round never ends it; the caller says which failures are retried."""

from __future__ import annotations

import asyncio
import logging

import pytest

from appconnector.periodic import Periodic
from appconnector.pool.api import ReplicaUnavailable


def _run(failures: list[Exception], retried: tuple[type[Exception], ...],
         caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Rounds that raise ``failures`` one after the other, then one that succeeds: the loop's log lines."""
    async def body() -> None:
        left = list(failures)
        done = asyncio.Event()

        async def round() -> None:
            if left:
                raise left.pop(0)
            done.set()

        loop = Periodic("duty", 0.01, round, retried=retried)
        loop.start()
        try:
            await asyncio.wait_for(done.wait(), 10)  # reached only when the loop outlived every failure
        finally:
            await loop.stop()

    with caplog.at_level(logging.INFO, logger="appconnector.periodic"):
        asyncio.run(body())
    return [r for r in caplog.records if r.name == "appconnector.periodic"]


def test_a_failing_round_never_ends_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    retried, failed = _run([ReplicaUnavailable("write not committed (no leader?)"), KeyError("a bug")],
                           (ReplicaUnavailable,), caplog)
    assert retried.levelno == logging.INFO and retried.exc_info is None
    assert "no leader?" in retried.getMessage() and "next round retries" in retried.getMessage()
    assert failed.levelno == logging.ERROR and failed.exc_info is not None  # a bug keeps its traceback


def test_without_retried_types_every_failure_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    (record,) = _run([ReplicaUnavailable("not committed")], (), caplog)
    assert record.levelno == logging.ERROR and record.exc_info is not None
