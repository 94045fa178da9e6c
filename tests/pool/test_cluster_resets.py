"""Regression: a member whose TCP connections are reset every couple of seconds under load.

pysyncobj 0.3.17 followers truncate entries they already applied when a resend after a reset starts
from a stale next-index ("truncating already-applied log entries … may have diverged", docs/design.md §6).
A real 3-process cluster on loopback; one member is reachable only through a TCP proxy that resets
every connection through it (RST both ways) every ~1.7 s while all three members run checkouts.
The run fails on any "may have diverged" line and on any acknowledged checkout missing afterwards.

``APPCONNECTOR_LONG=1`` adds the same run without the journal guard (``--no-guard``) and asserts that it
*does* fail, so this test is known to be able to catch the bug; and a longer guarded run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appconnector.pool.raftlog import DIVERGED_MARKER
from tests.member import MemberProcess, free_ports

TICKS_IN_FLIGHT = 3
"""Entries (pool-clock ticks) by which converged replicas' applied indexes may differ."""

pytestmark = pytest.mark.cluster

LONG = os.environ.get("APPCONNECTOR_LONG") == "1"


class ResettingProxy:
    """Forwards 127.0.0.1:listen → 127.0.0.1:target; ``reset_all`` kills every connection with an RST."""

    def __init__(self, listen: int, target: int) -> None:
        self.listen, self.target = listen, target
        self.server = socket.create_server(("127.0.0.1", listen), reuse_port=False)
        self.server.settimeout(0.2)
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.resets = 0
        self.accepted = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.pairs.append((client, upstream))
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def reset_all(self) -> int:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:  # linger 0: close sends RST, dropping whatever was in flight
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                except OSError:
                    pass
        self.resets += len(pairs)
        return len(pairs)

    def close(self) -> None:
        self.closed = True
        self.reset_all()
        self.server.close()


def _addr(port: int) -> str:
    return f"127.0.0.1:{port}"


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture
def reset_cluster(tmp_path: Path) -> Iterator[Any]:
    started: list[MemberProcess] = []
    proxies: list[ResettingProxy] = []

    def make(guard: bool) -> tuple[list[MemberProcess], ResettingProxy]:
        secret = tmp_path / "secret"
        secret.write_text("acraft-reset-secret\n")
        secret.chmod(0o600)  # the member refuses a secret others can read
        # The member reached through the proxy must have the lowest address: pysyncobj's lower address
        # accepts and the higher one connects, so all of its connections then pass through its proxy.
        ports = sorted(free_ports(4), key=lambda p: _addr(p))
        proxy_port, real_port, b, c = ports[0], ports[1], ports[2], ports[3]
        assert _addr(proxy_port) < _addr(b) and _addr(proxy_port) < _addr(c)
        proxy = ResettingProxy(proxy_port, real_port)
        proxies.append(proxy)
        names = [_addr(proxy_port), _addr(b), _addr(c)]
        extra = [] if guard else ["--no-guard"]
        members = []
        for i, name in enumerate(names):
            m = MemberProcess(name, [n for n in names if n != name], tmp_path / "state", secret_file=secret,
                              bind=_addr(real_port) if i == 0 else None, extra=extra,
                              log_path=tmp_path / f"m{i}.log")
            started.append(m)
            members.append(m.start())
        for m in members:
            m.wait_ready()
        _wait(lambda: any(m.status()["role"] == "leader" for m in members), 15, "a leader")
        return members, proxy

    yield make
    for m in started:
        m.kill()
    for p in proxies:
        p.close()


