"""Gathers the status page's document (:mod:`appconnector.statuspage` renders it): cluster health only.

Sources: the replica's Raft status (members, leader, term, per-follower match index and last contact
as this member sees them), readiness checks, pool counts, NAT status, this process's own metrics
(DNS answers by rcode, NAT counters), recent warnings, and in tailscale mode tailscaled's
``PrimaryRoutes`` (which connector the tailnet currently routes the pool through).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from appconnector.http_settings import HttpSettings
from appconnector.logs import RECENT_WARNINGS
from appconnector.metrics import REGISTRY
from appconnector.pool.api import ReplicaControl

Check = Callable[[], tuple[bool, str]]
RATE_WINDOW = 60.0  # seconds of samples the DNS rates are taken over
PRIMARY_CACHE = 5.0  # seconds a LocalAPI status read is reused (the page refreshes every 5 s per viewer)


class NatStatus(Protocol):
    def status(self) -> dict[str, Any]: ...


class TailnetStatus(Protocol):
    async def status(self) -> dict[str, Any]: ...


def metric_samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """This process's samples of one exported sample name (e.g. ``appconnector_dns_queries_total``)."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in REGISTRY.collect():
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_label(samples: Mapping[tuple[tuple[str, str], ...], float], label: str) -> dict[str, float]:
    """Sum samples by the value of one label."""
    out: dict[str, float] = {}
    for labels, v in samples.items():
        key = dict(labels).get(label, "")
        out[key] = out.get(key, 0.0) + v
    return out


class RateWindow:
    """Per-second rates of counters from samples kept over the last ``window`` seconds."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, now: float, totals: Mapping[str, float]) -> tuple[dict[str, float], float]:
        """Record totals at ``now`` (monotonic); (rates since the oldest sample kept, its age)."""
        self._samples.append((now, dict(totals)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        then, old = self._samples[0]
        span = now - then
        if span <= 0:
            return {k: 0.0 for k in totals}, 0.0
        return {k: max(0.0, (v - old.get(k, 0.0)) / span) for k, v in totals.items()}, span


def primary_routers(status: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, str]:
    """{pool prefix: name of the node whose ``PrimaryRoutes`` hold it} from a LocalAPI status
    (``Self`` and every ``Peer``); a prefix no node is primary for is left out."""
    want = set(prefixes)
    out: dict[str, str] = {}
    entries = [status.get("Self"), *((status.get("Peer") or {}).values())]
    for st in entries:
        if not isinstance(st, dict):
            continue
        name = str(st.get("HostName") or st.get("DNSName") or st.get("ID") or "?")
        for p in st.get("PrimaryRoutes") or []:
            if p in want:
                out[str(p)] = name + (" (this connector)" if st is status.get("Self") else "")
    return out


def describe_primary(primaries: Mapping[str, str], prefixes: Iterable[str]) -> str:
    parts = [f"{p}: {primaries.get(p, 'none (no connector is serving it)')}" for p in prefixes]
    return "; ".join(parts)


def member_rows(st: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per member from this member's Raft status. Lag: entries behind the leader's commit
    (a follower's own, or every follower's when this member leads); last heard: seconds since a
    message from that member arrived here."""
    me, leader = st.get("self"), st.get("leader")
    connected = set(st.get("connected") or [])
    match = st.get("match_index") or {}
    heard = st.get("last_heard") or {}
    commit = st.get("commit_index")
    leader_commit = st.get("leader_commit_index")
    rows = []
    for m in st.get("members") or []:
        role = "leader" if m == leader else ("follower" if leader else "unknown")
        lag: int | None = None
        if m == me and isinstance(leader_commit, int) and isinstance(st.get("applied_index"), int):
            lag = max(0, leader_commit - st["applied_index"])
        elif st.get("role") == "leader" and isinstance(match.get(m), int) and isinstance(commit, int):
            lag = max(0, commit - match[m])
        age = heard.get(m)
        rows.append({"address": m, "self": m == me, "role": role,
                     "connected": None if m == me else m in connected, "lag": lag,
                     "last_contact": (time.time() - age) if isinstance(age, (int, float)) else None})
    return rows


