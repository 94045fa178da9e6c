"""One fault run: a cluster, clients, a nemesis schedule, then the invariants and the history check.

The nemesis walks a list of steps (each a fault held for a while, then healed) in a loop until the run
ends. Afterwards every fault is healed, stopped members are resumed and dead ones restarted, and:

* every member converges to the same ``digest()`` (state and snapshot bytes);
* no member's state maps one address to two domains for a node;
* the whole history, with each member's final state as reads, is linearizable for the pool model
  (so no acknowledged checkout was lost and no stale answer was given).
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.cluster import Cluster, Member
from tests.faults.history import History, Verdict, check, no_two_domains
from tests.faults.nemesis import LoopbackNet
from tests.faults.workload import FaultLog, Mix, Stats, Unavailable, run_clients

Step = Callable[["Nemesis"], None]


class Nemesis:
    """Fault steps. Each injects one fault, holds it ``hold`` seconds (unless stopping) and heals it."""

    def __init__(self, cluster: Cluster, net: LoopbackNet, faults: FaultLog, stop: threading.Event,
                 hold: float = 1.5, seed: int = 7) -> None:
        self.cluster = cluster
        self.net = net
        self.faults = faults
        self.stop = stop
        self.hold = hold
        self.rng = random.Random(seed)

    def _leader_or_any(self) -> Member:
        try:
            return self.cluster.leader(timeout=3.0)
        except AssertionError:
            return self.rng.choice(self.cluster.live() or list(self.cluster.members.values()))

    def _wait(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def kill_leader(self) -> None:
        m = self._leader_or_any()
        f = self.faults.begin("kill -9", m.name, "leader")
        m.kill()
        self._wait(self.hold)
        m.start()
        m.wait_ready()
        self.faults.end(f)

    def kill_follower(self) -> None:
        leader = self._leader_or_any()
        m = self.rng.choice([x for x in self.cluster.members.values() if x is not leader])
        f = self.faults.begin("kill -9", m.name, "follower")
        m.kill()
        self._wait(self.hold)
        m.start()
        m.wait_ready()
        self.faults.end(f)

    def pause_leader(self) -> None:
        m = self._leader_or_any()
        f = self.faults.begin("SIGSTOP", m.name, "leader")
        m.pause()
        self._wait(self.hold)
        m.resume()
        self.faults.end(f)

    def pause_follower(self) -> None:
        leader = self._leader_or_any()
        m = self.rng.choice([x for x in self.cluster.members.values() if x is not leader])
        f = self.faults.begin("SIGSTOP", m.name, "follower")
        m.pause()
        self._wait(self.hold)
        m.resume()
        self.faults.end(f)

    def isolate_leader(self) -> None:
        m = self._leader_or_any()
        f = self.faults.begin("partition", m.name, "leader isolated")
        self.net.partition({m.name})
        self._wait(self.hold * 1.5)
        self.net.heal()
        self.faults.end(f)

    def bridge_partition(self) -> None:
        """m1 and m3 cannot talk, m2 talks to both (non-transitive)."""
        names = sorted(self.cluster.members)
        a, b = names[0], names[-1]
        f = self.faults.begin("partition", f"{a}|{b}", "bridge (non-transitive)")
        self.net.cut_pairs([(a, b)])
        self._wait(self.hold * 1.5)
        self.net.heal()
        self.faults.end(f)

    def reset_storm(self) -> None:
        """Reset every connection of one member every 0.25 s while clients write."""
        m = self._leader_or_any()
        f = self.faults.begin("tcp reset", m.name, "storm")
        end = time.monotonic() + self.hold * 1.5
        n = 0
        while time.monotonic() < end and not self.stop.is_set():
            n += self.net.reset(m.name, m.pid if m.running() else None)
            self._wait(0.25)
        f.detail = f"storm, {n} connections reset"
        self.faults.end(f)

    def restart_member(self) -> None:
        """A planned restart (SIGTERM: leadership handed away, then start again)."""
        m = self._leader_or_any()
        f = self.faults.begin("restart", m.name, "SIGTERM + start")
        m.stop()
        m.start()
        m.wait_ready()
        self.faults.end(f)

    def run(self, steps: list[Step], settle: float = 0.5) -> None:
        i = 0
        while steps and not self.stop.is_set():
            steps[i % len(steps)](self)
            i += 1
            self._wait(settle)


ALL_STEPS: list[Step] = [Nemesis.kill_leader, Nemesis.pause_follower, Nemesis.isolate_leader, Nemesis.reset_storm,
                         Nemesis.kill_follower, Nemesis.pause_leader, Nemesis.bridge_partition,
                         Nemesis.restart_member]


@dataclass
class RunResult:
    history: History
    verdict: Verdict
    faults: FaultLog
    stats: Stats
    digests: dict[str, str]
    problems: list[str] = field(default_factory=list)
    mappings: int = 0
    lagging_read_keys: int = 0
    guard: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"operations": len(self.history.ops), "checked": self.verdict.operations,
                "partitions": self.verdict.partitions, "anomalies": len(self.verdict.anomalies),
                "lagging_read_keys": self.lagging_read_keys,
                "faults": self.faults.counts(), "ops": self.history.counts(), "mappings": self.mappings,
                "guard": self.guard,
                "problems": self.problems, "client_errors": self.stats.errors[:5]}


def run(cluster: Cluster, net: LoopbackNet, *, duration: float, steps: list[Step], mix: Mix, clients: int,
        reuse_after: float, clock_slack: float = 0.0, hold: float = 1.5, seed: int = 1,
        restart_all: bool = True, artifacts: Path | None = None) -> RunResult:
    history = History()
    faults = FaultLog()
    probe = getattr(cluster, "probe_node", "acfault-probe")  # a node the clients never use
    stop = threading.Event()
    nemesis = Nemesis(cluster, net, faults, stop, hold=hold, seed=seed)
    nem = threading.Thread(target=nemesis.run, args=(steps,), name="acfault-nemesis", daemon=True)
    nem.start()
    stats = run_clients(history, cluster.live, mix, clients, duration, seed=seed)
    stop.set()
    nem.join(60)
    net.heal()
    for m in cluster.members.values():
        if m.running() and m.paused:
            m.resume()
        if not m.running():
            m.start()
            m.wait_ready()
    if restart_all:
        # The whole cluster down at once (kill -9) and back: nothing acknowledged may be lost.
        f = faults.begin("kill -9", "all", "whole cluster")
        for m in cluster.members.values():
            m.kill()
        for m in cluster.members.values():
            m.start()
        for m in cluster.members.values():
            m.wait_ready()
        faults.end(f)
        # After a whole-cluster restart a member's state is what it replayed; a leader commits a new entry
        # (a checkout) before followers apply everything, so issue one.
        cluster.leader(timeout=15)
        for m in cluster.live():
            try:
                m.checkout(probe, "probe.example.com", 10.0)
                break
            except Unavailable:
                continue
    digests = cluster.wait_converged(timeout=30)
    problems: list[str] = []
    guard: dict[str, int] = {}  # journal guard counters summed over members (since their last start)
    total = 0
    t = history.now()
    for m in cluster.members.values():
        digest, maps = m.state()
        if digest != digests[m.name]:
            problems.append(f"{m.name}: digest changed after convergence ({digests[m.name]} → {digest})")
        maps = [x for x in maps if x[0] != probe]
        total = len(maps)
        problems += [f"{m.name}: {p}" for p in no_two_domains(maps)]
        history.record_state(m.name, maps, at=t)
        st = m.status()
        for k in ("appends_rewritten", "tails_held", "truncations_refused", "diverged"):
            if isinstance(st.get(k), int):
                guard[k] = guard.get(k, 0) + int(st[k])
        if st.get("diverged"):
            problems.append(f"{m.name}: diverged {st.get('diverged')} (raft safety)")
        if "may have diverged" in m.log_text():
            problems.append(f"{m.name}: logged 'may have diverged'")
    verdict = check(history, reuse_after=reuse_after, clock_slack=clock_slack)
    # For the record: how many keys saw a local read that lagged (allowed by design, docs/design.md §3).
    strict = [dataclasses.replace(o, stale_ok=False) for o in history.ops]
    lagging = len(check(strict, reuse_after=reuse_after, clock_slack=clock_slack).anomalies)
    result = RunResult(history, verdict, faults, stats, digests, problems, total, lagging, guard)
    if artifacts is not None:
        artifacts.mkdir(parents=True, exist_ok=True)
        history.save(artifacts / "history.jsonl")
        (artifacts / "summary.json").write_text(json.dumps(result.summary(), indent=2, default=str))
        (artifacts / "verdict.txt").write_text(verdict.explain())
    return result
