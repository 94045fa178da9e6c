"""The cluster rows of the natc side by side (issue 16): 3 natc ``--cluster-tag`` against 3 of ours.

    ./dev bench bench_natc_cluster [--seconds 5] [--rounds 2] [--scale 100000] [--scale-seconds 900]
                                   [--budget 2700] [--stages dns,failover,scale]

Needs root and ``./dev peers``. One real tailnet (tests/realnet/tailnet.py, tests/realnet/natc.py):
ours = three tagged connectors c1-c3 (``appconnector run`` beside tailscaled, shipped settings, one
Raft cluster over the tailnet), natc = three natc v1.102.3 processes (tsnet nodes of their own) with
``--cluster-tag=tag:natc`` (tsconsensus: hashicorp/raft over the tailnet, a bolt store in the state
directory), each started the way its docs say (natc: the first alone until it leads, then the
others). Both ask the same upstream; four client nodes cl1-cl4 reach each cluster's DNS address and
pool addresses through WireGuard (the primary subnet router of each pool serves them). The two are
measured alternately on the same tailnet (ours, natc, ours, natc … for ``--rounds``; best round kept).

Stages:
  dns       known-name qps (dnsperf, 4 senders in each client at once) and p99 (a timed sender in cl1
            during that load); first answer of a new name p50/p99, every client asking fresh names at
            once (sequential per client).
  failover  on each cluster: (1) kill -9 the Raft leader (ours: the member's host, connector +
            tailscaled; natc: its process, which is its node), (2) after it is back, kill -9 the
            primary subnet router (ours: that host's tailscaled alone; natc: its process). After each,
            from cl1: time to the next answered new name, and to the next working TCP connection
            (DNS answer given before the kill, HTTP through it) of an existing mapping.
  scale     ``--scale`` mappings checked out through each cluster's DNS: every client asks the same
            ``scale / 4`` fresh names (so mappings = nodes × names), 16 queries in flight per client,
            a query answered SERVFAIL or unanswered after 3 s sent again (3 tries in all). Then checkout
            p50/p99 (from the first send to the answer, as the client sees it), checkouts/s, RSS of the
            three members (ours: with their tailscaled) and their Raft state on disk. Each pool gets a
            second, larger prefix for it (a /24 holds 253 mappings per node): ours 100.96.0.0/16, natc
            100.112.0.0/16. ``--systems natc`` runs only natc's scale stage (``--stages scale``).
  Members whose process exits by itself are reported with their last fatal log line (natc's cluster
  mode can crash: "fatal error: concurrent map read and map write" in ConsensusIPPool.IPForDomain).

Prints a markdown table (rows for bench/README.md's natc table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dnslib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_natc import (
    DNS,
    SYSTEMS,
    Budget,
    Results,
    Spec,
    dnsperf,
    first_byte,
    keep_best,
    pct,
    rss_mib,
    table_rows,
    timed_queries,
)

from tests.faults.netns import entered
from tests.realnet.natc import (
    NATC_POOL,
    NATC_TAG,
    OURS_DNS,
    Natc,
    allow_natc,
    natc_missing,
    ours_config,
    stable_name,
    start_corpus_upstream,
)
from tests.realnet.tailnet import POOL, RAFT_PORT, TAG, Node, Tailnet, resolve_in, running, wait_for

OURS_SCALE = "100.96.0.0/16"
NATC_SCALE = "100.112.0.0/16"
CLIENTS = 4
BOUND = 120.0  # seconds a failover probe waits before it records "not within"


class Cluster:
    """One system's three members as the bench sees them: pids, leader, primary, kill and restart."""

    def __init__(self, system: str, net: Tailnet, conns: list[Node], natcs: list[Natc], cfgs: dict[str, Path]) -> None:
        self.system, self.net, self.conns, self.natcs, self.cfgs = system, net, conns, natcs, cfgs
        self.exited: dict[str, str] = {}  # member -> why, for members that exited by themselves
        self.killed: set[int] = set()     # pids the bench killed

    def check_exits(self) -> dict[str, str]:
        """Members whose process ended without the bench killing it, each with its last fatal log line."""
        procs = ({c.name: c.appconnector for c in self.conns} if self.system == "ours"
                 else {n.name: n.proc for n in self.natcs})
        for name, p in procs.items():
            if p is not None and not p.running() and name not in self.exited and p.pid not in self.killed:
                lines = p.log(200_000).splitlines()
                fatal = [ln for ln in lines if ln.startswith(("fatal error", "panic:")) or "level=error" in ln]
                self.exited[name] = (fatal or lines or ["(no log)"])[-1][:160]
        return self.exited

    def names(self) -> list[str]:
        return [c.name for c in self.conns] if self.system == "ours" else [n.name for n in self.natcs]

    def pids(self) -> list[int]:
        if self.system == "ours":
            return [p.pid for c in self.conns for p in (c.appconnector, c.tailscaled) if p is not None and p.running()]
        return [n.proc.pid for n in self.natcs if n.proc.running()]

    def state_bytes(self) -> int:
        """The largest Raft state directory of the members (ours: journal + snapshots; natc: its
        ``cluster`` directory, bolt store + snapshots)."""
        dirs = ([c.dir / "appconnector-state" for c in self.conns] if self.system == "ours"
                else [n.dir / "state" / "cluster" for n in self.natcs])
        return max(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in dirs)

    def leader(self) -> str | None:
        if self.system == "ours":
            by_raft = {f"{c.ip4()}:{RAFT_PORT}": c.name for c in self.conns if c.tailscaled and c.tailscaled.running()}
            for c in self.conns:
                if c.appconnector and c.appconnector.running():
                    code, doc = c.http_get("/cluster/members")
                    if code == 200 and doc.get("leader") in by_raft:
                        return by_raft[doc["leader"]]
            return None
        # hashicorp/raft logs every state change; the leader is the running member whose last one is leader
        for n in self.natcs:
            if n.proc.running():
                log = n.proc.log_path.read_text(errors="replace")
                last = max(("entering follower", "entering candidate", "entering leader"), key=log.rfind)
                if last == "entering leader" and log.rfind(last) > log.rfind("---- start"):
                    return n.name
        return None

    def primary(self, client: Node) -> str | None:
        """The host the clients' tailscaled sends this pool's traffic to (PrimaryRoutes in its status)."""
        pool = POOL if self.system == "ours" else NATC_POOL
        for p in (client.status().get("Peer") or {}).values():
            if pool in (p.get("PrimaryRoutes") or []):
                return str(p["HostName"])
        return None

    def members(self) -> int:
        """How many members the cluster's configuration lists, as the first running member says."""
        if self.system == "ours":
            for c in self.conns:
                if c.appconnector and c.appconnector.running():
                    code, doc = c.http_get("/cluster/members")
                    if code == 200:
                        return len({doc["self"], *(doc.get("members") or [])})
            return 0
        for n in self.natcs:
            if n.proc.running():
                with contextlib.suppress(OSError, ValueError), entered(n.ns):
                    import urllib.request
                    with urllib.request.urlopen("http://127.0.0.1:8081/", timeout=3) as r:
                        return len(json.loads(r.read()).get("Servers") or [])
        return 0

    def kill_member(self, name: str) -> None:
        self.check_exits()
        if self.system == "ours":
            node = self.net.nodes[name]
            self.killed |= {p.pid for p in (node.appconnector, node.tailscaled) if p is not None}
            node.kill_all()
        else:
            self.kill_router(name)

    def kill_router(self, name: str) -> None:
        self.check_exits()
        if self.system == "ours":
            node = self.net.nodes[name]
            assert node.tailscaled is not None
            self.killed.add(node.tailscaled.pid)
            node.kill_tailscaled()
        else:
            p = next(n for n in self.natcs if n.name == name).proc
            self.killed.add(p.pid)
            p.kill()

    def restart(self, name: str) -> None:
        """Start what was killed again, from its state directory."""
        if self.system == "ours":
            node = self.net.nodes[name]
            if node.tailscaled is None or not node.tailscaled.running():
                node.start_tailscaled()
                wait_for(lambda: node.status().get("BackendState") == "Running", 60, f"{name}: tailscaled back")
            if node.appconnector is not None and node.appconnector.running():
                node.wait_connector_ready(90)  # it rides out its tailscaled's absence and serves again
            else:
                node.start_appconnector(self.cfgs[name])
        else:
            n = next(n for n in self.natcs if n.name == name)
            n.proc = n.start()
        wait_for(lambda: self.members() == 3 and self.leader() is not None, 120, f"{self.system}: 3 members again")