def _run_resets_under_load(members: list[MemberProcess], proxy: ResettingProxy, seconds: float
                           ) -> tuple[int, dict[str, Any]]:
    stop = threading.Event()
    resets = 0

    def resetter() -> None:
        nonlocal resets
        while not stop.wait(1.7):
            resets += proxy.reset_all()

    t = threading.Thread(target=resetter, daemon=True)
    t.start()
    with ThreadPoolExecutor(len(members)) as pool:
        # ~3 KB entries (docs/design.md §6's reproduction): padded names, a few dozen checkouts per entry.
        futs = [pool.submit(m.call, "load", timeout=seconds + 60, count=10**9, seconds=seconds,
                            concurrency=48, nodes=40, node_prefix=f"m{i}n", domain_prefix=f"m{i}d", pad=150,
                            return_acked=False)
                for i, m in enumerate(members)]
        results = [f.result() for f in futs]
    stop.set()
    t.join()
    acked = sum(int(r["acked"]) for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return acked, {"resets": resets, "errors": errors}


def _converged(members: list[MemberProcess]) -> dict[str, Any] | None:
    # the leader's pool-clock ticks keep the log growing: applied indexes may differ by the ticks in
    # flight, which the digest (without the clock) does not see
    st = [m.status(timeout=30, digest=True) for m in members]
    applied = [s["applied_index"] for s in st]
    if max(applied) - min(applied) <= TICKS_IN_FLIGHT and all(s["leader"] for s in st) \
            and len({s["digest"] for s in st}) == 1:
        return {"applied": min(applied), "statuses": st}
    return None


def _check(members: list[MemberProcess], acked: int) -> list[str]:
    """Problems found: divergence lines, lost or changed acknowledged checkouts, unequal replicas."""
    problems = []
    t_start = time.monotonic()
    for m in members:
        lines = [ln for ln in m.log_text().splitlines() if DIVERGED_MARKER in ln]
        if lines:
            problems.append(f"{m.self_address}: {len(lines)} '{DIVERGED_MARKER}' lines, first: {lines[0][:300]}")
    try:
        done = _wait(lambda: _converged(members), 30, "replicas to converge")
    except AssertionError as e:
        problems.append(str(e))
        return problems
    print("converged after", time.monotonic() - t_start)
    for s in done["statuses"]:
        if s["diverged"]:
            problems.append(f"{s['leader']}: status reports {s['diverged']} divergences")
    # Each member checks the checkouts it acknowledged against its state; equal digests (above) mean
    # every replica holds that same state.
    checked = 0
    for m in members:
        v = m.call("verify_acked", timeout=60)
        checked += v["checked"]
        if v["missing_count"]:
            problems.append(f"{m.self_address}: {v['missing_count']} of {v['checked']} acknowledged checkouts "
                            f"missing or changed, e.g. {v['missing']}")
    if checked != acked:
        problems.append(f"members checked {checked} acknowledged checkouts, the loads reported {acked}")
    return problems


def test_connection_resets_under_load_lose_nothing(reset_cluster: Any) -> None:
    members, proxy = reset_cluster(guard=True)
    acked, info = _run_resets_under_load(members, proxy, seconds=40 if LONG else 12)
    assert info["resets"] >= 8, f"the proxy reset too few connections to test anything: {info}"
    assert acked > 5000, f"too little load got through to test anything: {acked} ({info})"
    t0 = time.monotonic()
    problems = _check(members, acked)
    print("guarded run:", info, acked, "acked; check took", time.monotonic() - t0,
          [(s["appends_rewritten"], s["tails_held"], s["truncations_refused"]) for s in (m.status() for m in members)])
    assert not problems, "\n".join(problems)
    # The guard was exercised: some appends carried entries the follower already had.
    rewritten = sum(m.status()["appends_rewritten"] for m in members)
    assert rewritten > 0, "no append was rewritten: the resets did not produce stale resends"


@pytest.mark.long  # APPCONNECTOR_LONG=1: shows the same run fails without the guard
def test_without_the_guard_the_same_run_fails(reset_cluster: Any) -> None:
    members, proxy = reset_cluster(guard=False)
    acked, info = _run_resets_under_load(members, proxy, seconds=20)
    problems = _check(members, acked)
    print("unguarded run:", info, acked, "acked;", "\n".join(problems))
    assert problems, f"unguarded pysyncobj survived {info['resets']} resets: the regression test proves nothing"
