"""A power cut of a whole 3-member cluster loses no acknowledged checkout (issue 12, "Durable before
acknowledged").

Each member's state directory is its own lazyfs mount (tests/powercut/lazyfs.py), which forgets every
write that was not synced. Clients on every member run checkouts under load and write each acknowledged
(node, domain) → address to a file outside the mounts as they get it. The cut: SIGKILL every member's
process group (a compaction child included), then every filesystem drops what was not synced and
refuses further changes, is unmounted and mounted again from what was synced. The members restart from
those files; every acknowledged checkout must still map to the same address on every member, and the
cluster must serve new checkouts. The second cut lands during a compaction: the moment a member's
full dump is renamed into place (a small compaction threshold makes compactions frequent).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appconnector.pool.storage import fsync_dir
from tests.member import MemberError, MemberProcess, free_ports
from tests.ops.helpers import wait_until
from tests.powercut.lazyfs import LazyMount

pytestmark = [pytest.mark.root, pytest.mark.cluster]

SECRET = "powercut-test-secret"
COMPACT_EVERY = 150
"""Entries before a compaction: small, so a cut during one comes within seconds of load."""
ACKS_BEFORE_CUT = 300
"""Acknowledged checkouts (all clients together) before the first cut: mid-load, well past a compaction."""

Ack = tuple[str, str, int]


class PowerCluster:
    """Three members, each with its state directory on a lazyfs mount of its own."""

    def __init__(self, root: Path, extra: tuple[str, ...] = ()) -> None:
        self.root = root
        self.secret = root / "secret"
        self.secret.write_text(SECRET + "\n")
        self.secret.chmod(0o600)  # the harness refuses a secret others can read
        self.addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
        self.disks = {a: LazyMount(root / f"disk{i}", root / f"disk{i}.image.json", root / f"disk{i}.lazyfs.log")
                      for i, a in enumerate(self.addrs)}
        self.extra = extra
        self.members: dict[str, MemberProcess] = {}
        self.boots = 0

    def boot(self) -> None:
        """Mount every disk and start every member from what is on it."""
        self.boots += 1
        for a, disk in self.disks.items():
            if disk.proc is None:
                disk.mount()
                fsync_dir(disk.mountpoint)  # the mount point itself exists (the installer's directory)
            self.members[a] = MemberProcess(
                a, [p for p in self.addrs if p != a], disk.mountpoint, secret_file=self.secret,
                prefixes=("100.64.0.0/16",), extra=self.extra,
                log_path=self.root / f"{a.replace(':', '_')}.{self.boots}.log").start()
        for m in self.members.values():
            m.wait_ready()
        self.wait_leader()

    def wait_leader(self, timeout: float = 30.0) -> MemberProcess:
        def leader() -> MemberProcess | None:
            st = {a: m.status() for a, m in self.members.items()}
            leaders = [a for a, s in st.items() if s["role"] == "leader"]
            if len(leaders) == 1 and all(s["leader"] == leaders[0] for s in st.values()):
                return self.members[leaders[0]]
            return None
        found: MemberProcess = wait_until(leader, timeout, "one leader followed by every member")
        return found

    def power_cut(self) -> dict[str, dict[str, int]]:
        """All three at once: kill every member, then every disk forgets what was not synced."""
        for m in self.members.values():
            m.kill()
        dropped = {a: d.cut() for a, d in self.disks.items()}
        for d in self.disks.values():
            d.abort()  # the disk is gone: a request a dying process still has in flight fails at once
            d.unmount()
        return dropped

    def shutdown(self) -> None:
        for m in self.members.values():
            m.kill()
        for d in self.disks.values():
            if d.proc is not None:
                d.abort()
            d.unmount()

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))


class Load:
    """Clients on every member doing new checkouts until stopped by the cut; acks go to files."""

    def __init__(self, cluster: PowerCluster, round_: int) -> None:
        self.files = [cluster.root / f"acks.{round_}.{i}.jsonl" for i in range(len(cluster.addrs))]
        self.threads = [
            threading.Thread(target=self._run, args=(m, f, f"r{round_}m{i}-"), daemon=True)
            for i, (m, f) in enumerate(zip(cluster.members.values(), self.files, strict=True))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _run(member: MemberProcess, ack_file: Path, prefix: str) -> None:
        with contextlib.suppress(MemberError):  # the cut killed it: what it acknowledged is in its file
            member.call("load", timeout=120, count=1_000_000, seconds=90, concurrency=16, nodes=20,
                        node_prefix=prefix + "n", domain_prefix=prefix + "d", ack_file=str(ack_file),
                        return_acked=False)

    def acked(self) -> list[Ack]:
        return read_acks(self.files)

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)


def read_acks(files: list[Path]) -> list[Ack]:
    acks: list[Ack] = []
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                node, domain, address = json.loads(line)
            except ValueError:
                continue  # only a torn last line could be: it was never read by anyone
            acks.append((node, domain, int(address)))
    return acks


def assert_acks_kept(cluster: PowerCluster, acks: list[Ack]) -> None:
    """Every acknowledged checkout maps to the same address on every member, and the cluster serves."""
    leader = cluster.wait_leader()
    # a checkout in the new term commits (and applies) every entry before it on the leader
    fresh = leader.call("checkout", node="after-cut", domain=f"boot{cluster.boots}.example", targets=[1])["address"]
    assert fresh
    want = {(n, d): a for n, d, a in acks}
    for addr, m in cluster.members.items():
        def caught_up(m: MemberProcess = m) -> dict[tuple[str, str], int] | None:
            got = {(n, d): a for n, d, a in m.call("mappings", timeout=30)["mappings"]}
            return got if got.get(("after-cut", f"boot{cluster.boots}.example")) == fresh else None
        got = wait_until(caught_up, 30, f"{addr} to apply the checkout made after the restart")
        lost = [(k, v, got.get(k)) for k, v in want.items() if got.get(k) != v]
        assert not lost, (f"{addr}: {len(lost)} of {len(want)} acknowledged checkouts lost or changed after "
                          f"the power cut, e.g. (node, domain), acked, now: {lost[:5]}")


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., PowerCluster]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    made: list[PowerCluster] = []

    def make(**kw: Any) -> PowerCluster:
        c = PowerCluster(tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.shutdown()


def _renamed_dump(c: PowerCluster) -> list[str]:
    return [a for a, d in c.disks.items() if d.has_event("renamed")]


def _mid_load(c: PowerCluster, load: Load) -> None:
    wait_until(lambda: len(load.acked()) >= ACKS_BEFORE_CUT or None, 60, f"{ACKS_BEFORE_CUT} acknowledged checkouts")


def _at_dump_rename(c: PowerCluster, load: Load) -> None:
    # a member's full dump just renamed into place: the others are mid-dump or just past it
    wait_until(lambda: _renamed_dump(c), 60, "a member to put a new full dump in place")


def _after_journal_trim(c: PowerCluster, load: Load) -> None:
    # the member that renamed its dump has trimmed its journal to the entries after it
    def trimmed() -> bool:
        return any(int(c.members[a].status()["log_length"] or 0) < COMPACT_EVERY // 2 for a in _renamed_dump(c))
    wait_until(trimmed, 60, "a member to trim its journal after a new full dump")


@pytest.mark.parametrize("fsync", [
    True,
    # cluster.fsync = false: the same cuts lose acknowledged checkouts (every one of the first cut, 3 of 3 runs)
    pytest.param(False, marks=[pytest.mark.long, pytest.mark.xfail(strict=True, reason="cluster.fsync = false")]),
], ids=["fsync", "no-fsync"])
def test_no_acknowledged_checkout_is_lost_when_all_members_lose_power(
        cluster_factory: Callable[..., PowerCluster], fsync: bool) -> None:
    c = cluster_factory(extra=("--compact-every", str(COMPACT_EVERY), *(() if fsync else ("--no-fsync",))))
    c.boot()
    acks: list[Ack] = []
    # three cuts of all three members at once: mid-load, then twice during a compaction (full dumps are
    # taken every COMPACT_EVERY entries): as a dump is renamed into place, and just after the journal trim
    for round_, cut_when in enumerate((_mid_load, _at_dump_rename, _after_journal_trim), start=1):
        for d in c.disks.values():
            d.call("watch", name="dump")
        load = Load(c, round_)
        cut_when(c, load)
        c.power_cut()
        load.join()
        acked = load.acked()
        assert acked, f"cut {round_} ({cut_when.__name__}): no checkout was acknowledged before it"
        acks += acked
        c.boot()
        assert_acks_kept(c, acks)
