"""The Raft engine seam (pool/engine.py) holds: pysyncobj stays behind it, and another engine drops in.

* Only the pysyncobj engine and the storage module import pysyncobj; the replica and the membership code
  read no pysyncobj field or status key (they see ``EngineStatus``).
* ``PoolSyncObj`` implements every member of the ``Engine`` protocol (mypy cannot check it: its base
  class is untyped).
* ``RaftReplica`` runs on an engine that is not pysyncobj at all: a one-member engine written here.
"""

from __future__ import annotations

import ast
import asyncio
import gzip
import inspect
import pickle
import queue
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import appconnector
from appconnector.config import ClusterConfig, Config, PoolConfig
from appconnector.pool.engine import (
    FOLLOWER,
    LEADER,
    MEMBER,
    Engine,
    EngineHooks,
    EngineSpec,
    EngineStatus,
    ResultCallback,
    StateMachine,
)
from appconnector.pool.membership import leader_status
from appconnector.pool.pysyncobj_engine import PoolSyncObj, status_from_pysyncobj
from appconnector.pool.replica import RaftReplica
from appconnector.pool.settings import PoolSettings, RaftSettings
from appconnector.pool.state import PoolState
from appconnector.pool.storage import STATE_FORMAT, _DumpedState, read_dump

PACKAGE = Path(appconnector.__file__).parent
ALLOWED = {"pool/pysyncobj_engine.py", "pool/storage.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_engine_and_storage_modules_import_pysyncobj() -> None:
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if any(n == "pysyncobj" or n.startswith("pysyncobj.") for n in _imports(p))}
    assert "pool/pysyncobj_engine.py" in importers, "the check looks at the right files"
    assert importers <= ALLOWED, f"pysyncobj imported outside the engine seam: {sorted(importers - ALLOWED)}"


def test_the_replica_and_membership_read_no_pysyncobj_field_or_status_key() -> None:
    words = ("raftLastApplied", "raftCommitIndex", "raftCurrentTerm", "_SyncObj", "partner_node_status",
             "leader_commit_idx", "match_idx_server", "log_len", "raft_term", "appconnector_membership",
             "addNodeToCluster", "removeNodeFromCluster", "transferLeadership", "getStatus")
    for module in ("pool/replica.py", "pool/membership.py", "tailnet/membership.py"):
        text = (PACKAGE / module).read_text()
        found = [w for w in words if re.search(rf"\b{w}\b", text)]
        assert not found, f"{module} reaches past the engine seam: {found}"


def test_the_pysyncobj_engine_implements_every_member_of_the_protocol() -> None:
    members = {n for n in vars(Engine) if not n.startswith("_")}
    assert {"propose", "status", "state", "close"} <= members
    for name in sorted(members):
        want = getattr(Engine, name)
        have = getattr(PoolSyncObj, name, None)
        assert have is not None, f"PoolSyncObj lacks Engine.{name}"
        assert isinstance(have, property) == isinstance(want, property), f"Engine.{name}: property or method"
        if not isinstance(want, property):
            assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name


def test_a_peers_pysyncobj_status_becomes_typed_values() -> None:
    raw = {"self": "10.0.0.1:6270", "leader": "10.0.0.1:6270", "raft_term": 7, "commit_idx": 40,
           "last_applied": 39, "leader_commit_idx": 40, "log_len": 12, "appconnector_membership": MEMBER,
           "partner_node_status_server_10.0.0.2:6270": 2, "partner_node_status_server_10.0.0.3:6270": 0,
           "match_idx_server_10.0.0.2:6270": 40}
    st = status_from_pysyncobj(raw)
    assert st == EngineStatus(self_address="10.0.0.1:6270", role=LEADER, leader="10.0.0.1:6270", term=7,
                              commit_index=40, last_applied=39, leader_commit=40, log_length=12,
                              members=("10.0.0.1:6270", "10.0.0.2:6270", "10.0.0.3:6270"),
                              connected=("10.0.0.2:6270",), match_index={"10.0.0.2:6270": 40}, membership=MEMBER)
    follower = status_from_pysyncobj({**raw, "self": "10.0.0.2:6270", "raft_term": 8})
    assert follower.role == FOLLOWER and not follower.claims_leadership()
    assert leader_status({"a": st, "b": follower}) is st


# --- another engine ---------------------------------------------------------------------------------------


