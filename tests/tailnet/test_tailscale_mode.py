"""Two connectors in tailscale mode, each with its own tailscaled stand-in process, in a network
namespace of their own (the Raft-port filter is applied there, never on the host).

Shows, with real processes: two fresh tagged connectors form ONE cluster (the lowest StableID
bootstraps, the other joins), both advertise the pool route without wiping the routes already there,
a client is identified by whois (the node is its StableID) and gets the same address from either
connector, a peer without the cluster secret gets nothing from the Raft port while one with it does,
the Raft-port filter lists exactly the tagged connectors, and both stop with exit 0 on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.localapi_standin import get_state
from tests.ops.helpers import REPO

TAG = "tag:appconnector"
NS = f"actn-e2e-{os.getpid() % 100000}"
CONN = {"nConnA": "127.0.0.1", "nConnB": "127.0.0.2"}
CLIENT_IP = "127.0.0.3"


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _in_ns(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    return subprocess.run(["ip", "netns", "exec", NS, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout, check=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _in_ns(sys.executable, "-m", "appconnector.cli", *args)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: a network namespace for the connectors and their Raft-port filter")
    if not shutil.which("ip"):
        pytest.skip("needs iproute2")
    if importlib.util.find_spec("appconnector.app") is None:
        pytest.skip("needs appconnector.app (the lead's wiring) to be present")
    subprocess.run(["ip", "netns", "add", NS], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", NS, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False, capture_output=True)


def _state(self_id: str) -> dict[str, object]:
    nodes = [{"stable_id": sid, "name": sid.lower(), "addresses": [ip], "tags": [TAG]} for sid, ip in CONN.items()]
    nodes.append({"stable_id": "nClient", "name": "client", "addresses": [CLIENT_IP]})
    me = next(n for n in nodes if n["stable_id"] == self_id)
    return {"style": "delta", "self": me, "peers": [n for n in nodes if n is not me],
            "prefs": {"AdvertiseRoutes": ["192.168.50.0/24"]}}


def _query(server: str, port: int, name: bytes = b"\x06github\x03com\x00") -> str:
    code = (
        "import socket,sys\n"
        "q=bytes.fromhex('beef01000001000000000000')+" + repr(name) + "+b'\\x00\\x01\\x00\\x01'\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(({CLIENT_IP!r},0));s.settimeout(5)\n"
        f"s.sendto(q,({server!r},{port}));a=s.recv(4096)\n"
        "assert a[:2]==b'\\xbe\\xef' and a[3]&15==0, a\n"
        "print('.'.join(str(b) for b in a[-4:]))\n")
    res = _in_ns(sys.executable, "-c", code)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.root
@pytest.mark.cluster
def test_two_fresh_connectors_form_one_cluster(netns: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("e2e-shared-secret\n")
    procs: dict[str, subprocess.Popen[str]] = {}
    standins: dict[str, subprocess.Popen[str]] = {}
    socks: dict[str, str] = {}
    try:
        for sid, ip in CONN.items():
            sock = str(tmp_path / f"{sid}.sock")
            socks[sid] = sock
            state_file = tmp_path / f"{sid}.json"
            state_file.write_text(json.dumps(_state(sid)))
            standins[sid] = subprocess.Popen([sys.executable, str(REPO / "tests" / "localapi_standin.py"),
                                              "--socket", sock, "--state", str(state_file)],
                                             stdout=subprocess.PIPE, text=True)
            assert standins[sid].stdout is not None and "listening" in standins[sid].stdout.readline()
            cfg = tmp_path / f"{sid}.toml"
            cfg.write_text(f"""
[tailnet]
mode = "tailscale"
localapi_socket = "{sock}"
[dns]
listen = ["{ip}:5353"]
upstream = ["192.0.2.1:53"]
verify_upstream = false
[cluster]
state_dir = "{tmp_path / sid}"
tag = "{TAG}"
secret_file = "{secret}"
[nat]
enabled = false
[http]
listen = "{ip}:8893"
""")
        # B (higher StableID) first: it must wait, not bootstrap a cluster of its own
        for sid in ("nConnB", "nConnA"):
            env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
            with open(tmp_path / f"{sid}.log", "w") as log:  # a file, not a pipe: a full pipe would block it
                procs[sid] = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "appconnector.cli",
                                               "run", "--config", str(tmp_path / f"{sid}.toml")], cwd=REPO, env=env,
                                              stdout=log, stderr=log, text=True)
            if sid == "nConnB":
                time.sleep(0.5)  # give B a head start; A is started while B is waiting
        for sid, ip in CONN.items():
            def ready(sid: str = sid, ip: str = ip) -> bool:
                p = procs[sid]
                assert p.poll() is None, f"{sid} exited: {(tmp_path / f'{sid}.log').read_text()[-3000:]}"
                return _cli("status", "--http", f"{ip}:8893", "--timeout", "2").returncode == 0
            _wait(ready, 90, f"{sid} ready")

        members = json.loads(_cli("cluster", "members", "--http", "127.0.0.2:8893", "--json").stdout)
        assert members["members"] == ["127.0.0.1:6270", "127.0.0.2:6270"]
        leaders = {json.loads(_cli("cluster", "members", "--http", f"{ip}:8893", "--json").stdout)["leader"]
                   for ip in CONN.values()}
        assert len(leaders) == 1 and None not in leaders, f"one cluster, one leader: {leaders}"

        for sid in CONN:  # routes advertised as a union: the operator's route is kept
            routes = get_state(socks[sid])["prefs"]["AdvertiseRoutes"]
            assert routes == ["192.168.50.0/24", "100.64.1.0/24"], routes

        a = _query("127.0.0.1", 5353)
        assert a.startswith("100.64.1.")
        assert _query("127.0.0.2", 5353) == a, "the other connector answers the same replicated mapping"
        res = _cli("pool", "lookup", "nClient", "github.com", "--http", "127.0.0.2:8893")
        assert res.returncode == 0 and res.stdout.strip() == a, "the node is the client's StableID (whois)"

        # the Raft port talks only to holders of the secret (pysyncobj's utility protocol as the probe)
        probe = ("import sys\nfrom pysyncobj.utility import TcpUtility, UtilityException\n"
                 "try:\n st = TcpUtility(password=sys.argv[1], timeout=2)"
                 ".executeCommand('127.0.0.1:6270', ['status'])\n"
                 "except UtilityException as e:\n print('refused', e); sys.exit(1)\n"
                 "print('leader', st.get('leader'))\n")
        assert _in_ns(sys.executable, "-c", probe, "e2e-shared-secret").returncode == 0
        wrong = _in_ns(sys.executable, "-c", probe, "not-the-secret")
        assert wrong.returncode == 1, wrong.stdout + wrong.stderr

        table = _in_ns("nft", "list", "table", "inet", "appconnector_raft").stdout
        assert "127.0.0.1" in table and "127.0.0.2" in table and "dport 6270" in table, table
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for sid, p in procs.items():
            try:
                codes[sid] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[sid] = p.wait()
        for s in standins.values():
            s.terminate()
            s.wait(timeout=10)
    logs = {sid: (tmp_path / f"{sid}.log").read_text() for sid in procs}
    assert codes == {"nConnA": 0, "nConnB": 0}, {sid: text[-2000:] for sid, text in logs.items()}
    assert "waiting for nConnA" in logs["nConnB"], "B (started first) waited for the lowest StableID"
    assert "bootstrap" in logs["nConnA"] and "join" in logs["nConnB"], "A bootstrapped, B joined"
