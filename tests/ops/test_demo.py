"""The demo (`appconnector run` with no config) as a new user meets it: real processes, each in a network
namespace of its own (so the demo's fixed ports and the host's forwarding setting are the test's own).

* NAT the demo was not asked for never makes it unready: without IPv4 forwarding it says "NAT off" and
  why at start, and `appconnector status` reports ready (it used to say "NAT on" and then fail `nat`).
* `pool show` prints last-used as a UTC time and an age; `--json` keeps the Unix time; `--limit` refuses
  negatives with exit 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops.helpers import REPO, cli

pytestmark = pytest.mark.root

HTTP = "127.0.0.1:8893"  # the demo's defaults, inside the namespace
ADMIN = "127.0.0.1:8894"
DNS = ("127.0.0.1", 5353)


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=20, check=True)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class Demo:
    def __init__(self, ns: str, proc: subprocess.Popen[str], log: Path, state: Path) -> None:
        self.ns, self.proc, self.log, self.state = ns, proc, log, state

    def cli(self, *args: str, admin: bool = False) -> subprocess.CompletedProcess[str]:
        """The command against the demo: its status listener, or its admin listener with the token the
        demo made in ./state (as the README says to)."""
        where = ["--admin", ADMIN] if admin else ["--http", HTTP]
        env = _env({"APPCONNECTOR_CLUSTER_STATE_DIR": str(self.state)} if admin else {})
        return subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m", "appconnector.cli", *args,
                               *where], capture_output=True, text=True, env=env, cwd=REPO, timeout=30, check=False)

    def wait_started(self, timeout: float = 60) -> str:
        """Wait for the "connector ready" log line; returns the log so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if "connector ready" in text:
                return text
            assert self.proc.poll() is None, f"the demo exited early: {text[-2000:]}"
            time.sleep(0.05)
        raise AssertionError(f"the demo did not start within {timeout}s: {self.log.read_text()[-2000:]}")

    def status_once_raft_is_up(self, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`appconnector status` once the single member leads (a moment after "connector ready")."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.cli("status")
            if "ok   raft" in res.stdout or time.monotonic() > deadline:
                return res
            time.sleep(0.1)

    def admin_get(self, path: str) -> int:
        """HTTP status of an admin GET with the demo's token, from inside the namespace."""
        token = (self.state / "admin.token").read_text().strip()
        code = ("import urllib.request as u, urllib.error as e, sys\n"
                f"r = u.Request('http://{ADMIN}{path}', headers={{'Authorization': 'Bearer {token}'}})\n"
                "try:\n    sys.stdout.write(str(u.urlopen(r, timeout=5).status))\n"
                "except e.HTTPError as x:\n    sys.stdout.write(str(x.code))\n")
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=20, check=True)
        return int(out.stdout)

    def query(self, name: bytes) -> bytes:
        """One A query over UDP from inside the namespace (a thread entering it would need setns)."""
        q = bytes.fromhex("abcd01000001000000000000") + name + b"\x00\x01\x00\x01"
        code = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(5);"
                f"s.sendto(bytes.fromhex('{q.hex()}'),{DNS!r});sys.stdout.write(s.recv(4096).hex())")
        out = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=20, check=True)
        return bytes.fromhex(out.stdout)