def scale_policy(net: Tailnet) -> None:
    """Auto-approve each system's scale prefix for its tag (natc may reach its own, see allow_natc)."""
    doc = json.loads(net.policy_path.read_text())
    doc["autoApprovers"]["routes"][OURS_SCALE] = [TAG]
    doc["autoApprovers"]["routes"][NATC_SCALE] = [NATC_TAG]
    doc["acls"].append({"action": "accept", "src": [NATC_TAG], "dst": [f"{NATC_SCALE}:*"]})
    net.set_policy(doc)


def checkout_all(client: Node, server: str, names: list[str], until: float, prime: Callable[[], None] | None,
                 progress: list[int], window: int = 16, timeout: float = 3.0,
                 tries: int = 3) -> tuple[list[float], int, int]:
    """Ask ``server`` for every name (A), ``window`` in flight, a name again after an error rcode or a
    timeout (``tries`` in all); seconds from first send to a NOERROR answer with an address, how many
    names got none, and how many error rcodes came. ``progress[0]`` counts answers as they come."""
    with client.sockets():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((server, 53))
    s.setblocking(False)
    pending: dict[int, tuple[int, float, float, int]] = {}   # id -> (name index, first send, last send, tries)
    retry: list[tuple[int, float, int]] = []
    lat: list[float] = []
    failed, errors, nxt, qid, last_prime = 0, 0, 0, 0, 0.0
    with s:
        while (nxt < len(names) or pending or retry) and time.monotonic() < until:
            now = time.monotonic()
            if prime is not None and now - last_prime > 20:
                with contextlib.suppress(OSError):  # no route while the primary moves: next time
                    prime()
                last_prime = now
            while len(pending) < window and (retry or nxt < len(names)):
                if retry:
                    i, first, n = retry.pop()
                else:
                    i, first, n = nxt, now, 0
                    nxt += 1
                qid = (qid + 1) & 0xFFFF
                while qid in pending:
                    qid = (qid + 1) & 0xFFFF
                q = dnslib.DNSRecord.question(names[i])
                q.header.id = qid
                with contextlib.suppress(OSError):  # full buffer, or no route while the primary moves:
                    s.send(q.pack())                # it times out and is sent again
                pending[qid] = (i, first, now, n + 1)
            if select.select([s], [], [], 0.05)[0]:
                while True:
                    try:
                        data = s.recv(4096)
                    except OSError:  # nothing more now, or an ICMP error (refused, unreachable)
                        break
                    if len(data) < 12:
                        continue
                    rid, flags, _, ancount = struct.unpack("!HHHH", data[:8])
                    if rid in pending:
                        i, first, _, n = pending.pop(rid)
                        if flags & 0xF == 0 and ancount:
                            lat.append(time.monotonic() - first)
                            progress[0] += 1
                        else:  # SERVFAIL (a checkout not committed in time): asked again, as a stub would
                            errors += 1
                            if n < tries:
                                retry.append((i, first, n))
                            else:
                                failed += 1
            now = time.monotonic()
            for rid, (i, first, sent, n) in list(pending.items()):
                if now - sent > timeout:
                    del pending[rid]
                    if n < tries:
                        retry.append((i, first, n))
                    else:
                        failed += 1
    return lat, failed + len(pending) + len(retry) + (len(names) - nxt), errors