class SoloEngine:
    """A one-member "Raft": every proposal is committed at once and applied in order on its own thread."""

    def __init__(self, spec: EngineSpec, initial: StateMachine, hooks: EngineHooks) -> None:
        self.spec = spec
        self._state = initial
        self._lock = threading.Lock()
        self._hooks = hooks
        self._membership = MEMBER
        self._applied = 0
        self._work: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._work.put(hooks.on_role_change)

    def _run(self) -> None:
        while (fn := self._work.get()) is not None:
            fn()

    @property
    def state(self) -> StateMachine:
        return self._state

    @property
    def state_lock(self) -> threading.Lock:
        return self._lock

    @property
    def failure(self) -> str | None:
        return None

    @property
    def found(self) -> Mapping[str, object]:
        return {"engine": "solo"}

    def propose(self, request_id: str, command: tuple[Any, ...], callback: ResultCallback) -> None:
        def apply() -> None:
            with self._lock:
                result, changes = self._state.apply(command)
                self._applied += 1
            self._hooks.on_applied(request_id, command, result, changes)
            callback(result, 0)
        self._work.put(apply)

    def is_leader(self) -> bool:
        return True

    def leader(self) -> str | None:
        return self.spec.self_address

    def status(self) -> EngineStatus:
        me = self.spec.self_address
        return EngineStatus(me, LEADER, me, 1, self._applied, self._applied, self._applied, self._applied,
                            (me,), (), {}, self._membership)

    def engine_details(self) -> Mapping[str, object]:
        return {"engine": "solo"}

    def last_heard(self) -> Mapping[str, float]:
        return {}

    def set_membership_state(self, state: str) -> None:
        self._membership = state

    def change_members(self, action: str, address: str, done: Callable[[bool, str], None]) -> None:
        self._work.put(lambda: done(False, "a solo engine has no other members"))

    def transfer_leadership(self, done: Callable[[bool], None]) -> None:
        self._work.put(lambda: done(False))

    def call_on_tick(self, fn: Callable[[], None]) -> None:
        self._work.put(fn)

    def close(self) -> None:
        self._work.put(None)
        self._thread.join(5)


def test_the_replica_runs_on_another_engine_through_the_seam(tmp_path: Path) -> None:
    started: list[SoloEngine] = []

    def solo(spec: EngineSpec, initial: StateMachine, restore: Callable[[bytes], StateMachine],
             hooks: EngineHooks) -> Engine:
        engine = SoloEngine(spec, initial, hooks)
        # an engine replays its journal while it is being built: the hooks run before the factory returns
        done = threading.Event()
        engine.propose("replayed", ("tick", 1000.0), lambda result, err: done.set())
        assert done.wait(5)
        started.append(engine)
        return engine

    cfg = Config(pool=PoolConfig(prefixes=("100.64.9.0/24",)), cluster=ClusterConfig(state_dir=str(tmp_path)))

    async def run() -> None:
        r = RaftReplica(PoolSettings.from_config(cfg), RaftSettings.from_config(cfg, "127.0.0.1:1", []),
                        engine_factory=solo)
        await r.start()
        try:
            assert 1000.0 <= r.now() < 2000.0, "the pool clock replayed at start, not the wall clock"
            first = await r.checkout("node-a", "example.com", (0x5DB8D822,), 60.0)
            assert await r.checkout("node-a", "example.com", (0x5DB8D822,), 60.0) == first
            assert r.lookup("node-a", "example.com") is not None
            st = r.status()
            assert st["engine"] == "solo" and st["role"] == LEADER and st["members"] == ["127.0.0.1:1"]
            # the two checkouts and the pool-clock ticks the leader proposes, each seen through on_applied
            assert st["applied_index"] >= 2 and st["applied_index"] == r.applied
            assert r.started_info == {"engine": "solo"}
        finally:
            await r.stop()

    asyncio.run(run())
    assert len(started) == 1 and started[0].spec.member_dir.parent == tmp_path
    assert not started[0]._thread.is_alive(), "stop() closed the engine"


def test_a_full_dump_written_before_the_storage_module_still_reads(tmp_path: Path) -> None:
    """Dumps written by earlier versions name the pickled state class ``appconnector.pool.engine._DumpedState``."""
    state = PoolState(("100.64.9.0/24",))
    dump = ([{}, {"pool": _DumpedState(STATE_FORMAT, data=state.to_bytes())}], (b"x", 7, 1), (b"y", 6, 1), [])
    text = pickle.dumps(dump, 0).replace(b"appconnector.pool.storage\n_DumpedState",
                                         b"appconnector.pool.engine\n_DumpedState")
    assert b"appconnector.pool.engine" in text and b"appconnector.pool.storage" not in text
    path = tmp_path / "dump"
    path.write_bytes(gzip.compress(text))
    restored = read_dump(path)
    assert restored[1] == (b"x", 7, 1)
    assert PoolState.from_bytes(restored[0][1]["pool"].data, ("100.64.9.0/24",)).digest() == state.digest()
