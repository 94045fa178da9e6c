"""Three (or more) pool member processes on loopback, each with a group id of its own (for the nemesis),
driven over JSON lines on stdin/stdout (``python -m tests.member``, the one member harness: a real
``RaftReplica``).

Each request carries an ``id``; the harness's reader thread hands answers back by id, so many client
threads can talk to one member at once. A member that is killed or paused simply stops answering: its
pending requests fail or time out and are recorded as unknown.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from appconnector.config import PoolConfig
from tests.faults.history import CHECKOUT
from tests.faults.nemesis import Endpoint, preexec_for
from tests.faults.workload import Exhausted, Unavailable
from tests.member import MemberError, MemberProcess

M = TypeVar("M")

REPO = Path(__file__).resolve().parents[2]
CHECKOUT_TIMEOUT = PoolConfig.checkout_timeout
"""The members' pool.checkout_timeout: the shipped default, as a connector's."""


@dataclass
class MemberSpec:
    name: str
    port: int
    gid: int
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)  # e.g. --broken: plant a wrong state machine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.gid, self.port)


class Member:
    """One pool member: a :class:`tests.member.MemberProcess` per start, with its group id, environment
    and the harness's arguments; requests that fail to get an answer raise :class:`Unavailable`."""

    kind = CHECKOUT

    def __init__(self, spec: MemberSpec, peers: Sequence[str], prefixes: Sequence[str], reuse_after: float,
                 secret_file: Path, log_dir: Path) -> None:
        self.spec = spec
        self.name = spec.name
        self.peers = list(peers)
        self.prefixes = list(prefixes)
        self.reuse_after = reuse_after
        self.secret_file = secret_file
        self.log_path = log_dir / f"acfault-{spec.name}.log"
        self.process: MemberProcess | None = None
        self.paused = False

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        assert not self.running()
        extra = ["--reuse-after", f"{self.reuse_after:g}", "--checkout-timeout", f"{CHECKOUT_TIMEOUT:g}",
                 *self.spec.extra_args]
        self.process = MemberProcess(self.spec.address, self.peers, self.spec.state_dir, secret_file=self.secret_file,
                                     prefixes=self.prefixes, log_path=self.log_path, extra=extra, env=self.spec.env,
                                     preexec_fn=preexec_for(self.spec.gid)).start()
        self.paused = False

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.process.proc if self.process is not None else None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the member's ready line (its replica started), or fail with its log."""
        assert self.process is not None
        try:
            self.process.wait_ready(timeout)
        except MemberError as e:
            raise AssertionError(f"{self.name}: {e}:\n{self.log_text()[-3000:]}") from None

    def running(self) -> bool:
        return self.process is not None and self.process.alive()

    def kill(self) -> None:
        """kill -9 (requests waiting on it get Unavailable)."""
        if self.process is not None and self.running():
            if self.paused:
                self.resume()
            self.process.kill()

    def stop(self, timeout: float = 10.0) -> int | None:
        """A planned stop (the member may hand leadership away), SIGKILL if it lingers."""
        if self.process is None:
            return None
        if self.paused:
            self.resume()
        return self.process.stop(timeout)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def request(self, op: str, timeout: float, **args: Any) -> dict[str, Any]:
        if self.process is None:
            raise Unavailable(f"{self.name} is not running")
        try:
            return self.process.request(op, timeout, **args)
        except MemberError as e:
            raise Unavailable(str(e)) from None

    # ---- Target ------------------------------------------------------------------------------------

    def checkout(self, node: str, domain: str, timeout: float) -> int:
        r = self.request("checkout", timeout, node=node, domain=domain)
        if r.get("ok"):
            return _addr(r["address"])
        err = f"{r.get('error', '')}: {r.get('message', '')}"
        if r.get("error") == "PoolExhausted":
            raise Exhausted(err)
        raise Unavailable(err if r.get("error") else json.dumps(r))

    def lookup(self, node: str, domain: str, timeout: float) -> int | None:
        r = self._ok(self.request("lookup", timeout, node=node, domain=domain))
        return None if r.get("address") is None else _addr(r["address"])

    def domain_for(self, node: str, address: int, timeout: float) -> str | None:
        r = self._ok(self.request("domain_for", timeout, node=node, address=address))
        d = r.get("domain")
        return None if d is None else str(d)

    def touch(self, node: str, address: int, domain: str, at: float, timeout: float) -> bool:
        """Queue a touch and ask the member to flush; True when it says the batch was applied."""
        r = self.request("touch", timeout, node=node, address=address, domain=domain, at=at, flush=True)
        return bool(r.get("ok") and r.get("applied", False))

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        status: dict[str, Any] = self._ok(self.request("status", timeout))["status"]
        return status

    def state(self, timeout: float = 5.0) -> tuple[str, list[tuple[str, str, int]]]:
        """(digest, mappings) of the member's local state."""
        r = self._ok(self.request("mappings", timeout))
        return str(r["digest"]), [(str(n), str(d), _addr(a)) for n, d, a in r["mappings"]]

    def _ok(self, r: dict[str, Any]) -> dict[str, Any]:
        if not r.get("ok"):
            raise Unavailable(f"{r.get('error')}: {r.get('message')}" if r.get("error") else str(r))
        return r


