"""`appconnector run` as a real process: ready on http.listen, answers DNS, exits 0 on SIGTERM (docs/design.md §7)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ops.helpers import REPO, cli, free_port, http


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def standalone_config(tmp_path: Path, dns_port: int, raft_port: int, http_port: int,
                      admin_port: int | None = None) -> Path:
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
admin_listen = "127.0.0.1:{admin_port or free_port()}"
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
        res = cli("pool", "lookup", "127.0.0.1", "example.com", "--config", str(cfg))  # the token from state_dir
        assert res.returncode == 0 and res.stdout.strip() == ".".join(str(b) for b in answer[-4:]), res.stderr
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


def test_run_keeps_admin_off_the_read_only_listener_and_behind_its_token(tmp_path: Path) -> None:
    http_port, admin_port, dns_port, raft_port = free_port(), free_port(), free_port(), free_port()
    cfg = standalone_config(tmp_path, dns_port, raft_port, http_port, admin_port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    token_file = tmp_path / "state" / "admin.token"

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config", str(cfg)], cwd=REPO,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def ready() -> bool:
            assert proc.poll() is None, f"run exited early: {proc.communicate()[1][-2000:]}"
            return cli("status", "--config", str(cfg), "--timeout", "2").returncode == 0
        _wait(ready, 60, "`appconnector status` to report ready")
        return proc

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0

    proc = start()
    try:
        q = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(q, ("127.0.0.1", dns_port))
            address = ".".join(str(b) for b in s.recv(4096)[-4:])
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, "the token is made at first start, owner-only"
        token = token_file.read_text().strip()

        ro, admin = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{admin_port}"
        code, text = http(ro + "/pool")
        assert code == 404 and "example.com" not in text, "no per-node data where Prometheus scrapes"
        code, text = http(ro + "/status")
        assert code == 200 and "example.com" not in text and f'"{address}"' not in text
        assert json.loads(text)["pool"]["mappings"] == 1
        code, _ = http(ro + "/cluster/remove", b'{"member": "127.0.0.1:1"}', {"Content-Type": "application/json"})
        assert code == 404
        code, text = http(admin + "/pool")
        assert code == 401 and "example.com" not in text
        code, _ = http(admin + "/pool", headers={"Authorization": "Bearer " + "x" * len(token)})
        assert code == 401
        code, _ = http(admin + "/cluster/remove", b"member=127.0.0.1:1", {"Authorization": f"Bearer {token}"})
        assert code == 415, "a form body (what a cross-site page can post) is refused"
        code, text = http(admin + "/pool", headers={"Authorization": f"Bearer {token}"})
        assert code == 200 and json.loads(text)["mappings"][0]["address"] == address

        res = cli("pool", "show", "--config", str(cfg))
        assert res.returncode == 0 and "example.com" in res.stdout, res.stderr
        res = cli("pool", "show", "--admin", f"127.0.0.1:{http_port}", "--config", str(cfg))
        assert res.returncode == 1, "the read-only listener has no /pool"
        stop(proc)
        proc = start()  # a restart reuses the token: the CLI keeps working, scripts keep their copy
        assert token_file.read_text().strip() == token
        code, _ = http(admin + "/pool/lookup?node=127.0.0.1&domain=example.com",
                        headers={"Authorization": f"Bearer {token}"})
        assert code == 200
        stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_run_refuses_an_admin_token_others_can_read(tmp_path: Path) -> None:
    cfg = standalone_config(tmp_path, free_port(), free_port(), free_port())
    (tmp_path / "state").mkdir()
    token_file = tmp_path / "state" / "admin.token"
    token_file.write_text("an-old-token\n")
    token_file.chmod(0o644)
    for command in ("run", "check-config"):
        res = cli(command, "--config", str(cfg), timeout=60)
        assert res.returncode == 2, (command, res.stderr)
        assert "http.admin_token_file" in res.stderr and "chmod 600" in res.stderr, res.stderr
    assert token_file.read_text() == "an-old-token\n"


def test_run_refuses_admin_on_the_read_only_listener(tmp_path: Path) -> None:
    port = free_port()
    cfg = standalone_config(tmp_path, free_port(), free_port(), port, admin_port=port)
    res = cli("run", "--config", str(cfg), timeout=60)
    assert res.returncode == 2 and "http.admin_listen" in res.stderr and "not http.listen's" in res.stderr, res.stderr
    assert not (tmp_path / "state").exists(), "refused before anything was made"
