"""The pure membership rule and the record a member keeps of its own membership (pool.membership)."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

from appconnector.pool.engine import EngineStatus
from appconnector.pool.membership import (
    JOINING,
    MEMBER,
    REMOVED,
    MembershipRecord,
    judge,
    leader_status,
)
from appconnector.pool.pysyncobj_engine import peer_status, status_from_pysyncobj
from tests.ops.raft_probe import malicious_frame

ME = "100.64.0.3:6270"


def _status(self_addr: str, partners: list[str], *, leader: str | None, term: int = 3) -> EngineStatus:
    """A status as a peer answers it: pysyncobj's dict, translated by the engine."""
    st: dict[str, object] = {"self": self_addr, "leader": leader, "raft_term": term}
    st.update({f"partner_node_status_server_{p}": 2 for p in partners})
    return status_from_pysyncobj(st)


LEADER_WITH_ME = _status("100.64.0.1:6270", ["100.64.0.2:6270", ME], leader="100.64.0.1:6270")
LEADER_WITHOUT_ME = _status("100.64.0.1:6270", ["100.64.0.2:6270"], leader="100.64.0.1:6270")


def test_members_of_a_status_are_the_answering_member_and_its_partners() -> None:
    assert LEADER_WITH_ME.members == ("100.64.0.1:6270", "100.64.0.2:6270", ME)


def test_only_a_member_claiming_leadership_counts_and_the_highest_term_wins() -> None:
    follower = _status("100.64.0.2:6270", ["100.64.0.1:6270"], leader="100.64.0.1:6270")
    assert leader_status({"b": follower}) is None
    stale = _status("100.64.0.9:6270", [ME], leader="100.64.0.9:6270", term=2)
    assert leader_status({"a": LEADER_WITHOUT_ME, "b": follower, "c": stale}) is LEADER_WITHOUT_ME


def test_a_joining_member_becomes_a_member_when_the_leader_lists_it_and_waits_otherwise() -> None:
    verdict = judge(ME, JOINING, LEADER_WITH_ME, is_leader=False)
    assert verdict is not None and verdict.state == MEMBER
    assert judge(ME, JOINING, LEADER_WITHOUT_ME, is_leader=False) is None, "not added yet is not removed"


def test_a_member_the_leader_no_longer_lists_was_removed_by_that_leader() -> None:
    verdict = judge(ME, MEMBER, LEADER_WITHOUT_ME, is_leader=False)
    assert verdict is not None and verdict.state == REMOVED and verdict.by == "100.64.0.1:6270"
    assert "removed from the cluster by the leader 100.64.0.1:6270" in verdict.reason


def test_no_leader_answer_is_no_evidence_and_removal_is_final() -> None:
    assert judge(ME, MEMBER, None, is_leader=False) is None
    assert judge(ME, REMOVED, LEADER_WITH_ME, is_leader=False) is None, "only an emptied state dir rejoins"
    assert judge(ME, REMOVED, None, is_leader=True) is None
    leading = judge(ME, JOINING, None, is_leader=True)
    assert leading is not None and leading.state == MEMBER


def test_the_record_survives_a_restart_and_a_bad_file_counts_as_not_added(tmp_path: Path) -> None:
    assert MembershipRecord.load(tmp_path) is None
    MembershipRecord(REMOVED, [ME, "100.64.0.1:6270"], "the leader 100.64.0.1:6270", 1.5).save(tmp_path)
    loaded = MembershipRecord.load(tmp_path)
    assert loaded == MembershipRecord(REMOVED, [ME, "100.64.0.1:6270"], "the leader 100.64.0.1:6270", 1.5)
    (tmp_path / "membership.json").write_text("{not json")
    assert MembershipRecord.load(tmp_path) is None
    (tmp_path / "membership.json").write_text('{"state": "emperor"}')
    assert MembershipRecord.load(tmp_path) is None


def test_a_hand_edited_removal_time_that_is_not_a_number_is_dropped_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "membership.json").write_text('{"state": "removed", "removed_at": "yesterday", "removed_by": 7}')
    loaded = MembershipRecord.load(tmp_path)
    assert loaded is not None and loaded.state == REMOVED, "still removed: removal is sticky"
    assert loaded.removed_at is None and loaded.removed_by is None


def test_a_peer_status_is_never_read_without_a_secret(tmp_path: Path) -> None:
    """A "member" that answers the status request with a malicious pickle: without the secret the asker
    reads nothing (before: pysyncobj's utility unpickled the answer, running the attacker's command)."""
    marker = tmp_path / "pwned"
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        srv.settimeout(3)
        address = f"127.0.0.1:{srv.getsockname()[1]}"

        def answer_with_a_pickle() -> None:
            with contextlib.suppress(OSError), srv.accept()[0] as conn:
                conn.sendall(malicious_frame(str(marker)))
                conn.settimeout(3)
                while conn.recv(4096):  # until the asker hangs up
                    pass

        t = threading.Thread(target=answer_with_a_pickle, daemon=True)
        t.start()
        assert peer_status(address, None, timeout=2.0) is None
        t.join(5)
    assert not marker.exists(), "the answer was unpickled"