@contextlib.contextmanager
def demo(tmp_path: Path, *, forwarding: bool, env: dict[str, str] | None = None) -> Iterator[Demo]:
    ns = f"acdemo-{uuid.uuid4().hex[:10]}"
    _sh("ip", "netns", "add", ns)
    proc: subprocess.Popen[str] | None = None
    try:
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        _sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.ip_forward={int(forwarding)}")
        log = tmp_path / "demo.log"
        with log.open("w") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "appconnector.cli", "run"],
                                    cwd=tmp_path, env=_env(env or {}), stdout=out, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        yield Demo(ns, proc, log, tmp_path / "state")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_demo_without_forwarding_says_dns_only_and_is_ready(tmp_path: Path) -> None:
    with demo(tmp_path, forwarding=False) as d:
        started = d.wait_started()
        assert "NAT off, DNS only: IPv4 forwarding is off" in started, started
        assert "NAT on" not in started
        assert "DNS on 127.0.0.1:5353" in started
        status = d.status_once_raft_is_up()
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.startswith("ready") and "ok   nat: off" in status.stdout, status.stdout

        answer = d.query(b"\x07example\x03com\x00")
        assert answer[:2] == b"\xab\xcd" and answer[3] & 0x0F == 0 and answer[-4:-2] == bytes([100, 64])
        address = ".".join(str(b) for b in answer[-4:])

        # pool show: last-used as a UTC time and an age, never a raw Unix time
        shown = d.cli("pool", "show", admin=True)
        assert shown.returncode == 0, shown.stderr
        node, domain, addr, last = shown.stdout.strip().split("\t")
        assert (node, domain, addr) == ("127.0.0.1", "example.com", address)
        m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) \((\d+)s ago\)", last)
        assert m is not None, last
        assert int(m.group(2)) < 120, "used moments ago"
        assert time.strftime("%Y-%m-%dT", time.gmtime()) in m.group(1)
        # --json keeps the number
        doc = json.loads(d.cli("pool", "show", "--json", admin=True).stdout)
        assert isinstance(doc["mappings"][0]["last_used"], float | int)
        assert abs(doc["mappings"][0]["last_used"] - time.time()) < 120
        # the admin endpoint refuses a negative limit itself (it used to answer an empty list)
        assert d.admin_get("/pool?limit=-1") == 400
        assert d.admin_get("/pool?limit=0") == 200


def test_demo_with_forwarding_steers(tmp_path: Path) -> None:
    with demo(tmp_path, forwarding=True) as d:
        started = d.wait_started()
        assert "NAT on (pool addresses are steered by nftables)" in started, started
        status = d.status_once_raft_is_up()
        assert status.returncode == 0 and "ok   nat: " in status.stdout, status.stdout
        tables = subprocess.run(["ip", "netns", "exec", d.ns, "nft", "list", "tables"], capture_output=True,
                                text=True, check=True).stdout
        assert "inet appconnector" in tables


def test_demo_asked_for_nat_it_cannot_have_is_not_ready(tmp_path: Path) -> None:
    # NAT asked for explicitly is a promise: without forwarding the demo says so and is not ready
    with demo(tmp_path, forwarding=False, env={"APPCONNECTOR_NAT_ENABLED": "true"}) as d:
        started = d.wait_started()
        assert "NAT on (APPCONNECTOR_NAT_ENABLED)" in started, started
        status = d.status_once_raft_is_up()
        assert status.returncode == 1 and "FAIL nat: kernel steering off: IPv4 forwarding is off" in status.stdout


def test_pool_show_refuses_a_negative_limit() -> None:
    res = cli("pool", "show", "--limit", "-1", "--admin", "127.0.0.1:1")
    assert res.returncode == 2 and "negative" in res.stderr, res.stderr
    res = cli("pool", "show", "--limit", "ten", "--admin", "127.0.0.1:1")
    assert res.returncode == 2 and "not a whole number" in res.stderr, res.stderr


def test_last_used_text() -> None:
    from appconnector.cli import last_used_text

    t = 1_764_588_003.0  # 2025-12-01T11:20:03Z
    assert last_used_text(t, t + 3) == "2025-12-01T11:20:03Z (3s ago)"
    assert last_used_text(t, t + 432) == "2025-12-01T11:20:03Z (7m12s ago)"
    assert last_used_text(t, t + 3 * 3600 + 5 * 60) == "2025-12-01T11:20:03Z (3h05m ago)"
    assert last_used_text(t, t + 2 * 86400 + 4 * 3600) == "2025-12-01T11:20:03Z (2d04h ago)"
    assert last_used_text(t, t - 2) == "2025-12-01T11:20:03Z (0s ago)", "a pool clock a little ahead"

