"""Fail-stop that stays stopped (issue 9 items 6, 7, 12; CLARIFICATIONS "Fail-stop that stays stopped").

Real ``appconnector run`` processes on loopback (standalone mode, NAT off):

* A member whose journal guard finds a conflict over entries it applied (its state directory holds a log of
  another cluster's history: it ran alone first, as after restoring the wrong backup) exits 3, leaves the
  untrusted marker, and after a restart answers every DNS query REFUSED and reports unready; `state reset`
  refuses while it runs; after it, the member rejoins empty and serves the cluster's mappings.
* A member that receives a corrupt snapshot from the leader (the leader's full dump corrupted on disk)
  does the same. The leader's members here are ``tests.member`` processes, the same replica
  with a small compaction threshold, so the leader has a snapshot to send within seconds.
* A Raft tick that keeps failing (the process runs out of file descriptors, set with ``prlimit``) ends
  ``appconnector run`` with exit 1 and the reason logged once; the tick errors are rate-limited.
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from appconnector.fatal import EXIT_FAILURE, EXIT_UNTRUSTED
from appconnector.pool.raftlog import DIVERGED_MARKER
from appconnector.pool.storage import MARKER, StatePaths, read_journal
from tests.faults.connector import ConnectorMember
from tests.faults.workload import Unavailable
from tests.member import MemberProcess, free_ports
from tests.ops.helpers import REPO, cli

pytestmark = pytest.mark.cluster

PREFIXES = ("100.64.1.0/24",)
NODE = "127.0.0.1"  # standalone mode: the client IP is the node


def _wait(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except Unavailable as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture
def members(tmp_path: Path) -> Iterator[Callable[..., ConnectorMember]]:
    secret = tmp_path / "secret"
    secret.write_text("failstop-secret\n")
    secret.chmod(0o600)  # run refuses a secret others can read
    made: list[ConnectorMember] = []
    admin_ports: dict[str, int] = {}

    def make(name: str, raft_port: int, peers: list[str], dns_port: int, http_port: int) -> ConnectorMember:
        admin_port = admin_ports.setdefault(name, free_ports(1)[0])
        m = ConnectorMember(name, tmp_path, raft_port, dns_port, http_port, os.getgid(), peers, PREFIXES,
                            48 * 3600.0, secret, admin_port=admin_port)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def _addr(port: int) -> str:
    return f"127.0.0.1:{port}"


def _rcode(m: ConnectorMember, domain: str) -> int:
    return int(m.dns.query(NODE, domain, 3.0).rcode())


def _leader_known(m: ConnectorMember) -> bool:
    return bool(m.status().get("leader"))


def _marker(m: ConnectorMember) -> Path:
    return StatePaths.for_member(m.state_dir, f"127.0.0.1:{m.raft_port}").dir / MARKER


def _ready(m: ConnectorMember) -> tuple[int, Any]:
    return m._get("/readyz", 2.0)


def _exits_with(m: ConnectorMember, timeout: float) -> int:
    assert m.proc is not None
    try:
        return m.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{m.name} still running after {timeout}s:\n{m.log_text()[-3000:]}") from None


def _assert_stays_stopped(m: ConnectorMember, why: str) -> None:
    """After the fail-stop: the marker is there; restarted, it answers REFUSED and is unready until
    `state reset`, which refuses while it runs."""
    assert _marker(m).exists(), m.log_text()[-3000:]
    assert why in _marker(m).read_text()
    assert m.log_text().count("fatal: ") == 1, "the reason is logged once"
    m.start()
    m.wait_ready()
    assert _rcode(m, "new.example") == dns.rcode.REFUSED
    code, doc = _ready(m)
    assert code == 503 and "untrusted" in doc["checks"]["raft"]["detail"], doc
    assert _rcode(m, "new.example") == dns.rcode.REFUSED  # still, however long it runs
    res = cli("state", "reset", "--config", str(m.config_path))
    assert res.returncode == 1 and "in use by a running connector" in res.stderr, res
    assert _marker(m).exists()
    assert m.stop() == 0


def test_a_member_whose_journal_diverged_exits_3_and_serves_nothing_until_reset(
        members: Callable[..., ConnectorMember]) -> None:
    ra, rb, rc, *other = free_ports(9)
    dns_ports, http_ports = other[:3], other[3:6]
    # c's history: it ran as a cluster of its own and applied checkouts there (term 1)
    c = members("c", rc, [], dns_ports[2], http_ports[2])
    c.start()
    c.wait_ready()
    _wait(lambda: _leader_known(c), 30, "c to lead itself")
    c_alone = [c.checkout(NODE, f"alone{i}.example", 10) for i in range(5)]
    paths = StatePaths.for_member(c.state_dir, _addr(rc))
    # pysyncobj records the commit index in its meta file once a second: wait for it, so that after the
    # restart c applies those entries again before it hears from the real cluster (the journal's length now:
    # the leader's pool-clock ticks keep appending after it)
    written = len(read_journal(paths.journal))
    _wait(lambda: pickle.loads(paths.meta.read_bytes()).get("raftCommitIndex", 0) >= written,
          10, "c's commit index on disk")
    assert c.stop() == 0

    # a and b form the real cluster {a, b, c}; they restart once before any write, so their entries after
    # the first election carry a later term than c's: a conflict Raft can see
    a = members("a", ra, [_addr(rb), _addr(rc)], dns_ports[0], http_ports[0])
    b = members("b", rb, [_addr(ra), _addr(rc)], dns_ports[1], http_ports[1])
    for life in ("first", "second"):
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        _wait(lambda: _leader_known(a) and _leader_known(b), 30, f"a leader of a and b ({life} life)")
        if life == "first":
            assert a.stop() == 0 and b.stop() == 0
    cluster = {f"real{i}.example": a.checkout(NODE, f"real{i}.example", 10) for i in range(8)}

    c = members("c", rc, [_addr(ra), _addr(rb)], dns_ports[2], http_ports[2])  # same state directory
    c.start()
    assert _exits_with(c, 60) == EXIT_UNTRUSTED, c.log_text()[-3000:]
    log = c.log_text()
    assert DIVERGED_MARKER in log and "fatal: " in log
    _assert_stays_stopped(c, DIVERGED_MARKER)

    # the cluster went on without it
    assert a.checkout(NODE, "after.example", 10) > 0

    res = cli("state", "reset", "--config", str(c.config_path))
    assert res.returncode == 0, res
    assert not _marker(c).exists()
    c.start()
    c.wait_ready()
    _wait(lambda: _ready(c)[0] == 200, 60, "c ready after the reset")
    # reseeded from the cluster: its answers are the cluster's, and nothing of its own history is left
    for domain, address in cluster.items():
        assert c.checkout(NODE, domain, 10) == address
    assert len(c_alone) == 5 and c.lookup(NODE, "alone0.example", 5) is None


def _corrupt_garbage(dump: Path) -> None:
    raw = bytearray(dump.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 16] = bytes(b ^ 0xFF for b in raw[mid:mid + 16])
    dump.write_bytes(bytes(raw))


def _corrupt_pool_bytes(dump: Path) -> None:
    """A full dump that decodes, with one byte of the pool state flipped: its checksum no longer matches."""
    with gzip.open(dump, "rb") as f:
        data = pickle.load(f)
    pool = data[0][1]["pool"]
    body = bytearray(pool.data)
    body[len(body) // 2] ^= 0x01
    pool.data = bytes(body)
    with gzip.open(dump, "wb") as f:
        pickle.dump(data, f)


@pytest.mark.parametrize(("corrupt", "why"), [(_corrupt_garbage, "snapshot install from the leader failed"),
                                             (_corrupt_pool_bytes, "checksum mismatch")])
def test_a_member_that_receives_a_corrupt_snapshot_exits_3_and_serves_nothing_until_reset(
        tmp_path: Path, members: Callable[..., ConnectorMember], corrupt: Callable[[Path], None], why: str) -> None:
    ra, rb, rc, dns_port, http_port = free_ports(5)
    secret = tmp_path / "secret"
    secret.write_text("failstop-secret\n")
    secret.chmod(0o600)  # run refuses a secret others can read
    leaders = []
    for me, partners in ((ra, [rb, rc]), (rb, [ra, rc])):
        leaders.append(MemberProcess(_addr(me), [_addr(p) for p in partners], tmp_path / f"m{me}",
                                     secret_file=str(secret), prefixes=PREFIXES,
                                     extra=["--compact-every", "20"]).start())
    try:
        for m in leaders:
            m.wait_ready()
        _wait(lambda: all(m.status().get("leader") for m in leaders), 30, "a leader")
        for i in range(60):  # enough entries for a full dump and a trimmed journal on both
            leaders[0].call("checkout", node=NODE, domain=f"d{i}.example", targets=[16843009], ttl=60)
        dumps = [StatePaths.for_member(tmp_path / f"m{p}", _addr(p)).dump for p in (ra, rb)]
        seen: dict[Path, float] = {}

        def settled() -> bool:  # every dump written, and none rewritten for a second
            now = {d: d.stat().st_mtime for d in dumps if d.exists()}
            same = len(now) == len(dumps) and now == seen
            if not same:
                seen.clear()
                seen.update(now)
            return same and time.time() - max(now.values()) > 1.0
        _wait(settled, 30, "full dumps on both members, no longer rewritten")
        for d in dumps:  # the disk under the leader corrupts its snapshot file
            corrupt(d)

        c = members("c", rc, [_addr(ra), _addr(rb)], dns_port, http_port)
        c.start()
        assert _exits_with(c, 60) == EXIT_UNTRUSTED, c.log_text()[-3000:]
        assert why in c.log_text()
        _assert_stays_stopped(c, why)
    finally:
        for m in leaders:
            m.stop()


def test_a_raft_tick_that_keeps_failing_ends_run_with_exit_1_and_one_reason(
        members: Callable[..., ConnectorMember]) -> None:
    # The partner's address sorts below ours, so this member is the one that dials it (pysyncobj's rule),
    # every connection retry; nothing listens there.
    partner, me, dns_port, http_port = sorted(free_ports(4))
    m = members("solo", me, [_addr(partner)], dns_port, http_port)
    m.start()
    m.wait_ready()
    assert m.proc is not None
    # out of file descriptors (a limit below what it holds, less the dial's own socket when that closes):
    # every new socket, the dial's included, fails with EMFILE inside the Raft tick
    limit = len(os.listdir(f"/proc/{m.pid}/fd")) - 2
    subprocess.run(["prlimit", f"--pid={m.pid}", f"--nofile={limit}:{limit}"], check=True)
    started = time.monotonic()
    assert _exits_with(m, 60) == EXIT_FAILURE
    elapsed = time.monotonic() - started
    log = m.log_text()
    fatal = [line for line in log.splitlines() if "fatal: " in line]
    assert len(fatal) == 1 and "raft tick failing" in fatal[0] and "Too many open files" in fatal[0], log[-3000:]
    tick_lines = [line for line in log.splitlines() if "raft tick failed" in line]
    failures = int(re.search(r"\((\d+) failures\)", fatal[0]).group(1))  # type: ignore[union-attr]
    # a failure at every connection retry (0.3 s) for the 10 s it takes to give up, logged once per 5 s
    assert failures >= 10 and 1 <= len(tick_lines) <= 2 + elapsed / 5 < failures, log[-3000:]


def test_exit_3_is_documented_and_keeps_systemd_from_restarting() -> None:
    unit = (REPO / "systemd" / "appconnector.service").read_text()
    prevent = [line.split("=", 1)[1].split() for line in unit.splitlines()
               if line.startswith("RestartPreventExitStatus=")]
    assert prevent and str(EXIT_UNTRUSTED) in prevent[0] and "2" in prevent[0]
    assert "3 untrusted state" in (REPO / "docs" / "operations.md").read_text()
    res = cli("run", "--help")
    assert res.returncode == 0 and "3 when this member's state" in " ".join(res.stdout.split())
