"""Two connectors in tailscale mode, each with its own tailscaled stand-in process, in a network
namespace of their own (the Raft-port filter is applied there, never on the host).

Shows, with real processes: two fresh tagged connectors form ONE cluster (the lowest StableID
bootstraps, the other joins), both advertise the pool route without wiping the routes already there,
a client is identified by whois (the node is its StableID) and gets the same address from either
connector, a peer without the cluster secret gets nothing from the Raft port while one with it does,
the Raft-port filter lists exactly the tagged connectors, and both stop with exit 0 on SIGTERM.

Then membership changes (dynamic Raft membership): a third connector tagged after the two-member cluster
runs joins it (the leader adds it) and answers the same mapping; ``cluster remove`` of a member leaves
the others serving while the removed one says why, answers REFUSED, withdraws the pool route, reports
unready and is not added back.
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.localapi_standin import get_state, set_state
from tests.ops.helpers import REPO, wait_until

TAG = "tag:appconnector"
NS = f"actn-e2e-{os.getpid() % 100000}"
CONN = {"nConnA": "127.0.0.1", "nConnB": "127.0.0.2"}
CLIENT_IP = "127.0.0.3"



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


def _state(self_id: str, conns: dict[str, str] = CONN) -> dict[str, object]:
    nodes = [{"stable_id": sid, "name": sid.lower(), "addresses": [ip], "tags": [TAG]} for sid, ip in conns.items()]
    nodes.append({"stable_id": "nClient", "name": "client", "addresses": [CLIENT_IP]})
    me = next(n for n in nodes if n["stable_id"] == self_id)
    return {"style": "delta", "self": me, "peers": [n for n in nodes if n is not me],
            "prefs": {"AdvertiseRoutes": ["192.168.50.0/24"]}}


def _query(server: str, port: int, name: bytes = b"\x06github\x03com\x00") -> str:
    rcode, answer = _ask(server, port, name)
    assert rcode == 0, f"rcode {rcode} from {server}"
    return answer


def _ask(server: str, port: int, name: bytes = b"\x06github\x03com\x00") -> tuple[int, str]:
    """(rcode, last four bytes of the answer as an IPv4) of an A query from the client's address."""
    code = (
        "import socket,sys\n"
        "q=bytes.fromhex('beef01000001000000000000')+" + repr(name) + "+b'\\x00\\x01\\x00\\x01'\n"
        f"s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(({CLIENT_IP!r},0));s.settimeout(5)\n"
        f"s.sendto(q,({server!r},{port}));a=s.recv(4096)\n"
        "assert a[:2]==b'\\xbe\\xef', a\n"
        "print(a[3]&15, '.'.join(str(b) for b in a[-4:]))\n")
    res = _in_ns(sys.executable, "-c", code)
    assert res.returncode == 0, res.stderr
    rcode, answer = res.stdout.split()
    return int(rcode), answer


class _Fleet:
    """Connectors in tailscale mode in the test namespace, each with its own LocalAPI stand-in process."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.secret = tmp_path / "secret"
        self.secret.write_text("e2e-shared-secret\n")
        self.secret.chmod(0o600)
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.standins: dict[str, subprocess.Popen[str]] = {}
        self.socks: dict[str, str] = {}
        self.ips: dict[str, str] = {}

    def standin(self, sid: str, ip: str, conns: dict[str, str]) -> None:
        sock = str(self.tmp / f"{sid}.sock")
        self.socks[sid], self.ips[sid] = sock, ip
        state_file = self.tmp / f"{sid}.json"
        state_file.write_text(json.dumps(_state(sid, conns)))
        self.standins[sid] = subprocess.Popen([sys.executable, str(REPO / "tests" / "localapi_standin.py"),
                                               "--socket", sock, "--state", str(state_file)],
                                              stdout=subprocess.PIPE, text=True)
        out = self.standins[sid].stdout
        assert out is not None and "listening" in out.readline()

    def start(self, sid: str, clustered: bool = True) -> None:
        """``clustered=False``: no cluster.tag and no secret file (a single connector)."""
        ip = self.ips[sid]
        cluster = f'tag = "{TAG}"\nsecret_file = "{self.secret}"\n' if clustered else ""
        cfg = self.tmp / f"{sid}.toml"
        cfg.write_text(f"""