def answers(client: Node, server: str, name: str = "web.app.test") -> bool:
    with contextlib.suppress(Exception):
        return resolve_in(client.ns, name, server, timeout=1)[0] == 0
    return False


def until(cond: Callable[[], bool], bound: float) -> float | None:
    """Seconds until ``cond`` first holds (tried back to back), None when it did not within ``bound``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if cond():
            return time.monotonic() - t0
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale", type=int, default=100_000)
    ap.add_argument("--scale-seconds", type=float, default=900, help="cap per system for the scale stage")
    ap.add_argument("--budget", type=float, default=2700)
    ap.add_argument("--stages", default="dns,failover,scale")
    ap.add_argument("--systems", default="ours,natc", help="which systems' scale stage runs, in this order")
    args = ap.parse_args()
    if (reason := natc_missing()) is not None:
        print(f"bench_natc_cluster: {reason}", file=sys.stderr)
        return 2
    stages = set(args.stages.split(","))
    budget = Budget(args.budget)
    res: Results = {s: {} for s in SYSTEMS}
    t_start = time.monotonic()
    with running(Path(tempfile.mkdtemp(prefix="bench-natc-cluster-")), "bc") as net:
        allow_natc(net)
        scale_policy(net)
        upstream = start_corpus_upstream(net)
        try:
            conn_names = [stable_name("fo-connect", i) for i in range(8)]
            net.serve_origin(conn_names)
            conns = [net.connector(f"c{i}") for i in (1, 2, 3)]
            clients = [net.client(f"cl{i}", user="alice" if i % 2 else "bob") for i in range(1, CLIENTS + 1)]
            net.wait_online()
            cfgs = {}
            for c in conns:
                cfg = ours_config(c)
                cfg.write_text(cfg.read_text().replace(f'prefixes = ["{POOL}"]',
                                                       f'prefixes = ["{POOL}", "{OURS_SCALE}"]'))
                cfgs[c.name] = cfg
            # ours: all three at once (the product elects one bootstrapper); natc: the first alone until
            # it leads, then the others (tsconsensus' bootstrap doc: else breakaway clusters can form)
            conns[0].start_appconnector(cfgs["c1"])
            for c in conns[1:]:
                c.start_appconnector(cfgs[c.name], wait=False)
            pools = (NATC_POOL, NATC_SCALE)
            natcs = [Natc(net, "natc1", 21, cluster_tag=NATC_TAG, pools=pools)]
            for c in conns[1:]:
                c.wait_connector_ready()
            natcs[0].wait_serving(clients[0], timeout=180)
            natcs += [Natc(net, f"natc{i}", 20 + i, cluster_tag=NATC_TAG, pools=pools) for i in (2, 3)]
            cl = {s: Cluster(s, net, conns, natcs, cfgs) for s in SYSTEMS}
            for s in SYSTEMS:
                wait_for(lambda s=s: cl[s].members() == 3 and cl[s].leader() is not None, 180,
                         lambda s=s: f"{s}: a cluster of 3 (members {cl[s].members()}): "
                         f"{[n.proc.log(1500) for n in natcs]}")
            for c in clients:
                wait_for(lambda c=c: answers(c, OURS_DNS), 120, f"{c.name}: ours answers")
                natcs[0].wait_serving(c, timeout=120)
            print(f"clusters up after {time.monotonic() - t_start:.0f} s; leaders ours {cl['ours'].leader()} "
                  f"natc {cl['natc'].leader()}; primaries ours {cl['ours'].primary(clients[0])} "
                  f"natc {cl['natc'].primary(clients[0])}", flush=True)
            if "dns" in stages:
                stage_dns(cl, natcs[0], clients, args, budget, res)
            if "failover" in stages:
                stage_failover(cl, natcs[0], clients[0], conn_names, budget, res)
            if "scale" in stages:
                stage_scale(cl, natcs[0], clients, args, budget, res)
            for s in SYSTEMS:
                exits = cl[s].check_exits()
                res[s]["exits"] = "; ".join(f"{m}: {why}" for m, why in exits.items()) or "none"
        finally:
            upstream.close()
    print_rows(res, budget, args)
    return 0


def stage_dns(cl: dict[str, Cluster], natc: Natc, clients: list[Node], args: argparse.Namespace, budget: Budget,
              res: Results) -> None:
    for rnd in range(args.rounds):
        for s in SYSTEMS:
            if not budget.left(f"cluster DNS round {rnd + 1} ({s})"):
                continue
            natc.prime(clients[0])
            qps: list[float] = []
            ts = [threading.Thread(target=dnsperf, args=(c, DNS[s], args.seconds, qps)) for c in clients]
            for t in ts:
                t.start()
            lat = timed_queries(clients[0].ns, DNS[s], lambda i: "web.app.test", 0,
                                until=time.monotonic() + args.seconds)
            for t in ts:
                t.join()
            if qps:
                keep_best(res, s, "qps", sum(qps), True)
                keep_best(res, s, "p99", pct(lat, 99) * 1000, False)
            # new names: every client at once, each asking its own fresh names one after another
            natc.prime(clients[0])
            out: list[list[float]] = [[] for _ in clients]

            def fresh(k: int, out: list[list[float]] = out, s: str = s, rnd: int = rnd) -> None:
                out[k] += timed_queries(clients[k].ns, DNS[s], lambda i: stable_name(f"cnew-{s}-{rnd}-{k}", i), 100)
            ts = [threading.Thread(target=fresh, args=(k,)) for k in range(len(clients))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            new = [x for xs in out for x in xs]
            if new:
                keep_best(res, s, "new_p50", pct(new, 50) * 1000, False)
                keep_best(res, s, "new_p99", pct(new, 99) * 1000, False)
                res[s]["new_ok"] = f"{len(new)}/{100 * len(clients)}"
            print(f"dns round {rnd + 1} {s}: {sum(qps):.0f} qps, p99 {pct(lat, 99) * 1000:.1f} ms; new names "
                  f"p50 {pct(new, 50) * 1000:.1f} p99 {pct(new, 99) * 1000:.1f} ms ({len(new)} answered)", flush=True)


def stage_failover(cl: dict[str, Cluster], natc: Natc, client: Node, conn_names: list[str], budget: Budget,
                   res: Results) -> None:
    for k, s in enumerate(SYSTEMS):
        for fault in ("leader", "router"):
            if budget.left(f"failover {fault} ({s})"):
                res[s].update(one_failover(cl[s], natc, client, conn_names[k * 4 + (fault == "router")], fault))


def one_failover(c: Cluster, natc: Natc, client: Node, name: str, fault: str) -> dict[str, float | str]:
    """Kill ``c``'s leader (``fault`` "leader") or its primary router ("router"), time the next answered new
    name and the next working connection to ``name``'s address (answered before the kill), restart it."""
    s = c.system
    natc.prime(client)
    rc, addrs = resolve_in(client.ns, name, DNS[s], timeout=3)
    assert rc == 0 and addrs, (s, name, rc)
    addr = addrs[0]
    wait_for(lambda: first_byte(client, addr) is not None, 30, f"{s}: {name} connects before the fault")
    leader = wait_for(c.leader, 60, f"{s}: a leader")
    primary = wait_for(lambda: c.primary(client), 60, f"{s}: a primary")
    victim, other = (leader, primary) if fault == "leader" else (primary, leader)
    also = f"{'also' if victim == other else 'not'} the {'primary' if fault == 'leader' else 'leader'}"
    seq = iter(range(10**6))

    def new_name() -> bool:
        natc.prime(client)
        with contextlib.suppress(Exception):
            rc, addrs = resolve_in(client.ns, stable_name(f"fo-new-{s}-{fault}", next(seq)), DNS[s], timeout=1)
            return rc == 0 and bool(addrs)
        return False

    def existing() -> bool:
        return first_byte(client, addr, timeout=1) is not None
    probes = {"new": new_name, "existing": existing}
    got: dict[str, float | None] = {}
    ts = [threading.Thread(target=lambda w=w: got.__setitem__(w, until(probes[w], BOUND))) for w in probes]
    print(f"failover {s}: killing the {fault} {victim} ({also})", flush=True)
    if fault == "leader":
        c.kill_member(victim)
    else:
        c.kill_router(victim)
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out: dict[str, float | str] = {}
    for w in probes:
        v = got.get(w)
        out[f"fo_{fault}_{w}"] = (f"{v:.1f} s ({victim}, {also})" if v is not None
                                  else f"not within {BOUND:.0f} s ({victim}, {also})")
    print(f"failover {s} {fault}: {out[f'fo_{fault}_new']} / {out[f'fo_{fault}_existing']}", flush=True)
    c.restart(victim)
    natc.wait_serving(client, timeout=120)
    return out


