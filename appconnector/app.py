"""Wiring and lifecycle of one connector: each part is built from its own settings (``PartSettings``,
derived from the config once, here), the parts start in dependency order and stop in reverse.

    admin token → tailnet (tailscale mode) → pool replica → NAT mirror (+ DNS address on lo) → DNS
    → status HTTP (read-only) → admin HTTP → leader duties → cluster membership (tailscale mode
    with cluster.tag)

Stop (SIGTERM/SIGINT, or a fatal error) first withdraws the pool routes this connector added (and, in
a cluster, waits a few seconds at most for another connector to become their primary), then runs
that list backwards: membership and leader duties end, the admin and status HTTP close, DNS
drains (so no answer is given that cannot be steered), NAT removes its table and the DNS address, the
replica flushes queued touches and hands leadership away, then the tailnet watch ends.
``serve`` returns the process exit code (docs/design.md §7, :mod:`appconnector.fatal`): 0 after a signal, 1 for
a runtime failure, 3 when this member's state can no longer be trusted. Parts report fatal errors to
``connector.fatal`` (any thread); ``serve`` logs the reason once (``fatal: …``), stops and exits with it.

Fail-stop: when the Raft engine finds the state untrusted (a journal conflict over applied entries, a
snapshot from the leader that would not install) it writes the marker (pool/storage.py) and reports
EXIT_UNTRUSTED; DNS then answers REFUSED, the routes are withdrawn and the process stops. A member that
finds the marker at start serves nothing (REFUSED, unready, no routes, no NAT, no Raft) until
``appconnector state reset``.

Under systemd it notifies READY=1 once serving, pings the watchdog while the event loop and the
Raft tick run, and STOPPING=1 when it begins to stop (``sdnotify``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appconnector import metrics
from appconnector.admin import AdminServer
from appconnector.config import Config, ConfigError
from appconnector.dns.service import DnsService
from appconnector.dns.settings import DnsSettings
from appconnector.fatal import EXIT_FAILURE, EXIT_OK, EXIT_UNTRUSTED, Fatal, FatalReporter
from appconnector.http import StatusServer
from appconnector.http_settings import HttpSettings
from appconnector.leader import LeaderDuties, LeaderSettings
from appconnector.nat.service import NatService
from appconnector.nat.settings import NatSettings
from appconnector.pool.engine import BindError
from appconnector.pool.local import LocalPool
from appconnector.pool.membership import JOINING, MEMBER, MembershipRecord
from appconnector.pool.replica import RaftReplica
from appconnector.pool.settings import PoolSettings, RaftSettings
from appconnector.pool.storage import RunLock, StateError, StateInUse, StatePaths, UntrustedState
from appconnector.sdnotify import Notifier, Watchdog
from appconnector.secrets_file import ensure_secret_file, prepare_state_dir
from appconnector.tailnet.api import NodeIdentity, TailnetUnavailable
from appconnector.tailnet.cluster import Action
from appconnector.tailnet.localapi import LocalAPIError
from appconnector.tailnet.membership import ClusterMembership, join_partners
from appconnector.tailnet.service import TailnetService
from appconnector.tailnet.settings import TailnetSettings
from appconnector.tailnet.standalone import StandaloneIdentity

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
FAILOVER_WAIT = 3.0  # on stop, DNS and NAT keep serving this long at most until another connector has the routes


class _Part(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class StartupError(RuntimeError):
    """A part could not start; the message says which and why."""


@dataclass(frozen=True)
class PartSettings:
    """Every part's own settings, derived from the config once, here at the edge: no part reads the
    config at run time, and each constructor's signature says what the part depends on."""

    dns: DnsSettings
    nat: NatSettings
    http: HttpSettings
    leader: LeaderSettings
    pool: PoolSettings
    tailnet: TailnetSettings | None  # None: standalone mode (no tailscaled)

    @classmethod
    def from_config(cls, cfg: Config) -> PartSettings:
        return cls(dns=DnsSettings.from_config(cfg), nat=NatSettings.from_config(cfg),
                   http=HttpSettings.from_config(cfg), leader=LeaderSettings.from_config(cfg),
                   pool=PoolSettings.from_config(cfg),
                   tailnet=None if cfg.standalone else TailnetSettings.from_config(cfg))


