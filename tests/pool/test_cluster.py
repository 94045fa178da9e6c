"""The Raft replica as real 3-process pysyncobj clusters on loopback (docs/design.md §6).

Every test starts its own members (``python -m tests.member``) on fresh loopback ports with a
state directory under tmp_path, and kills them afterwards.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appconnector.pool.raftlog import DIVERGED_MARKER
from appconnector.pool.storage import read_dump, read_journal, write_journal
from tests.member import MemberError, MemberProcess, free_ports

pytestmark = pytest.mark.cluster

SECRET = "acraft-test-secret"
ELECTION = 1.0  # RaftTuning.raft_max_timeout
TICKS_IN_FLIGHT = 3
"""Entries (pool-clock ticks) by which live replicas' applied indexes may differ once they converged."""


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except MemberError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Cluster:
    def __init__(self, root: Path, n: int = 3, prefixes: tuple[str, ...] = ("100.64.0.0/16",),
                 extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.secret = root / "secret"
        self.secret.write_text(SECRET + "\n")
        self.secret.chmod(0o600)  # the member refuses a secret others can read
        self.addrs = [f"127.0.0.1:{p}" for p in free_ports(n)]
        self.prefixes = prefixes
        self.extra = extra
        self.members: dict[str, MemberProcess] = {}
        self.generation = 0

    def spawn(self, addr: str, secret_file: Path | None = None, extra: tuple[str, ...] = ()) -> MemberProcess:
        self.generation += 1
        m = MemberProcess(addr, [a for a in self.addrs if a != addr], self.root / "state",
                          secret_file=secret_file or self.secret, prefixes=self.prefixes, extra=self.extra + extra,
                          log_path=self.root / f"{addr.replace(':', '_')}.{self.generation}.log")
        self.members[addr] = m
        return m.start()

    def start(self) -> Cluster:
        for a in self.addrs:
            self.spawn(a)
        for m in self.members.values():
            m.wait_ready()
        self.wait_leader()
        return self

    def live(self) -> list[MemberProcess]:
        return [m for m in self.members.values() if m.alive()]

    def wait_leader(self, timeout: float = 15.0) -> MemberProcess:
        def leader() -> MemberProcess | None:
            live = self.live()
            st = {m.self_address: m.status() for m in live}
            leaders = [a for a, s in st.items() if s["role"] == "leader"]
            # settled: one leader that every live member follows
            if len(leaders) == 1 and all(s["leader"] == leaders[0] for s in st.values()):
                return self.members[leaders[0]]
            return None
        found: MemberProcess = _wait(leader, timeout, "one leader followed by every live member")
        return found

    def followers(self) -> list[MemberProcess]:
        leader = self.wait_leader()
        return [m for m in self.live() if m is not leader]

    def converged(self, timeout: float = 20.0) -> str:
        def same() -> str | None:
            # the leader's pool-clock ticks keep the log growing (one entry a second): applied indexes
            # may differ by the ticks in flight, which the digest (without the clock) does not see
            st = [m.status(digest=True) for m in self.live()]
            applied = [s["applied_index"] for s in st]
            if max(applied) - min(applied) > TICKS_IN_FLIGHT:
                return None
            digests = {s["digest"] for s in st}
            return digests.pop() if len(digests) == 1 else None
        digest: str = _wait(same, timeout, "live replicas to apply the same log")
        return digest

    def kill_all(self) -> None:
        for m in self.members.values():
            m.kill()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        c = Cluster(tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.kill_all()
        assert DIVERGED_MARKER not in c.logs(), "a member logged that its state may have diverged"


def test_checkout_through_a_follower_reaches_every_replica(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory().start()
    follower = c.followers()[0]
    addr = follower.call("checkout", node="nodeA", domain="github.com", targets=[0x8C52_7004], ttl=60)["address"]
    assert 0x6440_0000 < addr < 0x6441_0000  # inside 100.64.0.0/16, not its DNS address
    again = c.wait_leader().call("checkout", node="nodeA", domain="github.com", targets=[1], ttl=60)["address"]
    assert again == addr  # idempotent, whoever is asked
    c.converged()
    for m in c.live():
        assert m.call("lookup", node="nodeA", domain="github.com")["address"] == addr
    # A second domain for the same node gets another address; another node may get the same one.
    other = follower.call("checkout", node="nodeA", domain="example.org", targets=[1], ttl=60)["address"]
    assert other != addr
    assert follower.call("checkout", node="nodeB", domain="example.org", targets=[1], ttl=60)["address"] == addr


def test_errors_come_back_intact_through_a_follower(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(prefixes=("100.64.9.0/30",)).start()  # 3 usable addresses (the first is DNS's)
    follower = c.followers()[0]
    for i in range(3):
        follower.call("checkout", node="n", domain=f"d{i}.example", targets=[1], ttl=60)
    with pytest.raises(MemberError) as err:
        follower.call("checkout", node="n", domain="d3.example", targets=[1], ttl=60)
    assert err.value.response["error"] == "PoolExhausted"
    assert "d3.example" in err.value.response["message"]


def test_kill_9_of_the_leader_elects_another_and_keeps_serving(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory().start()
    leader = c.wait_leader()
    acked = leader.call("load", count=300, concurrency=20, node_prefix="pre", domain_prefix="pre")["acked"]
    leader.kill()
    t0 = time.monotonic()
    new_leader = c.wait_leader(timeout=10)
    elected = time.monotonic() - t0
    assert new_leader is not leader
    survivor = next(m for m in c.live() if m is not new_leader)
    addr = survivor.call("checkout", node="post", domain="after.example", targets=[1], ttl=60, timeout=20)["address"]
    served = time.monotonic() - t0
    assert served < 5 * ELECTION + 3, f"new leader after {elected:.1f}s, first write after {served:.1f}s"
    c.converged()
    for node, domain, address in acked:
        assert survivor.call("lookup", node=node, domain=domain)["address"] == address
    assert new_leader.call("lookup", node="post", domain="after.example")["address"] == addr


def test_acknowledged_checkouts_survive_kill_9_of_every_member(
        cluster_factory: Callable[..., Cluster], tmp_path: Path) -> None:
    # Small compaction threshold: full dumps and journal rewrites happen during the load, so the kill can
    # land in one (docs/design.md §6: compaction rewrites the journal in place).
    c = cluster_factory(extra=("--compact-every", "40")).start()
    ack_files = [tmp_path / f"acks{i}.jsonl" for i in range(3)]
    loaders = []
    for i, m in enumerate(c.live()):
        t = threading.Thread(target=lambda m=m, f=ack_files[i], i=i: _swallow(
            m.call, "load", timeout=60, count=10**9, seconds=30, concurrency=30, node_prefix=f"k{i}n",
            domain_prefix=f"k{i}d", ack_file=str(f), return_acked=False), daemon=True)
        t.start()
        loaders.append(t)
    _wait(lambda: sum(len(f.read_text().splitlines()) for f in ack_files if f.exists()) > 1500
          and len(list((tmp_path / "state").glob("raft-*/dump"))) == 3, 40,
          "1500 acknowledged checkouts and a full dump on every member")
    c.kill_all()  # SIGKILL, all at once, mid-load
    for t in loaders:
        t.join(timeout=10)
    acked = [json.loads(line) for f in ack_files for line in f.read_text().splitlines() if line.strip()]

    for a in c.addrs:
        c.spawn(a)
    for m in c.live():
        m.wait_ready()
    c.wait_leader()
    c.converged(timeout=30)
    m = c.live()[0]
    have = {(n, d): a for n, d, a in m.call("mappings", timeout=60)["mappings"]}
    lost = [row for row in acked if have.get((row[0], row[1])) != row[2]]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged checkouts lost after kill -9 of all, e.g. {lost[:3]}"


def _swallow(fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
    with contextlib.suppress(MemberError):  # killed mid-call: expected
        fn(*args, **kw)


def test_a_peer_without_the_secret_cannot_change_state(cluster_factory: Callable[..., Cluster],
                                                       tmp_path: Path) -> None:
    c = cluster_factory().start()
    leader = c.wait_leader()
    victim = c.followers()[0]
    victim.kill()
    # 1. An impostor takes the killed member's address with a wrong secret and tries to write.
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret\n")
    wrong.chmod(0o600)  # private like a real one: it is refused for its content, not for its mode
    impostor = c.spawn(victim.self_address, secret_file=wrong, extra=("--write-deadline", "4"))
    impostor.wait_ready()
    with pytest.raises(MemberError) as err:
        impostor.call("checkout", node="evil", domain="evil.example", targets=[1], ttl=60, timeout=30)
    assert err.value.response.get("error") == "ReplicaUnavailable"
    # 2. A raw client sends pysyncobj's plaintext framing: a pickled membership command.
    host, port = leader.self_address.rsplit(":", 1)
    payload = zlib.compress(pickle.dumps(["add", "127.0.0.1:1"], 2))  # a utility command, unencrypted
    with socket.create_connection((host, int(port)), timeout=2) as s:
        s.sendall(struct.pack("i", len(payload)) + payload)
        s.settimeout(3)
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", f"the member answered an unauthenticated peer: {answer!r}"
    for m in c.live():
        if m is impostor:
            continue
        assert m.call("lookup", node="evil", domain="evil.example")["address"] is None
        assert m.status()["members"] == sorted(c.addrs)
    assert leader.call("checkout", node="good", domain="good.example", targets=[1], ttl=60)["address"]


def _single_member_with_dump(tmp_path: Path) -> tuple[MemberProcess, Path]:
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    m = MemberProcess(addr, [], tmp_path / "state", extra=("--compact-every", "100"),
                      log_path=tmp_path / "single.log").start()
    m.wait_ready()
    _wait(lambda: m.status()["role"] == "leader", 10, "the single member to lead")
    m.call("load", count=400, concurrency=1, node_prefix="s", domain_prefix="s", return_acked=False)
    paths = list((tmp_path / "state").glob("raft-*"))
    assert len(paths) == 1
    _wait(lambda: (paths[0] / "dump").exists(), 10, "a full dump")
    assert m.stop() == 0
    return m, paths[0]


def _restart_refused(m: MemberProcess) -> dict[str, Any]:
    m.start()
    with pytest.raises(MemberError) as err:
        m.wait_ready()
    assert m.proc is not None and m.proc.wait(timeout=10) == 2
    return err.value.response


def test_corrupt_dump_or_journal_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    m, state = _single_member_with_dump(tmp_path)
    # A clean restart works and keeps the state.
    m.start()
    m.wait_ready()
    _wait(lambda: m.status()["role"] == "leader", 10, "leader after restart")
    assert m.call("lookup", node="s0", domain="s0.example")["address"] is not None
    assert m.stop() == 0

    dump = state / "dump"
    good = dump.read_bytes()
    dump.write_bytes(good[: len(good) // 2] + bytes(64) + good[len(good) // 2 + 64:])
    resp = _restart_refused(m)
    assert resp["error"] == "StateError" and str(dump) in resp["message"], resp
    dump.write_bytes(good)

    journal = state / "journal"
    raw = bytearray(journal.read_bytes())
    (end,) = struct.unpack_from("<I", raw, 36)
    assert end > 200, "journal unexpectedly empty"
    raw[end - 6: end - 2] = b"\xff\xff\xff\x7f"  # the last record's trailing length
    journal.write_bytes(bytes(raw))
    resp = _restart_refused(m)
    assert resp["error"] == "StateError" and str(journal) in resp["message"], resp
    assert "refusing to start" in m.log_text()


def test_a_journal_left_untrimmed_by_an_interrupted_compaction_keeps_later_entries(tmp_path: Path) -> None:
    """pysyncobj writes the dump first and trims the journal on a later tick; a kill in between leaves
    a journal that starts before the dump, which pysyncobj would clear down to the dump's last entry."""
    addr = f"127.0.0.1:{free_ports(1)[0]}"

    def member(compact_every: int) -> MemberProcess:
        m = MemberProcess(addr, [], tmp_path / "state", extra=("--compact-every", str(compact_every)),
                          log_path=tmp_path / "single.log").start()
        m.wait_ready()
        _wait(lambda: m.status()["role"] == "leader", 10, "the single member to lead")
        return m

    m = member(40)  # compacts: a dump, and the journal trimmed to start at its last entries
    acked = m.call("load", count=150, concurrency=1, node_prefix="b", domain_prefix="b")["acked"]
    assert m.stop() == 0
    state = next((tmp_path / "state").glob("raft-*"))
    trimmed = read_journal(state / "journal")
    dump_index = read_dump(state / "dump")[1][1]
    assert trimmed[0][0] > 20 and trimmed[-1][0] > dump_index, "no entries after the dump to keep"

    # The state a kill between writing the dump and trimming the journal leaves behind: the journal
    # still holds entries the dump covers (their content no longer matters: no-ops here).
    first, term = trimmed[0][0], trimmed[0][1]
    write_journal(state / "journal", [(i, term, b"\x01") for i in range(first - 20, first)] + trimmed)
    m = member(10**6)
    for node, domain, address in acked:
        assert m.call("lookup", node=node, domain=domain)["address"] == address
    assert "compaction interrupted" in m.log_text()
    assert m.stop() == 0


def test_a_member_behind_the_compacted_log_catches_up_by_snapshot(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(extra=("--compact-every", "30")).start()
    leader = c.wait_leader()
    lagging = c.followers()[0]
    lagging.kill()
    acked = leader.call("load", count=400, concurrency=4, node_prefix="s", domain_prefix="s")["acked"]
    _wait(lambda: leader.status()["log_length"] < 100, 20, "the leader to compact its log")
    own = next(p for p in (c.root / "state").glob("raft-*") if p.name.endswith(lagging.self_address.split(":")[1]))
    assert not (own / "dump").exists()  # so a state replacement after the restart is the leader's snapshot
    back = c.spawn(lagging.self_address)
    back.wait_ready()
    c.converged(timeout=30)
    for node, domain, address in acked[::20]:
        assert back.call("lookup", node=node, domain=domain)["address"] == address
    # The snapshot replaced its state wholesale: observers (the NAT mirror) were told to rebuild.
    observer = back.status()["observer"]
    assert observer["resets"] >= 2 and observer["mappings_at_last_reset"] > len(acked) // 2


def test_dynamic_membership_removes_a_member_through_raft(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory(extra=("--dynamic-membership",)).start()
    leader = c.wait_leader()
    gone = c.followers()[0]
    with pytest.raises(MemberError):  # a member cannot remove itself
        leader.call("remove_member", member=leader.self_address)
    with pytest.raises(MemberError) as err:  # nor the leader through a follower (its followers would drop it)
        gone.call("remove_member", member=leader.self_address)
    assert "is the leader" in err.value.response["message"]
    with pytest.raises(MemberError) as err:
        leader.call("remove_member", member="127.0.0.1:1")
    assert "is not a member" in err.value.response["message"]
    leader.call("remove_member", member=gone.self_address, timeout=20)
    gone.kill()
    rest = sorted(a for a in c.addrs if a != gone.self_address)
    _wait(lambda: all(m.status()["members"] == rest for m in c.live()), 10, "both members to drop it")
    # Two members are now the whole cluster: they commit without the removed one.
    follower = next(m for m in c.live() if m is not leader)
    assert follower.call("checkout", node="n", domain="after.example", targets=[1], ttl=60)["address"]


def test_static_membership_refuses_changes(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory().start()
    with pytest.raises(MemberError) as err:
        c.wait_leader().call("remove_member", member=c.followers()[0].self_address)
    assert "static membership" in err.value.response["message"]


def test_a_stopping_leader_hands_leadership_to_a_follower(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory().start()
    leader = c.wait_leader()
    leader.call("checkout", node="n", domain="before.example", targets=[1], ttl=60)
    assert leader.stop() == 0
    assert "handed leadership to 127.0.0.1:" in leader.log_text()
    new = c.wait_leader()
    assert new is not leader
    assert new.call("lookup", node="n", domain="before.example")["address"] is not None


def test_forget_and_set_excluded_of_20000_go_through_commands_below_the_batch_limit(
        cluster_factory: Callable[..., Cluster]) -> None:
    """Issue 9 item 8: 20,000 departed nodes (about 1 MB of names) and 20,000 excluded addresses, each
    through a follower of a real cluster: all applied everywhere, and no command proposed reached the
    size at which pysyncobj takes its unguarded chunked path."""
    c = cluster_factory(prefixes=("100.64.0.0/16",)).start()
    leader = c.wait_leader()
    prefix = "departed-node-with-a-long-stable-id-"
    r = leader.call("load", count=20_000, concurrency=200, nodes=20_000, node_prefix=prefix, return_acked=False,
                    timeout=180)
    assert r["acked"] == 20_000, r["errors"]
    follower = c.followers()[0]
    follower.call("forget", nodes=[f"{prefix}{i}" for i in range(20_000)], timeout=180)
    base = 0x64400000  # 100.64.0.0
    follower.call("set_excluded", addresses=[base + 2 + 3 * i for i in range(20_000)], timeout=180)

    def applied_everywhere(excluded: int) -> bool:
        return all(s["mapping_count"] == 0 and s["excluded_count"] == excluded
                   for s in (m.status() for m in c.live()))

    _wait(lambda: applied_everywhere(20_000), 60, "every member to forget 20,000 nodes and exclude 20,000")
    follower.call("set_excluded", addresses=[base + 2 + 3 * i for i in range(100)], timeout=180)  # 19,900 lifted
    _wait(lambda: applied_everywhere(100), 60, "every member to lift 19,900 exclusions")
    for m in (leader, follower):
        st = m.status()
        assert 0 < st["largest_command_bytes"] < (1 << 16) // 2, st["largest_command_bytes"]
    c.converged()
