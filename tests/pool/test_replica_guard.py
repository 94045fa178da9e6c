"""The journal guard (pool/raftlog.py) in front of pysyncobj 0.3.17's real append handling.

The first tests call the pure parts directly. The others drive a real pysyncobj follower (one
PoolSyncObj, its own tick thread, its file journal) with the ``append_entries`` messages a leader sends
after a connection reset, and compare it guarded with unguarded: unguarded, it truncates entries it had
applied and logs "may have diverged"; guarded, it keeps them and commits only what the leader vouched for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.journal import MemoryJournal
from pysyncobj.node import TCPNode

from appconnector.pool.engine import RaftTuning
from appconnector.pool.pysyncobj_engine import PoolConsumer, PoolSyncObj
from appconnector.pool.raftlog import DIVERGED_MARKER, GuardedJournal, plan_append
from appconnector.pool.state import PoolState
from appconnector.pool.storage import StatePaths, read_journal
from tests.member import free_ports

NOOP = b"\x01"


def _log(*terms: int, first: int = 1) -> MemoryJournal:
    j = MemoryJournal()
    for i, t in enumerate(terms):
        j.add(NOOP, first + i, t)
    return j


def _msg(prev: int, prev_term: int, entries: list[tuple[int, int]], commit: int, term: int = 1) -> dict[str, Any]:
    return {"type": "append_entries", "term": term, "commit_index": commit, "prevLogIdx": prev,
            "prevLogTerm": prev_term, "entries": [(NOOP, i, t) for i, t in entries]}


# --- plan_append (pure) --------------------------------------------------------------------------------


def test_a_stale_resend_of_entries_the_log_holds_drops_them_and_holds_the_tail() -> None:
    log = _log(*[1] * 10)  # indexes 1..10, term 1
    plan = plan_append(_msg(3, 1, [(4, 1), (5, 1), (6, 1)], commit=10), log)
    assert plan is not None
    assert plan.message["prevLogIdx"] == 6 and plan.message["entries"] == []
    assert plan.hold_after == 6  # 7..10 stay, hidden from pysyncobj while it handles this message
    assert plan.message["commit_index"] == 6  # Raft: min(leader commit, last index carried)
    assert plan.dropped == 3


def test_truncation_starts_at_the_first_term_conflict() -> None:
    log = _log(1, 1, 1, 1, 2, 2)  # 1..6
    plan = plan_append(_msg(2, 1, [(3, 1), (4, 1), (5, 3), (6, 3)], commit=4, term=3), log)
    assert plan is not None
    assert plan.message["prevLogIdx"] == 4 and plan.message["prevLogTerm"] == 1
    assert [e[1:] for e in plan.message["entries"]] == [(5, 3), (6, 3)]
    assert plan.hold_after is None


def test_missing_entries_are_appended_after_the_log_end() -> None:
    log = _log(1, 1, 1)
    plan = plan_append(_msg(2, 1, [(3, 1), (4, 1), (5, 1)], commit=5), log)
    assert plan is not None
    assert plan.message["prevLogIdx"] == 3 and [e[1] for e in plan.message["entries"]] == [4, 5]
    assert plan.hold_after is None and plan.message["commit_index"] == 5


def test_a_heartbeat_behind_the_log_end_keeps_the_tail_and_clamps_the_commit() -> None:
    plan = plan_append(_msg(4, 1, [], commit=9), _log(*[1] * 9))
    assert plan is not None and plan.hold_after == 4 and plan.message["commit_index"] == 4


@pytest.mark.parametrize("message", [
    _msg(4, 2, [(5, 2)], commit=5),  # prev term mismatch: pysyncobj rejects it untouched
    _msg(12, 1, [(13, 1)], commit=13),  # prev beyond the log end
    _msg(3, 1, [(5, 1)], commit=5),  # not contiguous
    {"type": "append_entries", "term": 1, "commit_index": 3, "serialized": b"x"},  # snapshot install
    {**_msg(3, 1, [], commit=3), "transmission": "start", "data": b""},  # chunked transfer
])
def test_messages_it_does_not_rewrite(message: dict[str, Any]) -> None:
    assert plan_append(message, _log(*[1] * 10)) is None


def test_the_journal_keeps_matching_entries_and_cuts_at_a_conflict() -> None:
    inner = _log(1, 1, 1, 1, 1)
    j = GuardedJournal(inner, last_applied=lambda: 3)
    j.begin_append()
    j.deleteEntriesFrom(1)  # pysyncobj wants to cut 2..5
    j.add(NOOP, 2, 1)  # same term: kept
    j.add(NOOP, 3, 1)
    j.end_append()
    assert [e[1] for e in inner] == [1, 2, 3, 4, 5] and j.refused == 1
    j.begin_append()
    j.deleteEntriesFrom(3)
    j.add(NOOP, 4, 2)  # conflict at 4 (above the applied 3): cut there
    j.end_append()
    assert [(e[1], e[2]) for e in inner] == [(1, 1), (2, 1), (3, 1), (4, 2)] and j.truncated_applied == 0


def test_the_journal_hides_a_held_tail() -> None:
    j = GuardedJournal(_log(*[1] * 8), last_applied=lambda: 0)
    j.hold_tail(5)
    assert len(j) == 5 and j[-1][1] == 5 and [e[1] for e in j[2:]] == [3, 4, 5]
    j.release_tail()
    assert len(j) == 8 and j.last_index() == 8


# --- a real pysyncobj follower ---------------------------------------------------------------------------


class Follower:
    """One PoolSyncObj that believes a leader at 127.0.0.1:1 sends it these messages."""

    def __init__(self, root: Path, guard: bool) -> None:
        addr = f"127.0.0.1:{free_ports(1)[0]}"
        consumer = PoolConsumer(PoolState(["100.64.0.0/24"]), lambda b: PoolState.from_bytes(b, ["100.64.0.0/24"]),
                                lambda *a: None, lambda s: None)
        # Long election timeouts: it must not elect itself while the test plays the leader.
        tuning = RaftTuning(raft_min_timeout=60, raft_max_timeout=90, connection_timeout=90)
        self.paths = StatePaths.for_member(root, addr)
        self.engine = PoolSyncObj(addr, [], consumer, self.paths, "guard-test", tuning, guard=guard)
        self.leader = TCPNode("127.0.0.1:1")

    def send(self, message: dict[str, Any]) -> None:
        done = threading.Event()
        self.engine.deliver(self.leader, message, done.set)
        assert done.wait(5)
        for _ in range(2):  # two more ticks: apply what became committed
            if self.engine.untrusted is not None:
                return  # fail-stop: the engine ticks no more
            done.clear()
            self.engine.call_on_tick(done.set)
            assert done.wait(5)

    def indexes(self) -> tuple[int, int, int]:
        return self.engine.journal.last_index(), self.engine.raftCommitIndex, self.engine.raftLastApplied


@pytest.fixture
def follower(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    made: list[Follower] = []

    def make(guard: bool) -> Follower:
        f = Follower(tmp_path / f"g{int(guard)}", guard)
        made.append(f)
        return f

    caplog.set_level(logging.WARNING)
    yield make
    for f in made:
        f.engine.close()


def _stale_resend_run(f: Follower) -> None:
    f.send(_msg(1, 0, [(i, 1) for i in range(2, 102)], commit=101))  # entries 2..101, all committed
    assert f.indexes() == (101, 101, 101)
    # After a reset the leader resends from a stale next-index, capped by its batch size.
    f.send(_msg(10, 1, [(i, 1) for i in range(11, 31)], commit=101))


def test_unguarded_pysyncobj_truncates_applied_entries(follower: Any, caplog: pytest.LogCaptureFixture) -> None:
    f = follower(guard=False)
    _stale_resend_run(f)
    assert any(DIVERGED_MARKER in r.getMessage() for r in caplog.records)
    assert f.engine.divergence.count >= 1
    # fail-stop: the engine left Raft at once instead of going on from state the cluster does not have
    assert f.engine.untrusted is not None and "truncated applied entries" in f.engine.untrusted
    f.engine.close()
    assert read_journal(f.paths.journal)[-1][0] == 30  # entries 31..101 it had applied are gone


def test_guarded_follower_keeps_applied_entries_on_a_stale_resend(
        follower: Any, caplog: pytest.LogCaptureFixture) -> None:
    f = follower(guard=True)
    _stale_resend_run(f)
    assert f.indexes() == (101, 101, 101)
    f.send(_msg(50, 1, [], commit=101))  # a heartbeat from the same stale position
    assert f.indexes() == (101, 101, 101)
    assert not any(DIVERGED_MARKER in r.getMessage() for r in caplog.records)
    assert f.engine.divergence.count == 0 and f.engine.journal.refused == 0
    assert f.engine.tails_held >= 2


def test_guarded_follower_commits_only_what_the_leader_vouched_for(follower: Any) -> None:
    f = follower(guard=True)
    f.send(_msg(1, 0, [(i, 1) for i in range(2, 11)], commit=10))
    f.send(_msg(10, 1, [(i, 1) for i in range(11, 16)], commit=10))  # 11..15 arrive, not committed
    assert f.indexes() == (15, 10, 10)
    # A new leader (term 2) never had 11..15. Its heartbeat at index 10 says commit 14 (its own 11..14,
    # which this follower has not seen): the follower must not commit its stale 11..14.
    f.send(_msg(10, 1, [], commit=14, term=2))
    assert f.indexes() == (15, 10, 10)
    # Its entries then replace the stale ones from the first conflict, and only then commit.
    f.send(_msg(10, 1, [(i, 2) for i in range(11, 15)], commit=14, term=2))
    assert f.indexes() == (14, 14, 14)
    assert [e[2] for e in f.engine.journal[-4:]] == [2, 2, 2, 2]
