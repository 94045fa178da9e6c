"""The Raft port of a lone member never unpickles bytes from a peer that has not proven a secret (issue 9.1).

A real malicious pickle (unpickling it runs ``touch MARKER`` through a shell, as root here) goes over TCP
to the Raft port of a real ``appconnector run``: the README's demo (no config at all) and a standalone
config without ``cluster.secret_file``. Before the fix pysyncobj listened without a password and ran it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appconnector.config import DEFAULT_RAFT_PORT
from appconnector.secrets_file import MEMBER_SECRET_FILE
from tests.ops.helpers import REPO, free_port, stop_group
from tests.ops.raft_probe import attack, dns_query
from tests.ops.test_run import _wait, standalone_config

DEMO_DNS = ("127.0.0.1", 5353)  # the demo's defaults (DESIGN.md §7)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}


def _stop(proc: subprocess.Popen[str]) -> str:
    stop_group(proc)
    return proc.communicate()[1][-3000:]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"acsec-{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _in_ns(ns: str, *args: str) -> str:
    res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.ops.raft_probe", *args],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def test_the_demo_does_not_run_a_pickle_sent_to_its_raft_port(tmp_path: Path, netns: str) -> None:
    """``appconnector run`` with no config, exactly as the README says, in a namespace of its own (the demo's
    fixed ports and its nftables table stay there)."""
    marker = tmp_path / "pwned"
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "appconnector.cli", "run"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    dns = f"{DEMO_DNS[0]}:{DEMO_DNS[1]}"
    try:
        def serving() -> bool:
            assert proc.poll() is None, f"the demo exited: {proc.communicate()[1][-2000:]}"
            return _in_ns(netns, "dns", dns).startswith("0 100.64.")
        _wait(serving, 60, "the demo to answer DNS")
        assert _in_ns(netns, "attack", f"127.0.0.1:{DEFAULT_RAFT_PORT}", str(marker)) == "closed", \
            "the member read the frame and hung up"
        assert not marker.exists(), "the pickle sent to the Raft port ran a shell command"
        assert _in_ns(netns, "dns", dns).startswith("0 100.64."), "the member still answers DNS"
        secret = tmp_path / "state" / MEMBER_SECRET_FILE
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err


def test_a_standalone_member_without_a_secret_does_not_run_a_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    http_port, dns_port, raft_port = free_port(), free_port(), free_port()
    cfg = standalone_config(tmp_path, dns_port, raft_port, http_port)
    proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config", str(cfg)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        def serving() -> bool:
            assert proc.poll() is None, f"run exited: {proc.communicate()[1][-2000:]}"
            try:
                return dns_query("127.0.0.1", dns_port, timeout=1.0)[0] == 0
            except OSError:
                return False
        _wait(serving, 60, "the member to answer DNS")
        for _ in range(3):  # the same member, several connections
            assert attack("127.0.0.1", raft_port, str(marker)), "the member read the frame and hung up"
        assert not marker.exists(), "the pickle sent to the Raft port ran a shell command"
        rcode, tail = dns_query("127.0.0.1", dns_port, "after.example")
        assert rcode == 0 and tail[:2] == bytes([100, 64]), "the member still hands out pool addresses"
    finally:
        err = _stop(proc)
    assert proc.returncode == 0, err