class PageData:
    """Builds the page document. ``collect()`` may block (pool counts): call it off the event loop;
    ``primary()`` is the one async part (tailscaled's status)."""

    def __init__(self, settings: HttpSettings, replica: ReplicaControl, checks: Mapping[str, Check],
                 run_checks: Callable[[Mapping[str, Check]], tuple[bool, dict[str, dict[str, object]]]],
                 nat: NatStatus | None = None, tailnet: TailnetStatus | None = None) -> None:
        self.settings = settings
        self.replica = replica
        self.checks = checks
        self._run_checks = run_checks
        self.nat = nat
        self.tailnet = tailnet
        self._dns_rates = RateWindow()
        # the first sample at start, so the first view already has rates (since start, until the window fills)
        self._dns_rates.add(time.monotonic(), by_label(metric_samples("appconnector_dns_queries_total"), "rcode"))
        self._primary: tuple[float, str] | None = None

    async def primary(self) -> str:
        if self.tailnet is None:
            return "n/a (standalone mode: no tailnet routes)"
        now = time.monotonic()
        if self._primary is not None and now - self._primary[0] < PRIMARY_CACHE:
            return self._primary[1]
        try:
            st = await self.tailnet.status()
            prefixes = self.settings.pool_prefixes
            text = describe_primary(primary_routers(st, prefixes), prefixes)
        except Exception as e:  # the page still shows the rest
            text = f"unknown (tailscaled status failed: {e})"
        self._primary = (now, text)
        return text

    def collect(self, primary: str) -> dict[str, Any]:
        ready, checks = self._run_checks(self.checks)
        raft = dict(self.replica.status())
        pool: dict[str, Any] = {"prefixes": list(self.settings.pool_prefixes), **self.replica.stats()}
        if isinstance(pool.get("pool_size"), int) and isinstance(pool.get("max_node_use"), int):
            pool["addresses_left"] = pool["pool_size"] - pool["max_node_use"]
        pool["checkouts"] = {k: int(v) for k, v in by_label(metric_samples("appconnector_pool_checkouts_total"),
                                                             "result").items()}
        nat: dict[str, Any] = dict(self.nat.status()) if self.nat is not None else {"enabled": False,
                                                                                     "reason": "not running"}
        reconciles = by_label(metric_samples("appconnector_nat_reconciles_total"), "result")
        nat.update(configured=self.settings.nat_configured, seen_flows=_one("appconnector_nat_seen_flows_total"),
                   unmapped_rejects=_one("appconnector_nat_unmapped_rejects"),
                   unmapped_drops=_one("appconnector_nat_unmapped_drops"),
                   seen_reads=_one("appconnector_nat_seen_reads_total"),
                   last_reconcile=_one("appconnector_nat_last_reconcile_timestamp_seconds"),
                   reconciles_ok=int(reconciles.get("ok", 0)), reconciles_error=int(reconciles.get("error", 0)))
        totals = by_label(metric_samples("appconnector_dns_queries_total"), "rcode")
        rates, window = self._dns_rates.add(time.monotonic(), totals)
        role = raft.get("role")
        note = None if role == "leader" else (
            "Lag and last heard of the other members are known to the leader: open its page for them.")
        return {
            "mode": self.settings.mode, "ready": ready, "checks": checks, "raft": raft,
            "members": member_rows(raft), "members_note": note,
            "primary_router": primary, "pool": pool, "nat": nat,
            "dns": {"totals": {k: int(v) for k, v in totals.items()}, "rates": rates, "window": window,
                    "servfail": by_label(metric_samples("appconnector_dns_servfail_total"), "reason")},
            "warnings": RECENT_WARNINGS.rows(), "admin_listen": self.settings.admin_listen,
        }

    async def document(self) -> dict[str, Any]:
        primary = await self.primary()
        return await asyncio.to_thread(self.collect, primary)


def _one(name: str) -> float | None:
    samples = metric_samples(name)
    return sum(samples.values()) if samples else None
