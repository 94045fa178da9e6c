"""Durable before acknowledged (issue 12; docs/design.md §6), observed on real processes with strace.

A 3-member cluster of ``appconnector run`` processes on loopback; strace is attached to the leader and to
a follower while DNS clients ask for new names (each a checkout through Raft). The test reads the
system calls of every thread in order and decrypts the Raft frames on the sockets with the cluster secret:

* follower: every ``append_entries`` that carried entries is followed by a journal sync (msync of
  pysyncobj's mmapped journal) before the answer that acknowledges those entries leaves on the socket;
* leader: between a DNS query for a new name arriving and its answer leaving, the journal was synced.

With ``cluster.fsync = false`` the same run shows no sync at all (so the checks can fail). And a
compaction's trim of the journal replaces the file by rename instead of rewriting it in place.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import re
import select
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.encryptor import getEncryptor
from pysyncobj.journal import FileJournal

from appconnector.config import ClusterConfig, Config, PoolConfig
from appconnector.pool.engine import RaftTuning
from appconnector.pool.raftlog import GuardedJournal
from appconnector.pool.replica import RaftReplica
from appconnector.pool.settings import PoolSettings, RaftSettings
from appconnector.pool.storage import Durability, StatePaths, read_journal
from tests.faults.connector import ConnectorMember
from tests.member import free_ports
from tests.ops.helpers import wait_until

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (./dev deps installs it)")]

SECRET = "durability-test-secret"
NODE = "127.0.0.1"
SYNCS = ("msync", "fsync", "fdatasync")
SENDS = ("sendto", "sendmsg", "sendmmsg")
_LINE = re.compile(r"^(\d+) +[\d:.]+ (?:<\.\.\. (\w+) resumed>(.*)|(\w+)\((.*))$")
_BYTES = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_RESULT = re.compile(r"= (-?\d+)")


@dataclass
class Call:
    seq: int  # position in the trace: the entry of a send, the return of everything else
    name: str
    fd: int | None
    data: bytes | None
    result: int | None
    to_address: bool  # a sendto/recvfrom naming a peer address (UDP), not a connected TCP socket
    datagrams: list[bytes]  # UDP: every datagram of the call (recvmmsg/sendmmsg carry several)


def parse_trace(text: str) -> list[Call]:
    """strace -f -tt -xx output as calls in trace order (unfinished/resumed pairs joined per thread)."""
    calls: list[Call] = []
    pending: dict[tuple[str, str], Call | str] = {}  # (thread, call) → a send recorded at its start, or args
    for seq, line in enumerate(text.splitlines()):
        m = _LINE.match(line)
        if not m:
            continue
        tid = m.group(1)
        if m.group(2):  # "<... name resumed>rest"
            started = pending.pop((tid, m.group(2)), None)
            if isinstance(started, Call):
                started.result = _result(m.group(3))
            elif started is not None:
                calls.append(_call(seq, m.group(2), started + m.group(3)))
            continue
        name, args = m.group(4), m.group(5)
        if args.endswith("<unfinished ...>"):
            args = args.removesuffix("<unfinished ...>")
            if name in SENDS:  # a send counts from its start
                calls.append(call := _call(seq, name, args))
                pending[(tid, name)] = call
            else:
                pending[(tid, name)] = args
            continue
        calls.append(_call(seq, name, args))
    return calls


def _result(tail: str) -> int | None:
    found = _RESULT.search(tail.rsplit(")", 1)[-1]) if ")" in tail else None
    return int(found.group(1)) if found else None


def _fd(args: str) -> int | None:
    head = args.split(",", 1)[0].strip()
    return int(head) if head.isdigit() else None


def _call(seq: int, name: str, args: str) -> Call:
    strings = [bytes.fromhex(h.replace("\\x", "")) for h in _BYTES.findall(args)]
    udp = "sa_family" in args
    return Call(seq, name, _fd(args), strings[0] if strings else None, _result(args), udp,
                strings if udp else [])


@dataclass
class Frame:
    seq: int  # the call in which its last byte went out or came in
    message: dict[str, Any]


def frames(calls: list[Call], name: str, fd: int, decrypt: Callable[[bytes], bytes]) -> list[Frame]:
    """pysyncobj's frames (4-byte length, Fernet token of a zlib'd pickle) in one direction of a TCP socket.
    The trace starts mid-stream: skip to the first position where a frame decrypts."""
    chunks = [(c.seq, c.data if c.result is None else c.data[:c.result]) for c in calls
              if c.name == name and c.fd == fd and c.data and (c.result is None or c.result > 0)
              and not c.to_address]
    stream = bytearray()
    ends: list[tuple[int, int]] = []  # (stream offset after the chunk, seq)
    for seq, data in chunks:
        stream += data
        ends.append((len(stream), seq))
    out: list[Frame] = []
    pos = _first_frame(stream, decrypt)
    while pos is not None and pos + 4 <= len(stream):
        (size,) = struct.unpack_from("i", stream, pos)
        if pos + 4 + size > len(stream):
            break
        message = pickle.loads(zlib.decompress(decrypt(bytes(stream[pos + 4:pos + 4 + size]))))
        pos += 4 + size
        if isinstance(message, tuple) and len(message) == 2:  # (pysyncobj's random prefix, message)
            message = message[1]
        if isinstance(message, dict):  # Raft messages (the rest: pysyncobj's handshake)
            out.append(Frame(next(seq for end, seq in ends if end >= pos), message))
    return out


def _first_frame(stream: bytearray, decrypt: Callable[[bytes], bytes]) -> int | None:
    for pos in range(len(stream) - 10):
        if stream[pos + 4:pos + 10] != b"gAAAAA":
            continue
        (size,) = struct.unpack_from("i", stream, pos)
        if 0 < size <= len(stream) - pos - 4:
            try:
                decrypt(bytes(stream[pos + 4:pos + 4 + size]))
            except Exception:
                continue
            return pos
    return None


class Traced:
    """strace attached to every thread of a running process, until stop()."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-p", str(pid), "-tt", "-xx", "-s", "1048576", "-o", str(out),
             "-e", "trace=msync,fsync,fdatasync,sendto,recvfrom,sendmsg,recvmsg,sendmmsg,recvmmsg"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        said = b""
        deadline = time.monotonic() + 10
        # "Process N attached with T threads", or one "attached" line per thread
        while not re.search(rb"attached with \d+ threads", said) \
                and said.count(b" attached") < len(os.listdir(f"/proc/{pid}/task")):
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.proc.stderr], [], [], left)[0], \
                f"strace did not attach to every thread of {pid}: {said!r}"
            said += os.read(self.proc.stderr.fileno(), 65536)

    def stop(self) -> list[Call]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # strace detaches and leaves the process running
            self.proc.wait(10)
        return parse_trace(self.out.read_text(errors="replace"))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[[bool], list[ConnectorMember]]]:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    made: list[ConnectorMember] = []

    def start(fsync: bool) -> list[ConnectorMember]:
        ports = free_ports(12)
        raft = [f"127.0.0.1:{p}" for p in ports[:3]]
        env = {} if fsync else {"APPCONNECTOR_CLUSTER_FSYNC": "false"}
        for i in range(3):
            made.append(ConnectorMember(f"d{i}", tmp_path, ports[i], ports[3 + i], ports[6 + i], os.getgid(),
                                        [a for a in raft if a != raft[i]], ("100.64.7.0/24",), 48 * 3600.0,
                                        secret, env, admin_port=ports[9 + i]))
        for m in made:
            m.start()
        for m in made:
            m.wait_ready()
        return made

    yield start
    for m in made:
        m.stop()