def stage_scale(cl: dict[str, Cluster], natc: Natc, clients: list[Node], args: argparse.Namespace, budget: Budget,
                res: Results) -> None:
    per = args.scale // len(clients)
    names = [stable_name("scale", i) for i in range(per)]
    for s in args.systems.split(","):
        if not budget.left(f"scale ({s})"):
            continue
        c = cl[s]
        natc.prime(clients[0])
        rss0 = rss_mib(c.pids())
        out: list[tuple[list[float], int, int]] = [([], 0, 0)] * len(clients)
        end = time.monotonic() + args.scale_seconds
        prime = (lambda: natc.prime(clients[0])) if s == "natc" else None
        progress = [0]

        def run(k: int, out: list[tuple[list[float], int, int]] = out, end: float = end, s: str = s,
                prime: Callable[[], None] | None = prime, progress: list[int] = progress) -> None:
            out[k] = checkout_all(clients[k], DNS[s], names, end, prime, progress)
        t0 = time.monotonic()
        ts = [threading.Thread(target=run, args=(k,)) for k in range(len(clients))]
        for t in ts:
            t.start()
        while alive := [t for t in ts if t.is_alive()]:
            alive[0].join(60)
            print(f"scale {s}: {progress[0]:,} after {time.monotonic() - t0:.0f} s; exited by themselves: "
                  f"{c.check_exits() or 'none'}", flush=True)
        for t in ts:
            t.join()
        took = time.monotonic() - t0
        lat = [x for xs, _, _ in out for x in xs]
        failed = sum(f for _, f, _ in out)
        errors = sum(e for _, _, e in out)
        res[s]["scale_done"] = (f"{len(lat):,} of {per * len(clients):,} in {took:.0f} s ({failed:,} not answered; "
                                f"{errors:,} SERVFAIL asked again)")
        res[s]["scale_rate"] = len(lat) / took
        res[s]["scale_p50"], res[s]["scale_p99"] = pct(lat, 50) * 1000, pct(lat, 99) * 1000
        rss = rss_mib(c.pids())
        res[s]["scale_rss"], res[s]["scale_rss_growth"] = rss, rss - rss0
        with contextlib.suppress(OSError, ValueError):
            res[s]["scale_disk"] = c.state_bytes() / 2**20
        print(f"scale {s}: {res[s]['scale_done']}, p50 {res[s]['scale_p50']:.1f} p99 {res[s]['scale_p99']:.1f} ms, "
              f"RSS {res[s]['scale_rss']:.0f} MiB (+{res[s]['scale_rss_growth']:.0f}), "
              f"disk {res[s].get('scale_disk', float('nan')):.1f} MiB", flush=True)


