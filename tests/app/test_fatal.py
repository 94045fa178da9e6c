"""The one place fatal errors go (appconnector/fatal.py) and the state directory's marker, lock and reset."""

from __future__ import annotations

import asyncio
import pickle
import threading
from pathlib import Path

import pytest

from appconnector.fatal import EXIT_FAILURE, EXIT_UNTRUSTED, FatalReporter
from appconnector.pool.storage import RunLock, StateInUse, mark_untrusted, reset, untrusted_reason


def test_reports_from_many_threads_wake_the_loop_once_with_the_first() -> None:
    async def main() -> tuple[str, int]:
        reporter = FatalReporter()
        waiting = asyncio.ensure_future(reporter.wait())
        await asyncio.sleep(0)
        go = threading.Event()

        def part(i: int) -> None:
            go.wait()
            reporter.report(f"part {i} failed", EXIT_UNTRUSTED if i % 2 else EXIT_FAILURE)

        threads = [threading.Thread(target=part, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join()
        fatal = await asyncio.wait_for(waiting, 5)
        assert reporter.reported == fatal
        return fatal.reason, fatal.exit_code

    reason, code = asyncio.run(main())
    assert reason.startswith("part ") and code == (EXIT_UNTRUSTED if int(reason.split()[1]) % 2 else EXIT_FAILURE)


def test_a_report_before_anyone_waits_is_not_lost() -> None:
    reporter = FatalReporter()
    reporter.report("early")

    async def main() -> str:
        return (await asyncio.wait_for(reporter.wait(), 5)).reason

    assert asyncio.run(main()) == "early"


def test_reset_wipes_raft_data_and_the_marker_but_keeps_term_vote_and_membership(tmp_path: Path) -> None:
    d = tmp_path / "raft-127.0.0.1_6270"
    d.mkdir()
    for name in ("journal", "dump", "dump.1.tmp", "membership.json"):
        (d / name).write_bytes(b"x")
    (d / "journal.meta").write_bytes(pickle.dumps({"currentTerm": 7, "votedForNodeId": "127.0.0.1:6271",
                                                   "raftCommitIndex": 900}))
    mark_untrusted(d, "diverged")
    assert untrusted_reason(d) == "diverged"
    lock = RunLock(d)
    lock.acquire()
    with pytest.raises(StateInUse):
        reset(d)
    assert untrusted_reason(d) == "diverged"
    lock.release()
    removed = reset(d)
    assert {"journal", "dump", "dump.1.tmp", "untrusted"} <= set(removed)
    assert untrusted_reason(d) is None and not (d / "journal").exists() and (d / "membership.json").exists()
    # Raft: a member must not forget its vote; the commit index would point past the empty journal
    assert pickle.loads((d / "journal.meta").read_bytes()) == {"currentTerm": 7, "votedForNodeId": "127.0.0.1:6271"}


def test_a_marker_that_does_not_parse_still_means_untrusted(tmp_path: Path) -> None:
    (tmp_path / "untrusted").write_text("{half")
    assert untrusted_reason(tmp_path) is not None
