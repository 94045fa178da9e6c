"""systemd notify and watchdog (issue 15): systemd is not PID 1 here, so the test owns the NOTIFY_SOCKET.

A real `appconnector run` says READY=1 once it answers DNS, pings WATCHDOG=1 at half the interval
while it runs, sends no ping while it is stopped (SIGSTOP: what systemd's watchdog must notice), pings
again after SIGCONT, and says STOPPING=1 on SIGTERM. In-process with a real replica: a hung Raft tick
thread withholds the pings although the event loop runs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appconnector.sdnotify import Notifier, Watchdog, socket_address
from tests.member import free_ports
from tests.ops.helpers import REPO, free_port
from tests.ops.test_run import standalone_config


def test_socket_address_and_environment() -> None:
    assert socket_address("@actn/notify") == b"\0actn/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("vsock:2:1234") is None
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42", "PATH": "/bin"}
    n = Notifier.from_env(env, pid=42)
    assert n.address == b"\0x" and n.watchdog == 20.0
    assert env == {"PATH": "/bin"}, "removed: child processes must not notify for us"
    other = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "41"}, pid=42)
    assert other.address == b"\0x" and other.watchdog is None, "the watchdog is meant for another process"
    assert Notifier.from_env({}).send("READY=1") is False, "not under systemd: nothing is sent"


class NotifySocket:
    """The test's end of NOTIFY_SOCKET: a unix datagram socket, abstract or on the filesystem."""

    def __init__(self, tmp: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"actn-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:
            path = str(tmp / "notify.sock")
            self.sock.bind(path)
            self.env = path

    def next(self, timeout: float) -> str | None:
        """The next datagram within ``timeout`` seconds, or None."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def wait_for(self, field: str, timeout: float) -> list[str]:
        """Datagrams up to and including the first carrying ``field``; fails after ``timeout``."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg is None:
                break
            seen.append(msg)
            if field in msg.split("\n"):
                return seen
        raise AssertionError(f"no {field} within {timeout}s; got {seen}")

    def drain(self) -> None:
        while self.next(0.01) is not None:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["abstract", "path"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path, request.param == "abstract")
    yield s
    s.close()


def _query(port: int) -> bytes:
    q = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q, ("127.0.0.1", port))
        return s.recv(4096)


def _wait_stopped(pid: int) -> None:
    """Until every thread of ``pid`` is in state T (stopped): kill() returns before the signal lands."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = [(Path(f"/proc/{pid}/task") / t / "stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir(f"/proc/{pid}/task")]
        if all(s == "T" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"{pid} did not stop")


def test_run_notifies_ready_pings_the_watchdog_and_stops_pinging_when_hung(
        tmp_path: Path, notify_socket: NotifySocket) -> None:
    dns_port = free_port()
    cfg = standalone_config(tmp_path, dns_port, free_port(), free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    env.update(NOTIFY_SOCKET=notify_socket.env, WATCHDOG_USEC="1000000")  # 1 s: a ping every 0.5 s
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config", str(cfg)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        before = notify_socket.wait_for("READY=1", 60)
        assert all(m.startswith("EXTEND_TIMEOUT_USEC=") for m in before[:-1]), before
        assert _query(dns_port)[3] & 0x0F == 0, "READY=1 means DNS answers"
        got = [notify_socket.wait_for("WATCHDOG=1", 5) for _ in range(3)]
        assert all(len(g) == 1 for g in got), got
        os.killpg(proc.pid, signal.SIGSTOP)  # a hung process: no ping may reach systemd
        _wait_stopped(proc.pid)
        notify_socket.drain()
        assert notify_socket.next(2.5) is None, "a stopped process sent a watchdog ping"
        os.killpg(proc.pid, signal.SIGCONT)
        notify_socket.wait_for("WATCHDOG=1", 5)
        proc.send_signal(signal.SIGTERM)
        notify_socket.wait_for("STOPPING=1", 10)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "Traceback" not in (tmp_path / "run.log").read_text()


def test_a_hung_raft_tick_withholds_the_watchdog_ping(tmp_path: Path) -> None:
    from tests.pool.test_replica import _leader, _replica

    listener = NotifySocket(tmp_path, abstract=True)
    gate = threading.Event()

    async def body() -> None:
        r = _replica(tmp_path, f"127.0.0.1:{free_ports(1)[0]}", [], None)
        await r.start()
        notifier = Notifier(socket_address(listener.env), watchdog=0.4)
        dog = Watchdog(notifier)
        try:
            await _leader(r)
            dog.start()
            dog.serving(r.tick_alive)

            async def expect(field: str | None, timeout: float) -> None:
                msg = await asyncio.to_thread(listener.next, timeout)
                if field is None:
                    assert msg is None, f"pinged while the Raft tick hung: {msg}"
                else:
                    assert msg == field, msg

            await expect("WATCHDOG=1", 3)
            assert r._engine is not None
            r._engine.call_on_tick(lambda: gate.wait(30))  # the tick thread hangs; the loop keeps running
            await asyncio.to_thread(listener.drain)
            await expect(None, 1.5)
            assert dog.missed >= 2
            gate.set()
            await expect("WATCHDOG=1", 3)
        finally:
            gate.set()
            await dog.stop()
            notifier.close()
            await r.stop()
    try:
        asyncio.run(body())
    finally:
        listener.close()


def test_the_unit_asks_for_notify_a_watchdog_and_withdraws_after_every_stop() -> None:
    """The unit wires what this file tests (systemd-analyze verify runs in test_files.py and in CI)."""
    unit = (REPO / "systemd" / "appconnector.service").read_text().splitlines()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s",
                 "ExecStopPost=-/usr/local/bin/appconnector routes withdraw"):
        assert line in unit, line
    from tests.ops.helpers import cli

    res = cli("routes", "withdraw", "--help")
    assert res.returncode == 0 and "ExecStopPost" in res.stdout
