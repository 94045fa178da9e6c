"""RaftReplica in this process as a one-member cluster: the asyncio facade, observers, durability.

Multi-member behaviour (followers, elections, kills, secrets) is in test_cluster*.py with real processes.
"""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from appconnector.config import Config, ConfigError, PoolConfig
from appconnector.pool.api import Changes, PoolExhausted, PoolReader
from appconnector.pool.pysyncobj_engine import peer_status
from appconnector.pool.replica import BindError, RaftReplica, RaftTuning
from appconnector.pool.settings import PoolSettings, RaftSettings
from appconnector.pool.state import PoolState
from appconnector.secrets_file import MEMBER_SECRET_FILE
from tests.member import free_ports


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Changes] = []
        self.resets: list[list[tuple[str, str, int]]] = []

    def on_changes(self, changes: Changes) -> None:
        self.changes.append(changes)

    def on_reset(self, reader: PoolReader) -> None:
        self.resets.append(sorted((m.node, m.domain, m.address) for m in reader.mappings()))


def _replica(tmp_path: Path, address: str, partners: list[str], secret: str | None, *,
             prefix: str = "100.64.3.0/24", **kw: Any) -> RaftReplica:
    """A member with its state in ``tmp_path``, on the shipped pool settings but for the prefix."""
    pool = PoolSettings.from_config(Config(pool=PoolConfig(prefixes=(prefix,))))
    return RaftReplica(pool, RaftSettings(str(tmp_path), address, tuple(partners), secret), **kw)


async def _leader(replica: RaftReplica) -> None:
    for _ in range(300):
        if replica.is_leader():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("a one-member cluster did not elect itself")


def test_more_than_one_member_needs_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _replica(tmp_path, "127.0.0.1:1", ["127.0.0.1:2"], None)
    assert err.value.key == "cluster.secret_file"


def test_a_lone_member_without_a_secret_listens_with_one_of_its_own(tmp_path: Path) -> None:
    """No cluster.secret_file (the demo; tailscale mode without cluster.tag): the Raft port still only
    accepts peers that prove a secret, the member's own (0600 in the state directory, kept on restart);
    its status is read with that secret, never without one."""
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    secret_file = tmp_path / MEMBER_SECRET_FILE

    async def once() -> None:
        r = _replica(tmp_path, addr, [], None)
        await r.start()
        try:
            await _leader(r)
            assert r._engine is not None and r._engine.encryptor is not None, "pysyncobj runs with a password"
            status = await asyncio.to_thread(peer_status, addr, secret_file.read_text().strip())
            assert status is not None and status.self_address == addr
            assert await asyncio.to_thread(peer_status, addr, "not-the-secret", 1.0) is None
            assert await asyncio.to_thread(peer_status, addr, None) is None
        finally:
            await r.stop()

    asyncio.run(once())
    first = secret_file.read_text()
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and len(first.strip()) >= 32
    asyncio.run(once())
    assert secret_file.read_text() == first, "the member's secret is reused across restarts"


def test_checkouts_batch_notify_observers_and_survive_a_restart(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_ports(1)[0]}"

    async def first() -> dict[tuple[str, str], int]:
        r = _replica(tmp_path, addr, [], None)
        await r.start()
        await _leader(r)
        rec = Recorder()
        r.add_observer(rec)
        assert rec.resets == [[]]
        got = await asyncio.gather(*(r.checkout(f"n{i % 3}", f"d{i}.example", (0x01010101,), 60.0)
                                     for i in range(60)))
        assert len(set(zip([i % 3 for i in range(60)], got, strict=True))) == 60  # distinct per node
        assert sum(len(c.added) for c in rec.changes) == 60
        assert len(rec.changes) < 60  # gathered into fewer checkout_batch entries than checkouts
        assert await r.checkout("n0", "d0.example", (), 60.0) == got[0]  # idempotent
        assert r.targets("d5.example") == (0x01010101,)
        before = r.lookup("n0", "d0.example")
        assert before is not None
        for _ in range(300):  # the leader ticks the pool clock every second
            if r.stats()["clock"] > before[1]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the pool clock never ticked")
        at = r.now()
        r.touch("n0", got[0], "d0.example", at + 3600.0)  # a mark ahead of the pool clock is clamped to it
        for _ in range(200):  # flushed within a second
            found = r.lookup("n0", "d0.example")
            if found and found[1] > before[1]:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the touch never reached the state")
        assert found[1] <= r.stats()["clock"] < at + 3600.0
        await r.set_targets("d1.example", (0x02020202,), 30.0)
        assert r.targets("d1.example") == (0x02020202,)
        await r.stop()
        return {(m.node, m.domain): m.address for m in r.mappings()}

    async def second(expected: dict[tuple[str, str], int]) -> None:
        r = _replica(tmp_path, addr, [], None)
        await r.start()
        await _leader(r)
        for _ in range(300):
            if r.status()["applied_index"] == r.status()["commit_index"] and r.stats()["mappings"] == 60:
                break
            await asyncio.sleep(0.01)
        rec = Recorder()
        r.add_observer(rec)
        assert {(n, d): a for n, d, a in rec.resets[0]} == expected
        assert r.targets("d1.example") == (0x02020202,)
        await r.stop()

    expected = asyncio.run(first())
    asyncio.run(second(expected))


