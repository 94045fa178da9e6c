"""Scale: a 3-member cluster holding 100k to millions of mappings (issue 12, "Scale").

    .venv/bin/python bench/bench_scale.py [--sizes 100000,1000000] [--nodes-per-100k 100] [--json out.json]

Real member processes on loopback (``python -m tests.member``: the shipped ``RaftReplica`` with
``RaftTuning()``: compaction after 5,000 entries or 300 s, full dumps and journal on disk, shared secret),
loaded through the leader with new checkouts (nodes × shared domain names, as a tailnet maps them: every
node maps the same names). Per size it measures:

* RSS per member (leader and followers; anonymous and file-backed), bytes per mapping, disk per member;
* a full dump (log compaction) under a light probe load: how long each member's forked writer took (from
  the ``dump.tmp`` file appearing to its rename), Raft terms before and after (an election shows as a new
  term), and the p99 / max of known-name lookups and of new-name checkouts at the leader and a follower
  while dumps run;
* a follower stopped, more mappings written, restarted from its own disk: start to ready, ready to caught up;
* a follower with an empty state directory (a member joining from nothing): start to serving (caught up
  with every mapping, from the leader's snapshot);
* the leader killed (SIGKILL): time to the next answered new-name checkout through a follower.

Develop at 100k; 1M and 5M load the shared machine heavily (5M × 3 members: ~1.5 GiB each with shared
names, ~2.5 GiB with ``--distinct``; check ``free -g``). Plot: bench/plot_scale.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.member import MemberError, MemberProcess, free_ports

DOMAINS_PER_NODE = 1000
LOAD_CHUNK = 200_000  # one `load` call at a time, so progress shows and no call runs for many minutes


def rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def disk_bytes(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (what du counts: the mmap'd journal is sparse at its tail)."""
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            total += p.stat().st_blocks * 512
    return total


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret = root / "secret"
        self.secret.write_text("bench-scale-secret\n")
        self.secret.chmod(0o600)  # the member refuses a secret others can read
        self.addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
        self.members = [self._member(a) for a in self.addrs]

    def _member(self, addr: str) -> MemberProcess:
        i = self.addrs.index(addr)
        return MemberProcess(addr, [b for b in self.addrs if b != addr], self.root / "state",
                             secret_file=self.secret, log_path=self.root / f"member{i}.log")

    def start(self) -> None:
        for m in self.members:
            m.start()
        for m in self.members:
            m.wait_ready()
        self.wait_leader()

    def restart(self, i: int) -> MemberProcess:
        self.members[i] = self._member(self.addrs[i]).start()
        return self.members[i]

    def state_dir(self, i: int) -> Path:
        return self.root / "state" / ("raft-" + self.addrs[i].replace(":", "_"))

    def wait_leader(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = [m.status() if m.alive() else None for m in self.members]
            except MemberError:
                time.sleep(0.1)
                continue
            leaders = [i for i, s in enumerate(st) if s and s["role"] == "leader"]
            if len(leaders) == 1 and all(s["leader"] for s in st if s):
                return leaders[0]
            time.sleep(0.1)
        raise RuntimeError("no leader")

    def statuses(self) -> list[dict[str, Any] | None]:
        return [m.status(timeout=30) if m.alive() else None for m in self.members]

    def wait_applied(self, timeout: float = 600.0) -> None:
        """Until every live member applied the leader's commit index as it was when called."""
        leader = self.members[self.wait_leader()]
        target = leader.status()["commit_index"]
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.alive():
                while m.status(timeout=30)["applied_index"] < target:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{m.self_address} did not catch up")
                    time.sleep(0.2)

    def kill_all(self) -> None:
        for m in self.members:
            m.kill()


DISTINCT = False  # --distinct: every mapping its own name (the worst case for memory) instead of nodes × names


def load(cluster: Cluster, leader: int, start: int, count: int, nodes: int, prefix: str = "n") -> float:
    """Checkouts ``start`` .. ``start+count`` of the nodes × names grid, through the leader; returns /s."""
    done, t0 = 0, time.perf_counter()
    while done < count:
        n = min(LOAD_CHUNK, count - done)
        # the grid: request i maps node i % nodes and name i // nodes; chunks continue the numbering by
        # starting each at a multiple of nodes (domain_prefix carries the chunk's first name)
        first = start + done if DISTINCT else (start + done) // nodes
        r = cluster.members[leader].call("load", count=n, concurrency=2000, nodes=nodes, node_prefix=prefix,
                                         domain_prefix=f"c{first}-", shared_domains=not DISTINCT, record=False,
                                         return_acked=False, timeout=3600)
        if r["errors"]:
            raise RuntimeError(f"load errors: {r['errors']}")
        done += n
        print(f"    loaded {start + done:,} ({r['rate']:,.0f}/s)", flush=True)
    return count / (time.perf_counter() - t0)


class Probe:
    """A sequential client on one member: known-name lookups or new-name checkouts, each timed."""

    def __init__(self, member: MemberProcess, kind: str, tag: str, known: tuple[str, str]) -> None:
        self.member, self.kind, self.tag, self.known = member, kind, tag, known
        self.samples: list[tuple[float, float]] = []  # (monotonic start, milliseconds)
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                if self.kind == "lookup":
                    r = self.member.call("lookup", node=self.known[0], domain=self.known[1], timeout=30)
                    if r["address"] is None:
                        raise RuntimeError("known name not found")
                else:
                    self.member.call("checkout", node=f"probe-{self.tag}", domain=f"p{i}.probe.example",
                                     targets=[16843009], ttl=60, timeout=30)
                    i += 1
            except (MemberError, RuntimeError):
                self.errors += 1
            self.samples.append((t0, (time.monotonic() - t0) * 1000))
            self.stop.wait(0.005)

    def window(self, a: float, b: float) -> list[float]:
        return [ms for t, ms in self.samples if a <= t <= b]


def watch_dumps(cluster: Cluster, timeout: float) -> list[dict[str, float] | None]:
    """Watch every member's dump file until each was rewritten once: (start, end) of its dump.tmp."""
    paths = [cluster.state_dir(i) for i in range(3)]
    before = [os.stat(p / "dump").st_ino if (p / "dump").exists() else None for p in paths]
    seen: list[dict[str, float] | None] = [None, None, None]
    tmp_since: list[float | None] = [None, None, None]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(s is None for s in seen):
        now = time.monotonic()
        for i, p in enumerate(paths):
            if seen[i] is not None:
                continue
            if tmp_since[i] is None and (p / "dump.tmp").exists():
                tmp_since[i] = now
            try:
                ino = os.stat(p / "dump").st_ino
            except FileNotFoundError:
                continue
            if ino != before[i]:
                start = tmp_since[i] if tmp_since[i] is not None else now
                seen[i] = {"start": start, "end": now, "seconds": now - start}
        time.sleep(0.002)
    return seen


def measure_dump(cluster: Cluster, leader: int, known: tuple[str, str], timeout: float) -> dict[str, Any]:
    follower = next(i for i in range(3) if i != leader)
    probes = [Probe(cluster.members[leader], "lookup", "l", known),
              Probe(cluster.members[follower], "lookup", "f", known),
              Probe(cluster.members[leader], "checkout", "l", known),
              Probe(cluster.members[follower], "checkout", "f", known)]
    terms_before = [s["term"] for s in cluster.statuses() if s]
    t_start = time.monotonic()
    for p in probes:
        p.thread.start()
    dumps = watch_dumps(cluster, timeout)
    time.sleep(0.5)
    for p in probes:
        p.stop.set()
    for p in probes:
        p.thread.join()
    terms_after = [s["term"] for s in cluster.statuses() if s]
    done = [d for d in dumps if d]
    a = min((d["start"] for d in done), default=t_start)
    b = max((d["end"] for d in done), default=time.monotonic())
    out: dict[str, Any] = {"dump_seconds": [round(d["seconds"], 3) if d else None for d in dumps],
                           "terms_before": terms_before, "terms_after": terms_after,
                           "elections": max(terms_after) - max(terms_before),
                           "window": round(b - a, 3), "waited": round(a - t_start, 1)}
    for p, name in zip(probes, ("lookup_leader", "lookup_follower", "checkout_leader", "checkout_follower"),
                       strict=True):
        during = p.window(a - 0.05, b + 0.3)
        out[name] = {"n": len(during), "p50": percentile(during, 0.5), "p99": percentile(during, 0.99),
                     "max": max(during, default=float("nan")), "errors": p.errors,
                     "outside_p99": percentile([ms for t, ms in p.samples if not a - 0.05 <= t <= b + 0.3], 0.99)}
    return out


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def safe_status(m: MemberProcess) -> dict[str, Any] | None:
    try:
        return m.status(timeout=5)
    except MemberError:
        return None


def measure_restart(cluster: Cluster, leader: int, nodes: int, total: int, extra: int) -> dict[str, Any]:
    """Follower stopped, ``extra`` more mappings written, restarted from its own disk."""
    i = next(j for j in range(3) if j != leader)
    cluster.members[i].stop()
    load(cluster, leader, total, extra, nodes, prefix="r")
    target = cluster.members[leader].status()["commit_index"]
    ready, caught_up, _ = restart_timed(cluster, i, lambda s: s["applied_index"] >= target, "catching up")
    return {"ready": ready, "caught_up": caught_up, "backlog": extra}


def restart_timed(cluster: Cluster, i: int, done: Callable[[dict[str, Any]], bool], what: str
                  ) -> tuple[float, float, MemberProcess]:
    """Start member ``i``: seconds to its ready line, then from there until it is caught up and ``done``."""
    t0 = time.monotonic()
    m = cluster.restart(i)
    m.wait_ready(timeout=300)
    ready = time.monotonic() - t0

    def finished() -> bool:
        s = safe_status(m)
        return bool(s and s["caught_up"] and done(s))

    return ready, wait_until(finished, 600, f"member {i} {what}"), m


def measure_join(cluster: Cluster, leader: int) -> dict[str, Any]:
    """A follower's state directory wiped: it joins from nothing and gets the leader's snapshot."""
    i = next(j for j in range(3) if j != leader)
    cluster.members[i].kill()
    shutil.rmtree(cluster.state_dir(i))
    want = cluster.members[leader].status()["mapping_count"]
    ready, serving_after, m = restart_timed(cluster, i, lambda s: s["mapping_count"] >= want, "serving")
    return {"ready": ready, "serving": ready + serving_after, "rss": rss(m.status()["pid"])}


def measure_failover(cluster: Cluster, leader: int) -> dict[str, Any]:
    """SIGKILL the leader; a client on a follower asks new names one after another until one is answered."""
    f = next(j for j in range(3) if j != leader)
    fm = cluster.members[f]
    fm.call("checkout", node="fo", domain="before.fo.example", targets=[16843009], ttl=60)
    result: dict[str, float] = {}
    stop = threading.Event()
    killed_at: list[float] = []

    def client() -> None:
        k = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                fm.call("checkout", node="fo", domain=f"f{k}.fo.example", targets=[16843009], ttl=60, timeout=60)
                if killed_at and t0 >= killed_at[0]:
                    result["answered"] = time.monotonic() - killed_at[0]
                    return
            except MemberError:
                pass
            k += 1

    th = threading.Thread(target=client, daemon=True)
    th.start()
    time.sleep(0.5)
    killed_at.append(time.monotonic())
    cluster.members[leader].kill()
    th.join(timeout=120)
    stop.set()
    new_leader = cluster.wait_leader()
    return {"answered": result.get("answered", float("nan")), "new_leader": cluster.addrs[new_leader]}


def run_size(total: int, nodes: int, *, skip_failover: bool = False) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="acscale-", dir=os.environ.get("ACSCALE_DIR")))
    cluster = Cluster(tmp)
    out: dict[str, Any] = {"mappings": total, "nodes": nodes, "domains": total // nodes}
    try:
        cluster.start()
        time.sleep(1.0)
        base = [rss(s["pid"]) for s in cluster.statuses() if s]
        out["rss_empty"] = base
        leader = cluster.wait_leader()
        print(f"  {total:,} mappings: {nodes} nodes × {total // nodes} names", flush=True)
        out["load_rate"] = load(cluster, leader, 0, total, nodes)
        cluster.wait_applied()
        # elections during the bulk load show as terms above 1; snapshot installs as observer resets above 1
        st = cluster.statuses()
        out["after_load"] = {"terms": [s["term"] for s in st if s],
                             "resets": [s["observer"]["resets"] for s in st if s]}
        known = ("n0", "c0-0.example")  # request 0 of either grid
        # dumps (log compaction, shipped thresholds) under the probes
        out["dump"] = measure_dump(cluster, leader, known, timeout=400)
        cluster.wait_applied()
        st = cluster.statuses()
        out["roles"] = [s["role"] for s in st if s]
        out["mapping_count"] = [s["mapping_count"] for s in st if s]
        out["rss"] = [rss(s["pid"]) for s in st if s]
        out["disk"] = [disk_bytes(cluster.state_dir(i)) for i in range(3)]
        out["dump_file"] = [(cluster.state_dir(i) / "dump").stat().st_size for i in range(3)]
        leader = cluster.wait_leader()
        out["restart"] = measure_restart(cluster, leader, nodes, total, extra=max(10_000, total // 100))
        leader = cluster.wait_leader()
        out["join"] = measure_join(cluster, leader)
        if not skip_failover:
            leader = cluster.wait_leader()
            out["failover"] = measure_failover(cluster, leader)
        out["load_avg_after"] = os.getloadavg()
        return out
    finally:
        cluster.kill_all()
        logs = Path(os.environ.get("ACSCALE_LOGS", "/tmp/acscale-logs")) / f"{total}"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True, exist_ok=True)
        for p in tmp.glob("member*.log"):
            shutil.copy(p, logs / p.name)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--domains", type=int, default=DOMAINS_PER_NODE, help="names per node (nodes = size / this)")
    ap.add_argument("--json", default=None, help="append each size's result here (one JSON line)")
    ap.add_argument("--skip-failover", action="store_true")
    ap.add_argument("--distinct", action="store_true", help="every mapping its own name (default: nodes × names)")
    args = ap.parse_args()
    global DISTINCT
    DISTINCT = args.distinct
    for size in (int(s) for s in args.sizes.split(",")):
        load_before = os.getloadavg()
        r = run_size(size, max(1, size // args.domains), skip_failover=args.skip_failover)
        r["load_avg_before"] = load_before
        r["distinct"] = DISTINCT
        r["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(json.dumps(r, indent=1), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
