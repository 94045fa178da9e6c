"""`appconnector run` as a real process: ready on http.listen, answers DNS, exits 0 on SIGTERM (DESIGN §7)."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ops.helpers import REPO, cli, free_port


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def standalone_config(tmp_path: Path, dns_port: int, raft_port: int, http_port: int) -> Path:
    """A single standalone member on loopback, NAT off, no upstream needed."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[tailnet]
mode = "standalone"
[dns]
listen = ["127.0.0.1:{dns_port}"]
verify_upstream = false
[cluster]
state_dir = "{tmp_path / 'state'}"
raft_port = {raft_port}
[nat]
enabled = false
[http]
listen = "127.0.0.1:{http_port}"
""")
    return cfg


def test_run_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    if importlib.util.find_spec("appconnector.app") is None:
        pytest.skip("needs appconnector.app (the lead's wiring) to be present")
    http_port, dns_port, raft_port = free_port(), free_port(), free_port()
    cfg = standalone_config(tmp_path, dns_port, raft_port, http_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config", str(cfg)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, f"run exited early: {proc.communicate()[1][-2000:]}"
            return cli("status", "--http", f"127.0.0.1:{http_port}", "--timeout", "2").returncode == 0
        _wait(ready, 60, "`appconnector status` to report ready")
        # a DNS query is answered with a pool address (standalone: the client IP is the node)
        q = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(q, ("127.0.0.1", dns_port))
            answer = s.recv(4096)
        assert answer[:2] == b"\xab\xcd" and answer[3] & 0x0F == 0, "NOERROR"
        assert answer[-4:-2] == bytes([100, 64]), "an address from the default pool 100.64.1.0/24"
        res = cli("pool", "lookup", "127.0.0.1", "example.com", "--http", f"127.0.0.1:{http_port}")
        assert res.returncode == 0 and res.stdout.strip() == ".".join(str(b) for b in answer[-4:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, err = proc.communicate()
        assert "level=" in err and "msg=" in err, "structured key=value logs"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_with_the_raft_port_taken_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    http_port, dns_port = free_port(), free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        raft_port = holder.getsockname()[1]
        cfg = standalone_config(tmp_path, dns_port, raft_port, http_port)
        res = cli("run", "--config", str(cfg), timeout=60)
    assert res.returncode == 1
    assert "cannot start" in res.stderr and "cluster.raft_port" in res.stderr
    assert "Traceback" not in res.stderr