def test_pool_exhausted_reaches_the_caller(tmp_path: Path) -> None:
    async def run() -> None:
        r = _replica(tmp_path, f"127.0.0.1:{free_ports(1)[0]}", [], None, prefix="100.64.4.0/30")
        await r.start()
        await _leader(r)
        results = await asyncio.gather(*(r.checkout("n", f"d{i}.example", (), 60.0) for i in range(4)),
                                       return_exceptions=True)
        assert sum(isinstance(x, int) for x in results) == 3
        assert [type(x) for x in results if not isinstance(x, int)] == [PoolExhausted]
        await r.stop()

    asyncio.run(run())


def test_a_busy_raft_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = f"127.0.0.1:{busy.getsockname()[1]}"

        async def run() -> None:
            r = _replica(tmp_path, addr, [], None, tuning=RaftTuning(bind_wait=0.5))
            with pytest.raises(BindError, match=r"cannot listen for Raft on 127\.0\.0\.1"):
                await r.start()

        asyncio.run(run())


def test_release_of_many_long_names_is_split_below_the_batch_size(tmp_path: Path) -> None:
    """Revocation releases every mapping of a node's lost app in one call; through Raft that is several
    ``release_batch`` entries, each below ``batch_bytes``, and every named mapping goes."""
    async def run() -> None:
        r = _replica(tmp_path, f"127.0.0.1:{free_ports(1)[0]}", [], None, prefix="100.64.0.0/20")
        await r.start()
        await _leader(r)
        names = [f"{'x' * 200}.d{i}.example" for i in range(1500)]
        await asyncio.gather(*(r.checkout("nodeA", d, (), 60.0) for d in names))
        await r.checkout("nodeB", names[0], (), 60.0)
        rec = Recorder()
        r.add_observer(rec)
        await r.release([("nodeA", d) for d in names])
        assert all(r.lookup("nodeA", d) is None for d in names)
        assert r.lookup("nodeB", names[0]) is not None
        removed = [c.removed for c in rec.changes if c.removed]
        assert sum(map(len, removed)) == len(names)
        assert len(removed) > 1  # 1500 × ~220 bytes does not fit one entry
        budget = RaftTuning().batch_bytes
        assert all(sum(len(n) + len(d) + 16 for n, _, d in batch) < budget for batch in removed)
        await r.stop()

    asyncio.run(run())


def test_a_journal_grown_past_its_byte_limit_is_compacted_whatever_its_entry_count(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pysyncobj compacts by entry count only, and an entry carries up to ~500 checkouts: a restart then
    # replayed millions. Here the entry threshold is out of reach; the byte threshold must still compact.
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    tuning = RaftTuning(compaction_min_entries=1_000_000, compaction_min_time=3600.0,
                        compaction_min_bytes=64 << 10)
    long = "." + "x" * 60 + "." + "y" * 60

    async def fill() -> dict[tuple[str, str], int]:
        r = _replica(tmp_path, addr, [], None, prefix="100.64.0.0/16", tuning=tuning)
        await r.start()
        await _leader(r)
        for batch in range(10):  # ~300 KB of commands
            await asyncio.gather(*(r.checkout(f"n{i % 4}", f"d{batch}-{i}{long}.example", (0x01010101,), 60.0)
                                   for i in range(200)))
        for _ in range(1000):  # the engine looks every 0.5 s; the forked writer then takes a moment
            if r.paths.dump.exists() and int(r.status()["log_length"]) < 50:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"no compaction: dump {r.paths.dump.exists()}, log {r.status()['log_length']}")
        await r.stop()
        return {(m.node, m.domain): m.address for m in r.mappings()}

    async def restart(expected: dict[tuple[str, str], int]) -> None:
        r = _replica(tmp_path, addr, [], None, prefix="100.64.0.0/16", tuning=tuning)
        await r.start()
        await _leader(r)
        for _ in range(500):
            if r.stats()["mappings"] == len(expected):
                break
            await asyncio.sleep(0.01)
        assert {(m.node, m.domain): m.address for m in r.mappings()} == expected
        await r.stop()

    expected = asyncio.run(fill())
    assert len(expected) == 2000
    # the restart loads the dump once (validating it is that load): at a million mappings each is seconds
    loads: list[int] = []
    real = PoolState.from_bytes.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(PoolState, "from_bytes",
                        classmethod(lambda cls, data, prefixes: loads.append(len(data)) or real(cls, data, prefixes)))
    asyncio.run(restart(expected))
    assert len(loads) == 1