def _syncs_between(calls: list[Call], after: int, before: int) -> int:
    return sum(1 for c in calls if c.name in SYNCS and after < c.seq < before and c.result == 0)


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_entries_are_synced_before_they_are_acknowledged_or_answered(
        cluster: Callable[[bool], list[ConnectorMember]], tmp_path: Path, fsync: bool) -> None:
    members = cluster(fsync)
    leader = wait_until(lambda: next((m for m in members if m.status().get("leader_self")), None), 30,
                        "a leader")
    follower = next(m for m in members if m is not leader)
    # every member knows the leader: the follower's connection to it carries appends from now on
    wait_until(lambda: follower.status().get("leader") == leader.status().get("self"), 30, "the follower")
    traced = {m.name: Traced(m.pid, tmp_path / f"{m.name}.strace") for m in (leader, follower)}
    names = [f"durable{i}.example" for i in range(8)]
    for name in names:
        leader.dns.checkout(NODE, name, 10)
    # the answers needed one follower's acknowledgement, perhaps the other's: trace until the traced follower
    # has acknowledged everything the leader committed (the leader's match index for it)
    committed = int(leader.status()["commit_index"])
    fself = str(follower.status()["self"])
    wait_until(lambda: int(leader.status()["match_index"].get(fself, 0)) >= committed, 30,
               "the traced follower to acknowledge every entry")
    leader_calls = traced[leader.name].stop()
    follower_calls = traced[follower.name].stop()
    decrypt = getEncryptor(SECRET).decrypt

    # --- the follower: the sync comes between an append's arrival and its acknowledgement ---------------
    fds = {c.fd for c in follower_calls if c.name == "recvfrom" and c.fd is not None and not c.to_address}
    appends: list[Frame] = []
    answers: list[Frame] = []
    for fd in fds:
        got = [f for f in frames(follower_calls, "recvfrom", fd, decrypt) if f.message.get("type") == "append_entries"]
        if got:
            appends += [f for f in got if f.message.get("entries")]
            answers += [f for f in frames(follower_calls, "sendto", fd, decrypt)
                        if f.message.get("type") == "next_node_idx" and f.message.get("success")]
    # each of our checkouts' entries: from its first arrival to the first answer acknowledging it (a resend
    # of entries the follower already holds adds nothing, so its answer needs no new sync)
    first_seen: dict[int, Frame] = {}
    for a in sorted(appends, key=lambda f: f.seq):
        for _, idx, _ in (e for e in a.message["entries"] if b"durable" in e[0]):
            first_seen.setdefault(idx, a)
    assert len(first_seen) == len(names), f"the follower received {len(first_seen)} of our checkouts"
    for idx, a in sorted(first_seen.items()):
        ack = next((r for r in answers if r.seq > a.seq and r.message["next_node_idx"] > idx), None)
        assert ack is not None, f"entry {idx} was never acknowledged"
        synced = _syncs_between(follower_calls, a.seq, ack.seq)
        if fsync:
            assert synced >= 1, f"the follower acknowledged entry {idx} before syncing its journal"
        else:
            assert synced == 0
    # --- the leader: the sync comes between a query for a new name and its answer --------------------
    # DNS over UDP (recvfrom/sendto, or batched recvmmsg/sendmmsg): queries and answers matched by DNS id
    udp_in = {d[:2]: c for c in leader_calls if c.name.startswith("recv") and c.to_address for d in c.datagrams}
    answered = [(udp_in[d[:2]], c) for c in leader_calls if c.name in SENDS and c.to_address for d in c.datagrams
                if d[:2] in udp_in and any(n.encode().split(b".")[0] in d for n in names)]
    assert len(answered) == len(names), f"{len(answered)} answers to new names seen on the leader"
    for query, answer in answered:
        synced = _syncs_between(leader_calls, query.seq, answer.seq)
        assert synced >= 1 if fsync else synced == 0, "the leader answered a new name before syncing"
    if not fsync:
        assert not [c for c in leader_calls + follower_calls if c.name in SYNCS], "cluster.fsync = false syncs"


