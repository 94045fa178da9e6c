"""Both implementations of the pool contracts (``PoolAccess`` and ``ReplicaControl``, ``pool/api.py``),
for tests that must hold for each: ``LocalPool`` and a real one-member ``RaftReplica`` (pysyncobj,
journal under a temporary directory, on a free loopback port).

Use the ``replica_kind`` fixture (tests/conftest.py), parametrized over :data:`KINDS`, and
:func:`start_replica` on the event loop the test runs.
"""

from __future__ import annotations

import asyncio
import tempfile
import time

from appconnector.config import Config
from appconnector.pool.local import LocalPool
from appconnector.pool.replica import RaftReplica
from appconnector.pool.settings import PoolSettings, RaftSettings
from tests.member import free_ports

KINDS = ("local", "raft")


async def start_replica(kind: str, cfg: Config, state_dir: str | None = None) -> LocalPool | RaftReplica:
    """A started replica of ``kind`` over ``cfg.pool``; a Raft one leads and is caught up before this
    returns (until then DNS answers nothing from its local state)."""
    if kind == "local":
        pool = LocalPool(cfg.pool.prefixes, reuse_after=cfg.pool.reuse_after)
        await pool.start()
        return pool
    assert kind == "raft", kind
    state_dir = state_dir or tempfile.mkdtemp(prefix="acreplica-")
    replica = RaftReplica(PoolSettings.from_config(cfg), RaftSettings(state_dir, f"127.0.0.1:{free_ports(1)[0]}", ()))
    await replica.start()
    deadline = time.monotonic() + 15.0
    while not (replica.is_leader() and replica.caught_up()):
        if time.monotonic() > deadline:
            await replica.stop()
            raise AssertionError("a one-member Raft replica did not elect itself within 15 s")
        await asyncio.sleep(0.01)
    return replica