[tailnet]
mode = "tailscale"
localapi_socket = "{self.socks[sid]}"
[dns]
listen = ["{ip}:5353"]
upstream = ["192.0.2.1:53"]
verify_upstream = false
[cluster]
state_dir = "{self.tmp / sid}"
{cluster}[nat]
enabled = false
[http]
listen = "{ip}:8893"
admin_listen = "{ip}:8894"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
        with open(self.tmp / f"{sid}.log", "w") as log:  # a file, not a pipe: a full pipe would block it
            self.procs[sid] = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-m", "appconnector.cli",
                                                "run", "--config", str(cfg)], cwd=REPO, env=env,
                                               stdout=log, stderr=log, text=True)

    def log(self, sid: str) -> str:
        return (self.tmp / f"{sid}.log").read_text()

    def ready(self, sid: str) -> bool:
        p = self.procs[sid]
        assert p.poll() is None, f"{sid} exited: {self.log(sid)[-3000:]}"
        return _cli("status", "--http", f"{self.ips[sid]}:8893", "--timeout", "2").returncode == 0

    def members(self, sid: str) -> dict[str, object]:
        res = _cli("cluster", "members", "--http", f"{self.ips[sid]}:8893", "--json")
        assert res.returncode == 0, res.stderr
        doc: dict[str, object] = json.loads(res.stdout)
        return doc

    def stop_one(self, sid: str) -> int:
        p = self.procs[sid]
        p.send_signal(signal.SIGTERM)
        return p.wait(timeout=30)

    def stop(self) -> dict[str, int]:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for sid, p in self.procs.items():
            try:
                codes[sid] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[sid] = p.wait()
        for st in self.standins.values():
            st.terminate()
            st.wait(timeout=10)
        return codes


@pytest.mark.root
@pytest.mark.cluster
def test_two_fresh_connectors_form_one_cluster(netns: str, tmp_path: Path) -> None:
    fleet = _Fleet(tmp_path)
    try:
        for sid, ip in CONN.items():
            fleet.standin(sid, ip, CONN)
        # B (higher StableID) first: it must wait, not bootstrap a cluster of its own
        fleet.start("nConnB")
        time.sleep(0.5)  # give B a head start; A is started while B is waiting
        fleet.start("nConnA")
        for sid in CONN:
            wait_until(lambda sid=sid: fleet.ready(sid), 90, f"{sid} ready")

        members = fleet.members("nConnB")
        assert members["members"] == ["127.0.0.1:6270", "127.0.0.2:6270"]
        leaders = {fleet.members(sid)["leader"] for sid in CONN}
        assert len(leaders) == 1 and None not in leaders, f"one cluster, one leader: {leaders}"

        for sid in CONN:  # routes advertised as a union: the operator's route is kept
            routes = get_state(fleet.socks[sid])["prefs"]["AdvertiseRoutes"]
            assert routes == ["192.168.50.0/24", "100.64.1.0/24"], routes

        a = _query("127.0.0.1", 5353)
        assert a.startswith("100.64.1.")
        assert _query("127.0.0.2", 5353) == a, "the other connector answers the same replicated mapping"
        res = _cli("pool", "lookup", "nClient", "github.com", "--config", str(fleet.tmp / "nConnB.toml"))
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
        codes = fleet.stop()
    logs = {sid: fleet.log(sid) for sid in fleet.procs}
    assert codes == {"nConnA": 0, "nConnB": 0}, {sid: text[-2000:] for sid, text in logs.items()}
    assert "waiting for nConnA" in logs["nConnB"], "B (started first) waited for the lowest StableID"
    assert "bootstrap" in logs["nConnA"] and "join" in logs["nConnB"], "A bootstrapped, B joined"


CONN3 = {**CONN, "nConnC": "127.0.0.4"}