# --- the journal trim after a compaction -------------------------------------------------------------------


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_a_compaction_replaces_the_journal_by_rename_never_in_place(tmp_path: Path, fsync: bool) -> None:
    """pysyncobj trims the journal's front by rewriting the file from its start: a power cut inside that
    rewrite could leave neither the old entries nor the new. With cluster.fsync the trimmed journal is
    written aside, synced and renamed over the old one (a new inode), and the member goes on with it."""
    cfg = Config(pool=PoolConfig(prefixes=("100.64.8.0/24",)),
                 cluster=ClusterConfig(state_dir=str(tmp_path), fsync=fsync))
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    tuning = RaftTuning(compaction_min_entries=20)

    async def run() -> dict[tuple[str, str], int]:
        r = RaftReplica(PoolSettings.from_config(cfg), RaftSettings.from_config(cfg, addr, []), tuning=tuning)
        await r.start()
        try:
            await _until(r.is_leader, "the lone member to lead")
            before = os.stat(r.paths.journal).st_ino
            got = {("n", f"c{i}.example"): await r.checkout("n", f"c{i}.example", (), 60.0) for i in range(30)}
            await _until(lambda: r.paths.dump.exists() and read_journal(r.paths.journal)[0][0] > 1,
                         "a compaction to trim the journal")
            replaced = os.stat(r.paths.journal).st_ino != before
            assert replaced is fsync, "renamed over (fsync) / rewritten in place (pysyncobj's own)"
            got |= {("n", f"d{i}.example"): await r.checkout("n", f"d{i}.example", (), 60.0) for i in range(5)}
            records = read_journal(r.paths.journal)
            assert [i for i, _, _ in records] == list(range(records[0][0], records[0][0] + len(records)))
            return got
        finally:
            await r.stop()

    async def again(expected: dict[tuple[str, str], int]) -> None:
        r = RaftReplica(PoolSettings.from_config(cfg), RaftSettings.from_config(cfg, addr, []), tuning=tuning)
        await r.start()
        try:
            await _until(lambda: r.stats()["mappings"] == len(expected), "the state back after a restart")
            assert {(m.node, m.domain): m.address for m in r.mappings()} == expected
        finally:
            await r.stop()

    asyncio.run(again(asyncio.run(run())))