def _addr(a: object) -> int:
    assert isinstance(a, int), a  # the harness speaks IPv4 integers
    return a


class MemberGroup(Generic[M]):
    """What the runner and nemesis need of a group of members (pool members or whole connectors):
    ``members`` by name, the live ones, the agreed leader, convergence, stop."""

    members: dict[str, M]

    def live(self) -> list[M]:
        return [m for m in self.members.values() if m.running() and not m.paused]

    def leader(self, timeout: float = 10.0) -> M:
        """A live member that says it leads, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for m in self.live():
                try:
                    st = m.status(1.0)
                except Unavailable as e:
                    last = e
                    continue
                last = st
                if st.get("leader_self") or st.get("role") == "leader":
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no leader within {timeout}s (last status {last})")

    def wait_converged(self, timeout: float = 30.0) -> dict[str, str]:
        """Wait until every member runs and reports the same digest; returns name → digest."""
        deadline = time.monotonic() + timeout
        digests: dict[str, str] = {}
        while time.monotonic() < deadline:
            digests = {}
            for m in self.live():
                with contextlib.suppress(Unavailable):
                    digests[m.name] = m.state(5.0)[0]
            if len(digests) == len(self.members) and len(set(digests.values())) == 1:
                return digests
            time.sleep(0.2)
        raise AssertionError(f"members did not converge within {timeout}s: {digests}")

    def stop(self) -> None:
        for m in self.members.values():
            if m.running():
                m.kill()

    def leader_kill_times(self, rounds: int, warm_node: str, node: str, *, leader_timeout: float,
                          per_try: float) -> list[float]:
        """kill -9 the leader, then ask a survivor for a name never seen before, retrying like a stub
        resolver; each round's time to that answer. The answer must survive on every member once the
        killed one is back."""
        times: list[float] = []
        for round_ in range(rounds):
            leader = self.leader(timeout=leader_timeout)
            survivor = next(m for m in self.members.values() if m is not leader)
            survivor.checkout(warm_node, f"warm{round_}.example.com", 10.0)
            domain = f"new{round_}.example.com"
            t0 = time.monotonic()
            leader.kill()
            address = checkout_until(survivor, node, domain, deadline=30.0, per_try=per_try)
            times.append(time.monotonic() - t0)
            leader.start()
            leader.wait_ready()
            self.wait_converged()
            for m in self.members.values():
                assert m.lookup(node, domain, 5.0) == address, m.name
        return times


def checkout_until(m: Any, node: str, domain: str, deadline: float, per_try: float) -> int:
    """``m.checkout`` retried on Unavailable until ``deadline`` seconds pass."""
    end = time.monotonic() + deadline
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            return int(m.checkout(node, domain, per_try))
        except Unavailable as e:
            last = e
            time.sleep(0.02)
    raise AssertionError(f"{m.name} never answered {domain}: {last}")


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM (a planned stop: the member may hand leadership away), SIGKILL if it lingers."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Cluster(MemberGroup[Member]):
    def __init__(self, base_dir: Path, port_base: int, size: int = 3, prefixes: Sequence[str] = ("100.64.1.0/24",),
                 reuse_after: float = 48 * 3600.0, gid_base: int = 27400,
                 member_env: Callable[[str], dict[str, str]] | None = None) -> None:
        self.base_dir = base_dir
        secret = base_dir / "acfault-secret"
        base_dir.mkdir(parents=True, exist_ok=True)
        secret.write_text("acfault-shared-secret\n")
        secret.chmod(0o600)  # members refuse a secret others can read
        specs = [MemberSpec(f"m{i + 1}", port_base + i, gid_base + i, base_dir / f"acfault-m{i + 1}")
                 for i in range(size)]
        for s in specs:
            s.env = member_env(s.name) if member_env else {}
        self.members = {s.name: Member(s, [o.address for o in specs if o is not s], prefixes, reuse_after,
                                       secret, base_dir) for s in specs}

    def endpoints(self) -> list[Endpoint]:
        return [m.spec.endpoint for m in self.members.values()]

    def start(self) -> None:
        for m in self.members.values():
            m.start()
        for m in self.members.values():
            m.wait_ready()