def print_rows(res: Results, budget: Budget, args: argparse.Namespace) -> None:
    n = CLIENTS
    spec: Spec = [(f"cluster of 3: DNS known name, qps ({n} clients × 4 dnsperf senders)", "qps", " qps", 0, True),
                  ("cluster of 3: DNS known name under that load, p99", "p99", " ms", 2, False),
                  (f"cluster of 3: first answer of a new name, p50 ({n} clients at once)", "new_p50", " ms", 2, False),
                  ("cluster of 3: first answer of a new name, p99", "new_p99", " ms", 2, False),
                  ("cluster of 3: new names answered", "new_ok", "", 0, True),
                  ("failover, Raft leader killed: next new name answered", "fo_leader_new", "", 1, False),
                  ("failover, Raft leader killed: existing mapping connects again", "fo_leader_existing", "", 1, False),
                  ("failover, primary router killed: next new name answered", "fo_router_new", "", 1, False),
                  ("failover, primary router killed: existing mapping works again", "fo_router_existing", "", 1, False),
                  (f"scale: mappings checked out ({n} nodes × {args.scale // n:,} names)", "scale_done", "", 0, True),
                  ("scale: checkouts/s during it", "scale_rate", "/s", 0, True),
                  ("scale: checkout p50 (first send → answer)", "scale_p50", " ms", 1, False),
                  ("scale: checkout p99", "scale_p99", " ms", 1, False),
                  ("scale: RSS of the 3 members after it", "scale_rss", " MiB", 0, False),
                  ("scale: RSS growth of the 3 members during it", "scale_rss_growth", " MiB", 0, False),
                  ("scale: Raft state on disk (largest member)", "scale_disk", " MiB", 1, False),
                  ("members that exited by themselves during the run (last fatal log line)", "exits", "", 0, True)]
    print(f"\nnatc clusters of 3 side by side (real tailnet, v1.102.3; {args.rounds} alternating DNS rounds of "
          f"{args.seconds:g} s, best kept)\n")
    print("| row | ours | natc | ratio |\n|---|---|---|---|")
    for row in table_rows(res, spec):
        print("| " + " | ".join(row) + " |")
    if budget.skipped:
        print(f"\nskipped (budget spent): {', '.join(budget.skipped)}")


if __name__ == "__main__":
    raise SystemExit(main())