@pytest.mark.root
@pytest.mark.cluster
def test_a_connector_tagged_later_joins_and_cluster_remove_stops_a_member(netns: str, tmp_path: Path) -> None:
    fleet = _Fleet(tmp_path)
    try:
        for sid, ip in CONN.items():  # C is not in the tailnet yet
            fleet.standin(sid, ip, CONN)
        for sid in CONN:
            fleet.start(sid)
        for sid in CONN:
            wait_until(lambda sid=sid: fleet.ready(sid), 60, f"{sid} ready")
        a = _query("127.0.0.1", 5353)
        assert _query("127.0.0.2", 5353) == a

        # C is tagged and appears in every netmap; its connector starts and asks to join
        for sid in CONN:  # (the prefs kept as they are: the routes the connectors advertised stay)
            set_state(fleet.socks[sid], {**get_state(fleet.socks[sid]), "peers": _state(sid, CONN3)["peers"]})
        fleet.standin("nConnC", CONN3["nConnC"], CONN3)
        fleet.start("nConnC")
        wait_until(lambda: fleet.ready("nConnC"), 60, "the tagged-later connector C ready (added by the leader)")
        everyone = ["127.0.0.1:6270", "127.0.0.2:6270", "127.0.0.4:6270"]
        for sid in CONN3:
            wait_until(lambda sid=sid: fleet.members(sid)["members"] == everyone, 20, f"{sid} lists three members")
        assert _query("127.0.0.4", 5353) == a, "C's replica converged: the same answer as A and B"
        leader = fleet.members("nConnC")["leader"]
        leader_sid = next(sid for sid, ip in CONN3.items() if f"{ip}:6270" == leader)
        assert any("adding 127.0.0.4:6270" in fleet.log(sid) for sid in CONN), "a leader added C"
        assert "cluster: join" in fleet.log("nConnC")

        # remove a member that is not the leader, asking a third member (the request goes to the leader)
        target = next(sid for sid in ("nConnC", "nConnB", "nConnA") if f"{CONN3[sid]}:6270" != leader)
        asker = next(sid for sid in CONN3 if sid not in (target, leader_sid))
        addr = f"{CONN3[target]}:6270"
        res = _cli("cluster", "remove", addr, "--config", str(fleet.tmp / f"{asker}.toml"))
        assert res.returncode == 0, res.stdout + res.stderr
        rest = sorted(f"{CONN3[sid]}:6270" for sid in CONN3 if sid != target)
        for sid in CONN3:
            if sid != target:
                wait_until(lambda sid=sid: fleet.members(sid)["members"] == rest, 20, f"{sid} lists two members")
        wait_until(lambda: "stopping DNS answers" in fleet.log(target), 20, "the removed member to say why")
        said = next(line for line in fleet.log(target).splitlines() if "stopping DNS answers" in line)
        assert f"removed from the cluster by the leader {leader}" in said, said
        assert _ask(CONN3[target], 5353)[0] == 5, "the removed member answers REFUSED (rcode 5)"
        assert not fleet.ready(target), "the removed member reports unready"
        own = _cli("cluster", "members", "--http", f"{CONN3[target]}:8893").stdout
        assert f"{addr}  (self, removed)" in own, own
        wait_until(lambda: "100.64.1.0/24" not in (get_state(fleet.socks[target])["prefs"]["AdvertiseRoutes"] or []),
              10, "the removed member to withdraw the pool route")
        assert get_state(fleet.socks[target])["prefs"]["AdvertiseRoutes"] == ["192.168.50.0/24"]
        for sid in CONN3:  # the others keep serving the same mapping
            if sid != target:
                assert _query(CONN3[sid], 5353) == a
                assert fleet.ready(sid)
        # the leader sees the removed member online and tagged, asks it, and leaves it out
        skipped = f"not adding tagged node {addr}"

        def skipped_as_removed() -> bool:
            return any(skipped in ln and "it was removed with `cluster remove`" in ln
                       for sid in CONN3 if sid != target for ln in fleet.log(sid).splitlines())
        wait_until(skipped_as_removed, 20, "the leader to skip the removed member, saying why")
        assert all(fleet.members(sid)["members"] == rest for sid in CONN3 if sid != target)

        # a restart with its state keeps it out (membership.json says removed) ...
        assert fleet.stop_one(target) == 0
        fleet.start(target)
        wait_until(lambda: "stopping DNS answers" in fleet.log(target), 30, "the restarted removed member to say why")
        assert "membership.json" in fleet.log(target)
        assert _ask(CONN3[target], 5353)[0] == 5 and not fleet.ready(target)
        # ... and with its state directory emptied it joins again as a new member
        assert fleet.stop_one(target) == 0
        shutil.rmtree(tmp_path / target)
        fleet.start(target)
        wait_until(lambda: fleet.ready(target), 60, "the emptied member to join again")
        for sid in CONN3:
            wait_until(lambda sid=sid: fleet.members(sid)["members"] == everyone, 20,
                       f"{sid} lists three members again")
        assert _query(CONN3[target], 5353) == a
    finally:
        codes = fleet.stop()
    assert set(codes.values()) == {0}, {sid: fleet.log(sid)[-2000:] for sid in codes}


@pytest.mark.root
def test_a_connector_without_cluster_tag_does_not_run_a_pickle_sent_to_its_raft_port(netns: str,
                                                                                      tmp_path: Path) -> None:
    """Issue 9.1: tailscale mode without cluster.tag listens on the tailnet address (here 127.0.0.1), which
    Tailscale's default policy lets every node reach; before, its pysyncobj had no password."""
    fleet = _Fleet(tmp_path)
    marker = tmp_path / "pwned"
    try:
        fleet.standin("nConnA", "127.0.0.1", {"nConnA": "127.0.0.1"})
        fleet.start("nConnA", clustered=False)
        wait_until(lambda: fleet.ready("nConnA"), 90, "the connector to be ready")
        res = _in_ns(sys.executable, "-m", "tests.ops.raft_probe", "attack", "127.0.0.1:6270", str(marker))
        assert res.stdout.strip() == "closed", res.stdout + res.stderr
        assert not marker.exists(), "the pickle sent to the Raft port ran a shell command"
        assert _query("127.0.0.1", 5353).startswith("100.64.1."), "the connector still answers"
    finally:
        codes = fleet.stop()
    assert codes == {"nConnA": 0}, fleet.log("nConnA")[-2000:]
