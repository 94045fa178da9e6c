"""Whole connectors (``appconnector run --config``) as cluster members for the fault harness.

Each connector runs standalone (the client IP is the node) with its own DNS port, Raft port, status
HTTP port, state directory and group id (for the nemesis), NAT off (three connectors on one host would
share one kernel table). Clients ask real DNS questions from loopback source addresses; the final state
of each connector is read from its admin HTTP (``/pool``, with the admin token from its state directory).

:class:`ConnectorMember` has the interface the runner and nemesis use for ``cluster.Member``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.faults.cluster import MemberGroup, terminate
from tests.faults.dnsclient import DnsTarget
from tests.faults.history import RESOLVE
from tests.faults.nemesis import Endpoint, preexec_for
from tests.faults.netns import Topology, entered, sh
from tests.faults.workload import Unavailable

REPO = Path(__file__).resolve().parents[2]
PROBE_NODE = "127.0.0.99"


def appconnector_command() -> list[str]:
    exe = Path(sys.executable).parent / "appconnector"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from appconnector.cli import main; main()"]


class ConnectorMember:
    kind = RESOLVE

    def __init__(self, name: str, base: Path, raft_port: int, dns_port: int, http_port: int, gid: int,
                 peers: Sequence[str], prefixes: Sequence[str], reuse_after: float, secret: Path,
                 env: dict[str, str] | None = None, *, host: str = "127.0.0.1", netns: str | None = None,
                 client_netns: str | None = None, upstream: str | None = None, nat: bool = False,
                 interface: str = "eth0", admin_port: int = 8894) -> None:
        self.name = name
        self.raft_port = raft_port
        self.dns_port = dns_port
        self.http_port = http_port
        self.admin_port = admin_port
        self.gid = gid
        self.state_dir = base / f"acfault-{name}"
        self.config_path = base / f"acfault-{name}.toml"
        self.log_path = base / f"acfault-{name}.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.netns = netns
        self.host = host
        self.dns = DnsTarget(name, host, dns_port, netns=client_netns)
        peer_list = ", ".join(f'"{p}"' for p in peers)
        prefix_list = ", ".join(f'"{p}"' for p in prefixes)
        upstream_line = f'upstream = ["{upstream}"]\nverify_upstream = true' if upstream else "verify_upstream = false"
        self.config_path.write_text(f"""[tailnet]
mode = "standalone"
interface = "{interface}"
[dns]
listen = ["{host}:{dns_port}"]
{upstream_line}
[pool]
prefixes = [{prefix_list}]
reuse_after = "{reuse_after:g}s"
[cluster]
state_dir = "{self.state_dir}"
self = "{host}:{raft_port}"
peers = [{peer_list}]
secret_file = "{secret}"
[nat]
enabled = {"true" if nat else "false"}
[http]
listen = "127.0.0.1:{http_port}"
admin_listen = "127.0.0.1:{admin_port}"
""")

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.gid, self.raft_port)

    # ---- lifecycle (the runner's and nemesis's interface) -------------------------------------------

    def start(self) -> None:
        assert not self.running()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env.update(self.env)
        with self.log_path.open("ab") as log:
            log.write(f"---- start {time.time():.3f}\n".encode())
            log.flush()
            argv = [*appconnector_command(), "run", "--config", str(self.config_path)]
            if self.netns:  # ip netns exec execs the connector: same pid, so signals reach it
                argv = ["ip", "netns", "exec", self.netns, *argv]
            self.proc = subprocess.Popen(argv,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=REPO,
                                         preexec_fn=preexec_for(self.gid))
        self.paused = False

    def wait_ready(self, timeout: float = 40.0) -> None:
        """Wait until the status HTTP answers /healthz and DNS is bound."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"{self.name} exited ({self.proc and self.proc.returncode}):\n"
                                     f"{self.log_text()[-3000:]}")
            try:
                if self._get("/healthz", 1.0)[0] == 200:
                    return
            except Unavailable:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {timeout}s:\n{self.log_text()[-3000:]}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        if self.proc is not None and self.running():
            if self.paused:
                self.resume()
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.running():
            if self.paused:
                self.resume()
            terminate(self.proc, timeout)
        return self.proc.returncode

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ---- HTTP ---------------------------------------------------------------------------------------

    def _get(self, path: str, timeout: float, admin: bool = False) -> tuple[int, Any]:
        """GET from the read-only listener, or the admin one (with the token the connector made)."""
        url = f"http://127.0.0.1:{self.admin_port if admin else self.http_port}{path}"
        try:
            token = (self.state_dir / "admin.token").read_text().strip() if admin else ""
            headers = {"Authorization": f"Bearer {token}"} if admin else {}
            with entered(self.netns):  # the status HTTP listens on the connector's own loopback
                resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
            with resp as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body
        except (OSError, ValueError) as e:
            raise Unavailable(f"{self.name} http {path}: {e}") from None

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        code, doc = self._get("/status", timeout)
        if not isinstance(doc, dict):
            raise Unavailable(f"{self.name} /status {code}")
        raft = dict(doc.get("raft") or {})
        raft["leader_self"] = raft.get("role") == "leader"
        raft["ready"] = doc.get("ready")
        return raft

    def metrics(self, timeout: float = 2.0) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        try:
            with entered(self.netns):
                resp = urllib.request.urlopen(url, timeout=timeout)
            with resp as r:
                return str(r.read().decode())
        except OSError as e:
            raise Unavailable(f"{self.name} /metrics: {e}") from None

    def state(self, timeout: float = 5.0) -> tuple[str, list[tuple[str, str, int]]]:
        """(a digest of every mapping with its last-used time, the mappings)."""
        code, doc = self._get("/pool?limit=10000000", timeout, admin=True)
        if code != 200 or not isinstance(doc, dict):
            raise Unavailable(f"{self.name} /pool {code}")
        rows = sorted((r["node"], r["domain"], r["address"], r["last_used"]) for r in doc["mappings"])
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        return digest, [(n, d, int(ipaddress.IPv4Address(a))) for n, d, a, _ in rows]

    # ---- Target --------------------------------------------------------------------------------------

    def checkout(self, node: str, domain: str, timeout: float) -> int:
        return self.dns.checkout(node, domain, timeout)

    def lookup(self, node: str, domain: str, timeout: float) -> int | None:
        code, doc = self._get(f"/pool/lookup?node={node}&domain={domain}", timeout, admin=True)
        if code == 404:
            return None
        if code != 200 or not isinstance(doc, dict):
            raise Unavailable(f"{self.name} /pool/lookup {code}")
        return int(ipaddress.IPv4Address(doc["address"]))

    def domain_for(self, node: str, address: int, timeout: float) -> str | None:
        raise NotImplementedError

    def touch(self, node: str, address: int, domain: str, at: float, timeout: float) -> bool:
        raise NotImplementedError


