"""Wiring and lifecycle of one connector: the parts start in dependency order and stop in reverse.

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
from pathlib import Path
from typing import Protocol

from appconnector import metrics
from appconnector.admin import AdminServer
from appconnector.config import Config, ConfigError
from appconnector.dns.service import DnsService
from appconnector.fatal import EXIT_FAILURE, EXIT_OK, EXIT_UNTRUSTED, Fatal, FatalReporter
from appconnector.http import StatusServer
from appconnector.leader import LeaderDuties
from appconnector.nat.service import NatService
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
from appconnector.tailnet.standalone import StandaloneIdentity

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
FAILOVER_WAIT = 3.0  # on stop, DNS and NAT keep serving this long at most until another connector has the routes


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


class StartupError(RuntimeError):
    """A part could not start; the message says which and why."""


class Connector:
    """One connector process. ``await start()``, then ``await stop()`` (idempotent)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
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
        self._started: list[_Stoppable] = []

    async def start(self) -> None:
        cfg = self.cfg
        identity: NodeIdentity
        record: MembershipRecord | None = None
        # first: a token file others can read is a bad config (exit 2) before anything listens
        admin_token = await asyncio.to_thread(ensure_secret_file, "http.admin_token_file", cfg.admin_token_path())
        if cfg.standalone:
            identity = StandaloneIdentity()
            self_address, partners = cfg.raft_self(), list(cfg.cluster.peers)
        else:
            self.tailnet = TailnetService(cfg)
            self._started.append(self.tailnet)  # before start: stop() ends a half-started watch and filter
            try:
                await self.tailnet.start()
            except (TailnetUnavailable, LocalAPIError) as e:  # e.g. 403: no write access to tailscaled's prefs
                raise StartupError(f"tailscaled: {e} (socket {cfg.tailnet.localapi_socket})") from e
            identity = self.tailnet.identity
            self_address, partners, record = await self._tailnet_membership(self.tailnet)

        self.replica = RaftReplica(PoolSettings.from_config(cfg), RaftSettings.from_config(
            cfg, self_address, partners, dynamic_membership=record is not None), on_fatal=self.fatal.report)
        if record is not None:  # before Raft listens: the leader must not see a joining member as "member"
            self.replica.set_membership_state(record.state)
        try:
            await self.replica.start()
        except UntrustedState as e:
            await self._start_untrusted(str(e), identity, self.replica.paths.dir)
            return
        except StateError as e:
            raise StartupError(f"pool state in {cfg.cluster.state_dir}: {e}; refusing to start "
                               "(move the bad file away to rejoin from the other members)") from e
        except BindError as e:
            raise StartupError(f"{e} (cluster.raft_port; is another connector running?)") from e
        self._started.append(self.replica)

        # Built before NAT starts (NAT puts the DNS address on lo first); the leader's target refresh
        # shares its upstream resolver and cache.
        directory = self.tailnet.directory if self.tailnet is not None else None
        self.dns = DnsService(cfg, self.replica, identity, directory=directory)
        if self.tailnet is not None:
            self.dns.on_routed_query = self.tailnet.serving.saw_client
        self.nat = NatService(cfg, self.replica, directory,
                              resolver=self.dns.refresh_targets if cfg.dns.verify_upstream else None,
                              on_fatal=self.fatal.report)
        await self.nat.start()
        self._started.append(self.nat)
        self.dns.nat_ready = self.nat.ready  # NAT's worker installs elements after the apply returns

        await self.dns.start()
        self._started.append(self.dns)

        checks: dict[str, Check] = {"raft": self._raft_check, "nat": self._nat_check}
        if self.tailnet is not None:
            checks.update(self.tailnet.checks())
            if record is not None:
                self.membership = ClusterMembership(self.replica, self.tailnet.directory, cfg.cluster.tag,
                                                    cfg.cluster.raft_port, cfg.read_secret(), record,
                                                    self._on_removed)
                checks["membership"] = self.membership.check
        self.http = StatusServer(cfg, self.replica, checks, nat=self.nat,
                                 tailnet=self.tailnet.client if self.tailnet is not None else None)
        try:
            await self.http.start()
        except OSError as e:
            raise StartupError(f"http.listen {cfg.http.listen}: {e.strerror or e}") from e
        self._started.append(self.http)
        self.admin = AdminServer(cfg, self.replica, admin_token, page=self.http.page)
        try:
            await self.admin.start()
        except OSError as e:
            raise StartupError(f"http.admin_listen {cfg.http.admin_listen}: {e.strerror or e}") from e
        self._started.append(self.admin)

        self.leader = LeaderDuties(cfg, self.replica, directory)
        self.leader.start()
        self._started.append(self.leader)
        if self.membership is not None:
            await self.membership.start()
            self._started.append(self.membership)
        log.info("connector ready: DNS on %s, raft %s (%d partner(s)), NAT %s",
                 ", ".join(f"{h}:{p}" for h, p in self.dns.bound), self_address, len(partners),
                 self.nat.reason)

    async def _start_untrusted(self, reason: str, identity: NodeIdentity, member_dir: Path) -> None:
        """The marker is there: an earlier run found this member's state untrusted. Start no Raft, no NAT
        and no leader duties; answer every DNS query REFUSED (resolvers ask the other connectors at once),
        report unready with the reason, withdraw the pool routes."""
        cfg = self.cfg
        self.untrusted = reason
        metrics.STATE_UNTRUSTED.set(1)
        self._lock = RunLock(member_dir)
        try:
            self._lock.acquire()  # so `state reset` refuses while this runs
        except StateInUse as e:
            raise StartupError(str(e)) from e
        what = (f"untrusted state ({reason}): not serving; run `appconnector state reset` with this connector "
                "stopped, then start it (it rejoins empty and receives a snapshot from the leader)")
        log.critical("%s", what)
        empty = LocalPool(cfg.pool.prefixes, reuse_after=cfg.pool.reuse_after)  # nothing is read from it
        self.dns = DnsService(cfg, empty, identity)
        self.dns.refuse_all(reason)
        await self.dns.start()
        self._started.append(self.dns)
        self.http = StatusServer(cfg, empty, {"raft": lambda: (False, what)})
        try:
            await self.http.start()
        except OSError as e:
            raise StartupError(f"http.listen {cfg.http.listen}: {e.strerror or e}") from e
        self._started.append(self.http)
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

    async def _tailnet_membership(self, tailnet: TailnetService) -> tuple[str, list[str], MembershipRecord | None]:
        """This member's Raft address, its partners and its membership record, after the split-brain-safe
        discovery. With ``cluster.tag`` the membership is dynamic (``tailnet.membership``): BOOTSTRAP starts
        alone, JOIN starts with the cluster's members as partners and waits for the leader to add it,
        RESUME keeps the stored membership. No tag: a one-member cluster (record None: static)."""
        me = tailnet.raft_address()
        if me is None:
            raise StartupError("tailscaled reports no tailnet IPv4 for this node")
        if not self.cfg.cluster.tag:
            return me, [], None
        state_dir = StatePaths.for_member(self.cfg.cluster.state_dir, me).dir
        decision = await tailnet.discover_cluster(state_dir.exists())
        log.info("cluster: %s (%s)", decision.action.value, decision.reason)
        if decision.action is Action.BOOTSTRAP:
            record = MembershipRecord(MEMBER, [me])
            record.save(state_dir)
        elif decision.action is Action.JOIN:
            members = await join_partners(decision.via, self.cfg.read_secret())
            record = MembershipRecord(JOINING, sorted({*members, me}))
            record.save(state_dir)
            log.info("cluster: joining the members %s; the leader adds %s", ", ".join(members), me)
        else:
            found = MembershipRecord.load(state_dir)
            # no record: state from before dynamic membership; the tagged nodes were the members then
            record = found or MembershipRecord(JOINING, sorted({*tailnet.members(), me}))
        return me, [m for m in record.members if m != me], record

    async def _on_removed(self, reason: str) -> None:
        """This member was removed with ``cluster remove``: stop answering (REFUSED, so resolvers ask the
        other connectors at once), withdraw the pool routes (the tailnet routes pool traffic to the
        connectors still in the cluster), report unready. Raft keeps running so peers see "removed"."""
        state_dir = self.replica.paths.dir if self.replica is not None else self.cfg.cluster.state_dir
        log.error("cluster: %s; stopping DNS answers (every query now gets REFUSED) and withdrawing the pool "
                  "routes. To join again: stop this connector, empty %s and start it", reason, state_dir)
        await self.stop_serving(reason)

    def _raft_check(self) -> tuple[bool, str]:
        if self.replica is None:
            return False, "not started"
        st = self.replica.status()
        if st.get("failure"):
            return False, f"failed: {st['failure']}"
        if not st.get("leader"):
            return False, f"no leader known (role {st.get('role')})"
        lag = _int(st.get("leader_commit_index")) - _int(st.get("applied_index"))
        if lag > 1000:
            return False, f"catching up: {lag} entries behind the leader"
        return True, f"{st.get('role')}, leader {st.get('leader')}, term {st.get('term')}"

    def _nat_check(self) -> tuple[bool, str]:
        if self.nat is None:
            return False, "not started"
        st = self.nat.status()
        if not self.cfg.nat.enabled:
            return True, "off (nat.enabled = false): DNS only"
        if not st.get("enabled"):
            return False, f"kernel steering off: {st.get('reason')}"
        if st.get("out_of_sync"):
            return False, "kernel table out of sync; rebuilding"
        return True, f"{st.get('steer_elements')} steer element(s)"

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