class Connector:
    """One connector process. ``await start()``, then ``await stop()`` (idempotent)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg  # the Raft member's settings (its address comes from the mode) and start-up messages'
        self.parts = PartSettings.from_config(cfg)
        self.tailnet: TailnetService | None = None
        self.replica: RaftReplica | None = None
        self.nat: NatService | None = None
        self.dns: DnsService | None = None
        self.http: StatusServer | None = None
        self.admin: AdminServer | None = None
        self.leader: LeaderDuties | None = None
        self.membership: ClusterMembership | None = None
        self.fatal = FatalReporter()  # the one place parts report fatal errors to (any thread)
        self.untrusted: str | None = None  # why this member serves nothing (the marker), if it does not
        self._lock: RunLock | None = None
        self._started: list[_Part] = []

    async def start(self) -> None:
        parts = self.parts
        # first: a token file others can read is a bad config (exit 2) before anything listens
        admin_token = await asyncio.to_thread(ensure_secret_file, "http.admin_token_file",
                                              parts.http.admin_token_path)
        secret = await asyncio.to_thread(self.cfg.read_secret)
        identity, self_address, partners, record = await self._start_tailnet(secret)
        replica = await self._start_replica(self_address, partners, secret, record)
        if replica is None:
            await self._start_untrusted(identity)
            return
        directory = self.tailnet.directory if self.tailnet is not None else None
        # DNS is built before NAT starts (NAT puts the DNS address on lo first); the leader's target
        # refresh shares its upstream resolver and cache.
        self.dns = DnsService(parts.dns, replica, identity, directory=directory)
        self.nat = NatService(parts.nat, replica, directory, on_fatal=self.fatal.report,
                              resolver=self.dns.refresh_targets if parts.dns.verify_upstream else None)
        await self._run(self.nat)
        self.dns.nat_ready = self.nat.ready  # NAT's worker installs elements after the apply returns
        if self.tailnet is not None:
            self.dns.on_routed_query = self.tailnet.serving.saw_client
        await self._run(self.dns)
        checks: dict[str, Check] = {"raft": lambda: raft_check(replica.status()), "nat": self.nat.check}
        if self.tailnet is not None:
            checks.update(self.tailnet.checks())
            if record is not None:
                tailnet = self.tailnet.settings
                self.membership = ClusterMembership(replica, self.tailnet.directory, tailnet.cluster_tag,
                                                    tailnet.raft_port, secret, record, self._on_removed,
                                                    state_dir=replica.paths.dir)
                checks["membership"] = self.membership.check
        self.http = StatusServer(parts.http, replica, checks, nat=self.nat,
                                 tailnet=self.tailnet.client if self.tailnet is not None else None)
        await self._run(self.http, f"http.listen {parts.http.listen}")
        self.admin = AdminServer(parts.http, replica, replica, admin_token, page=self.http.page)
        await self._run(self.admin, f"http.admin_listen {parts.http.admin_listen}")
        self.leader = LeaderDuties(parts.leader, replica, directory)
        await self._run(self.leader)
        if self.membership is not None:
            await self._run(self.membership)
        log.info("connector ready: DNS on %s, raft %s (%d partner(s)), NAT %s",
                 ", ".join(f"{h}:{p}" for h, p in self.dns.bound), self_address, len(partners),
                 self.nat.reason)

    async def _run(self, part: _Part, listen: str | None = None) -> None:
        """Start ``part`` and remember it for ``stop``; ``listen`` names the key of a listener it binds."""
        try:
            await part.start()
        except OSError as e:
            if listen is None:
                raise
            raise StartupError(f"{listen}: {e.strerror or e}") from e
        self._started.append(part)

    async def _start_tailnet(self, secret: str | None
                             ) -> tuple[NodeIdentity, str, list[str], MembershipRecord | None]:
        """Who asks (the identity), this member's Raft address, its partners and (dynamic membership)
        its membership record. Standalone mode: the client IP is the node, the members are configured."""
        settings = self.parts.tailnet
        if settings is None:
            return StandaloneIdentity(), self.cfg.raft_self(), list(self.cfg.cluster.peers), None
        self.tailnet = TailnetService(settings)
        self._started.append(self.tailnet)  # before start: stop() ends a half-started watch and filter
        try:
            await self.tailnet.start()
        except (TailnetUnavailable, LocalAPIError) as e:  # e.g. 403: no write access to tailscaled's prefs
            raise StartupError(f"tailscaled: {e} (socket {settings.localapi_socket})") from e
        me, partners, record = await _tailnet_membership(self.tailnet, settings, self.cfg.cluster.state_dir, secret)
        return self.tailnet.identity, me, partners, record

    async def _start_replica(self, self_address: str, partners: list[str], secret: str | None,
                             record: MembershipRecord | None) -> RaftReplica | None:
        """The started pool replica; None when the untrusted-state marker is there (``self.untrusted``)."""
        cfg = self.cfg
        self.replica = RaftReplica(self.parts.pool, RaftSettings.from_config(
            cfg, self_address, partners, dynamic_membership=record is not None), on_fatal=self.fatal.report)
        if record is not None:  # before Raft listens: the leader must not see a joining member as "member"
            self.replica.set_membership_state(record.state)
        try:
            await self.replica.start()
        except UntrustedState as e:
            self.untrusted = str(e)
            return None
        except StateError as e:
            raise StartupError(f"pool state in {cfg.cluster.state_dir}: {e}; refusing to start "
                               "(move the bad file away to rejoin from the other members)") from e
        except BindError as e:
            raise StartupError(f"{e} (cluster.raft_port; is another connector running?)") from e
        self._started.append(self.replica)
        return self.replica

    async def _start_untrusted(self, identity: NodeIdentity) -> None:
        """The marker is there: an earlier run found this member's state untrusted. Start no Raft, no NAT
        and no leader duties; answer every DNS query REFUSED (resolvers ask the other connectors at once),
        report unready with the reason, withdraw the pool routes."""
        assert self.replica is not None and self.untrusted is not None
        reason, cfg = self.untrusted, self.cfg
        metrics.STATE_UNTRUSTED.set(1)
        self._lock = RunLock(self.replica.paths.dir)
        try:
            self._lock.acquire()  # so `state reset` refuses while this runs
        except StateInUse as e:
            raise StartupError(str(e)) from e
        what = (f"untrusted state ({reason}): not serving; run `appconnector state reset` with this connector "
                "stopped, then start it (it rejoins empty and receives a snapshot from the leader)")
        log.critical("%s", what)
        empty = LocalPool(cfg.pool.prefixes, reuse_after=cfg.pool.reuse_after)  # nothing is read from it
        self.dns = DnsService(self.parts.dns, empty, identity)
        self.dns.refuse_all(reason)
        await self._run(self.dns)
        self.http = StatusServer(self.parts.http, empty, {"raft": lambda: (False, what)})
        await self._run(self.http, f"http.listen {self.parts.http.listen}")
        await self._withdraw_routes()

    async def stop_serving(self, reason: str) -> None:
        """Answer every DNS query REFUSED from now on and withdraw the pool routes (fail-stop, removal)."""
        if self.dns is not None:
            self.dns.refuse_all(reason)
        await self._withdraw_routes()

    async def _withdraw_routes(self, failover_wait: float = 0.0) -> None:
        """Withdraw the routes this connector recorded as added (also those of a crashed earlier run)."""
        if self.tailnet is not None:
            try:
                await self.tailnet.withdraw_routes(failover_wait=failover_wait)
            except Exception as e:
                log.warning("could not withdraw the pool routes: %s (`appconnector routes withdraw` retries)", e)

    async def _on_removed(self, reason: str) -> None:
        """This member was removed with ``cluster remove``: stop answering (REFUSED, so resolvers ask the
        other connectors at once), withdraw the pool routes (the tailnet routes pool traffic to the
        connectors still in the cluster), report unready. Raft keeps running so peers see "removed"."""
        state_dir = self.replica.paths.dir if self.replica is not None else self.cfg.cluster.state_dir
        log.error("cluster: %s; stopping DNS answers (every query now gets REFUSED) and withdrawing the pool "
                  "routes. To join again: stop this connector, empty %s and start it", reason, state_dir)
        await self.stop_serving(reason)

    async def stop(self) -> None:
        if self.tailnet is not None and self.tailnet in self._started:
            # first, while DNS and NAT still serve: the control plane moves the pool routes to another
            # connector (or clients get "no route") instead of routing to a connector with no DNS
            await self._withdraw_routes(failover_wait=FAILOVER_WAIT)
        while self._started:
            part = self._started.pop()
            try:
                await part.stop()
            except Exception:  # keep stopping the rest: the table and the journal matter most
                log.exception("stopping %s failed", type(part).__name__)
        if self._lock is not None:
            self._lock.release()


async def _tailnet_membership(tailnet: TailnetService, settings: TailnetSettings, state_root: str,
                              secret: str | None) -> tuple[str, list[str], MembershipRecord | None]:
    """This member's Raft address, its partners and its membership record, after the split-brain-safe
    discovery. With ``cluster.tag`` the membership is dynamic (``tailnet.membership``): BOOTSTRAP starts
    alone, JOIN starts with the cluster's members as partners and waits for the leader to add it,
    RESUME keeps the stored membership. No tag: a one-member cluster (record None: static)."""
    me = tailnet.raft_address()
    if me is None:
        raise StartupError("tailscaled reports no tailnet IPv4 for this node")
    if not settings.cluster_tag:
        return me, [], None
    state_dir = StatePaths.for_member(state_root, me).dir
    decision = await tailnet.discover_cluster(state_dir.exists())
    log.info("cluster: %s (%s)", decision.action.value, decision.reason)
    if decision.action is Action.BOOTSTRAP:
        record = MembershipRecord(MEMBER, [me])
        record.save(state_dir)
    elif decision.action is Action.JOIN:
        members = await join_partners(decision.via, secret)
        record = MembershipRecord(JOINING, sorted({*members, me}))
        record.save(state_dir)
        log.info("cluster: joining the members %s; the leader adds %s", ", ".join(members), me)
    else:
        found = MembershipRecord.load(state_dir)
        # no record: state from before dynamic membership; the tagged nodes were the members then
        record = found or MembershipRecord(JOINING, sorted({*tailnet.members(), me}))
    return me, [m for m in record.members if m != me], record


def raft_check(st: dict[str, object]) -> tuple[bool, str]:
    """Readiness from the replica's status: a leader is known and this member is not far behind it."""
    if st.get("failure"):
        return False, f"failed: {st['failure']}"
    if not st.get("leader"):
        return False, f"no leader known (role {st.get('role')})"
    lag = _int(st.get("leader_commit_index")) - _int(st.get("applied_index"))
    if lag > 1000:
        return False, f"catching up: {lag} entries behind the leader"
    return True, f"{st.get('role')}, leader {st.get('leader')}, term {st.get('term')}"