class ConnectorCluster(MemberGroup[ConnectorMember]):
    """Same shape as ``cluster.Cluster`` for the runner: members, live(), leader(), wait_converged()."""

    probe_node = PROBE_NODE

    def __init__(self, base: Path, port_base: int, size: int = 3, prefixes: Sequence[str] = ("100.64.1.0/24",),
                 reuse_after: float = 48 * 3600.0, gid_base: int | None = None,
                 topology: Topology | None = None) -> None:
        """On loopback, or with ``topology`` one namespace per connector with NAT on and the topology's
        upstream resolver (same ports in every namespace)."""
        base.mkdir(parents=True, exist_ok=True)
        secret = base / "acfault-secret"
        secret.write_text("acfault-connector-secret\n")
        secret.chmod(0o600)  # run refuses a secret others can read
        self.topology = topology
        if topology is not None:
            self.probe_node = topology.clients(5)[-1]
        names = [f"c{i + 1}" for i in range(size)]
        if topology is None:
            hosts = {n: "127.0.0.1" for n in names}
            raft = {n: port_base + i for i, n in enumerate(names)}
        else:
            hosts = {n: topology.address(n) for n in names}
            raft = {n: port_base for n in names}
        gid_base = gid_base or port_base
        self.members = {}
        for i, n in enumerate(names):
            peers = [f"{hosts[o]}:{raft[o]}" for o in names if o != n]
            dns_port, http_port, admin_port = ((port_base + 20 + i, port_base + 40 + i, port_base + 60 + i)
                                               if topology is None else (53, 8893, 8894))
            ns_opts: dict[str, object] = {} if topology is None else {
                "host": hosts[n], "netns": topology.ns(n), "client_netns": topology.ns("cl"),
                "upstream": f"{topology.upstream}:53", "nat": True}
            self.members[n] = ConnectorMember(n, base, raft[n], dns_port, http_port, gid_base + i, peers, prefixes,
                                              reuse_after, secret, admin_port=admin_port,
                                              **ns_opts)  # type: ignore[arg-type]

    def endpoints(self) -> list[Endpoint]:
        return [m.endpoint for m in self.members.values()]

    def start(self) -> None:
        for m in self.members.values():
            m.start()
        for m in self.members.values():
            m.wait_ready()


def steer_map(m: ConnectorMember) -> dict[tuple[int, int], int]:
    """The kernel steer map of a namespaced connector: (node IP, pool address) → real address."""
    assert m.netns is not None
    out = sh("ip", "netns", "exec", m.netns, "nft", "-j", "list", "map", "inet", "appconnector", "steer").stdout
    doc = json.loads(out)
    elements: dict[tuple[int, int], int] = {}
    for obj in doc.get("nftables", []):
        for elem in (obj.get("map") or {}).get("elem", []):
            key, value = elem
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            a, b = key["concat"]
            elements[(int(ipaddress.IPv4Address(a)), int(ipaddress.IPv4Address(b)))] = int(ipaddress.IPv4Address(value))
    return elements