async def _until(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --- what is synced when (the journal guard over a real pysyncobj journal file) ------------------------


class _Recording(Durability):
    def __init__(self, paths: StatePaths) -> None:
        super().__init__(paths, True)
        self.done: list[str] = []

    def _timed(self, what: str, sync: Callable[[], None]) -> None:
        super()._timed(what, sync)
        self.done.append(what)


def test_one_sync_covers_every_change_since_the_last_and_a_clean_journal_costs_none(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    durability = _Recording(paths)
    journal = GuardedJournal(FileJournal(str(paths.journal)), lambda: 0, durability=durability)
    for idx in range(1, 6):
        journal.add(b"\x00" + pickle.dumps(("tick", float(idx))), idx, 1)
    journal.sync()
    journal.sync()  # nothing changed since
    assert durability.done == ["journal"]
    journal.setCurrentTerm(2, "peer")  # the vote: synced before setCurrentTerm returns
    assert durability.done == ["journal", "meta"]
    paths.dump.write_bytes(b"a full dump")
    journal.deleteEntriesTo(2)  # the dump before the journal's front goes
    assert durability.done == ["journal", "meta", "dump"]
    assert [e[1] for e in journal[:]] == [3, 4, 5] and journal.dirty
    journal.sync()
    assert durability.done[-1] == "journal"
    assert [r[0] for r in read_journal(paths.journal)] == [3, 4, 5]


def test_without_fsync_nothing_is_synced(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    durability = Durability(paths, False)
    journal = GuardedJournal(FileJournal(str(paths.journal)), lambda: 0, durability=durability)
    journal.add(b"\x00" + pickle.dumps(("tick", 1.0)), 1, 1)
    journal.sync()
    journal.setCurrentTerm(2, None)
    assert durability.syncs == 0 and not journal.dirty