def _int(v: object) -> int:
    return v if isinstance(v, int) else 0


async def _fatal(connector: Connector, fatal: Fatal) -> int:
    """Log the reason once, stop serving at once when the state is untrusted; the caller stops the rest."""
    log.critical("fatal: %s; stopping (exit %d)", fatal.reason, fatal.exit_code)
    if fatal.exit_code == EXIT_UNTRUSTED:
        await connector.stop_serving(fatal.reason)
    return fatal.exit_code


async def serve(cfg: Config) -> int:
    """Run a connector until SIGTERM/SIGINT or a fatal error. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    prepare_state_dir(cfg.cluster.state_dir)  # 0700: it holds the Raft secret and every node's pool data
    connector = Connector(cfg)
    systemd = Notifier.from_env()
    watchdog = Watchdog(systemd)  # extends systemd's start timeout while starting, pings once serving
    watchdog.start()
    fatal = loop.create_task(connector.fatal.wait())
    waiter = loop.create_task(stop.wait())
    try:
        start = loop.create_task(connector.start())
        done, _ = await asyncio.wait({start, waiter, fatal}, return_when=asyncio.FIRST_COMPLETED)
        if start not in done:  # a signal or a fatal error during start-up (e.g. waiting for the cluster)
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
            if fatal in done:
                return await _fatal(connector, fatal.result())
            log.info("stopped during start-up")
            return EXIT_OK
        start.result()
        watchdog.serving(connector.replica.tick_alive if isinstance(connector.replica, RaftReplica) else None)
        systemd.send("READY=1", "STATUS=serving")
        done, _ = await asyncio.wait({waiter, fatal}, return_when=asyncio.FIRST_COMPLETED)
        if fatal in done:
            return await _fatal(connector, fatal.result())
        log.info("signal received: draining DNS, flushing touches, removing the nftables table")
        return EXIT_OK
    except ConfigError:
        raise
    except StartupError as e:
        log.error("cannot start: %s", e)
        return EXIT_FAILURE
    except OSError as e:
        log.error("cannot start: %s", e)
        return EXIT_FAILURE
    finally:
        systemd.send("STOPPING=1", "STATUS=stopping")
        await watchdog.stop()
        for task in (fatal, waiter):
            task.cancel()
        await connector.stop()
        systemd.close()
