"""A real tailnet in network namespaces: a headscale control plane, real tailscaled on every node,
connectors running ``appconnector run`` in tailscale mode, clients, and an origin behind the connectors.

    underlay 10.79.0.0/24 (bridge ``br0`` in ``<prefix>-hub``): headscale .2 (HTTP :8080, embedded DERP
             + STUN :3478), connectors .11…, clients .31…; tailscaled nodes reach each other directly here
    uplink   198.51.100.0/24 (bridge ``br1``): connectors .11…, origin .10, upstream DNS .53; every
             address of 198.18.0.0/16 is local to the origin (AnyIP), routed there by the connectors
    tailnet  node addresses 100.64.3.0/24 (headscale ``prefixes.v4``), pool 100.64.1.0/24 (its first
             address is the connectors' DNS, split DNS for ``app.test`` points at it)

Only namespace addresses are used; every namespace name carries the pid (``acrn-<pid>-…``), so parallel
runs do not collide. Each process runs in a session of its own and is stopped with ``os.killpg``.
Waits are on conditions with deadlines (``wait_for``), never fixed sleeps.

Usage (see conftest.py): ``net = Tailnet(tmp).start()``; ``c = net.connector("c1")``;
``cl = net.client("cl1")``; ``net.wait_online()``; ``c.start_appconnector()``; ``net.stop()``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode

from tests.faults.netns import entered
from tests.faults.upstream import Upstream, targets_of
from tests.nat.netns import wait_for as wait_for  # re-exported: the tier waits with this one
from tests.realnet import peers

REPO = Path(__file__).resolve().parents[2]
UNDERLAY = "10.79.0"
UPLINK = "198.51.100"
HS_IP = f"{UNDERLAY}.2"
HS_URL = f"http://{HS_IP}:8080"
ORIGIN_IP = f"{UPLINK}.10"
UPSTREAM_DNS = f"{UPLINK}.53"
ORIGIN_NET = "198.18.0.0/16"
NODE_PREFIX = "100.64.3.0/24"
POOL = "100.64.1.0/24"
POOL_DNS = str(ipaddress.ip_network(POOL).network_address)   # the product's default dns.listen
APP_DOMAIN = "app.test"
BASE_DOMAIN = "tn.test"
TAG = "tag:appconnector"
MAGICDNS = "100.100.100.100"
RAFT_PORT = 6270
HTTP_PORT = 8080   # tests/nat/origin.py
UDP_PORT = 7007
SECRET = "realnet-cluster-secret"
# names the origin serves (the upstream answers each with two addresses of its own, see tests/faults/upstream.py)
SERVED = ["web.app.test", "other.app.test", "after.app.test", "later.app.test"]
OTHER_ROUTE = "192.0.2.0/24"   # a route an operator advertised on c3 of the shared tailnet before the product

MEASURED: list[str] = []  # times the tier measured, printed at the end of the run (conftest.py)


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: rc {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def served_addresses(names: list[str]) -> list[str]:
    """The origin addresses the upstream gives for ``names`` (the origin serves on them)."""
    return sorted({a for n in names for a in targets_of(n)})


def appconnector_argv() -> list[str]:
    exe = Path(sys.executable).parent / "appconnector"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "appconnector.cli"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra or {})
    return env


class Proc:
    """A process in a session of its own (stopped with ``os.killpg``), output to a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log
        with log.open("ab") as f:
            f.write(f"---- start {time.time():.3f} {' '.join(argv)}\n".encode())
            f.flush()
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env or child_env(),
                                          cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """kill -9 of the whole process group."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM to the group, SIGKILL if it lingers; the exit code."""
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode


def _stop_together(procs: Sequence[Proc | None], timeout: float) -> None:
    """SIGTERM to every running group at once, then wait for each (SIGKILL for one that lingers)."""
    running = [p for p in procs if p is not None and p.running()]
    for p in running:
        p.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in running:
        p.stop(max(0.1, deadline - time.monotonic()))


class Node:
    """One namespace with a real tailscaled (CLI through its own socket)."""

    def __init__(self, net: Tailnet, name: str, underlay: str, *, tags: tuple[str, ...] = (), user: str = "",
                 accept_dns: bool = False, accept_routes: bool = False, uplink: str | None = None,
                 advertise: Sequence[str] = ()) -> None:
        self.net = net
        self.name = name
        self.ns = net.ns(name)
        self.underlay = underlay
        self.uplink = uplink
        self.tags = tags
        self.user = user
        self.accept_dns = accept_dns
        self.accept_routes = accept_routes
        self.advertise = list(advertise)
        self.dir = net.base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "tailscaled.sock")
        self.tailscaled: Proc | None = None
        self.appconnector: Proc | None = None

    # ---- namespace ----------------------------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check, timeout=timeout)

    def resolv_conf(self) -> str:
        return (Path("/etc/netns") / self.ns / "resolv.conf").read_text()

    def sockets(self) -> contextlib.AbstractContextManager[None]:
        """``with node.sockets(): socket.socket(...)``: sockets opened in the block live in this namespace."""
        return entered(self.ns)

    # ---- tailscaled ---------------------------------------------------------------------------------

    def start_tailscaled(self) -> None:
        env = child_env({"TS_DEBUG_USE_DERP_HTTP": "1", "TS_DISABLE_PORTMAPPER": "1",
                         "TS_LOGS_DIR": str(self.dir / "logs"), "TS_DEBUG_FIREWALL_MODE": "nftables"})
        self.tailscaled = Proc(f"{self.name}-tailscaled", [
            "ip", "netns", "exec", self.ns, str(peers.tailscaled()), f"--statedir={self.dir / 'state'}",
            f"--socket={self.socket}", "--no-logs-no-support", "--tun=tailscale0", "--port=41641"],
            self.dir / "tailscaled.log", env)
        wait_for(lambda: self.cli_ok("status", "--json") or not self._alive("tailscaled"), 30,
                 f"{self.name}: tailscaled's LocalAPI")
        self._alive("tailscaled", fail=True)

    def _alive(self, which: str, fail: bool = False) -> bool:
        p: Proc | None = getattr(self, which)
        ok = p is not None and p.running()
        if fail and not ok:
            raise AssertionError(f"{self.name}: {which} exited: {p.log() if p else ''}")
        return ok

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(str(peers.tailscale()), f"--socket={self.socket}", *args, check=check, timeout=timeout)

    def cli_ok(self, *args: str) -> bool:
        return self.cli(*args, check=False, timeout=10).returncode == 0

    def up(self, authkey: str) -> None:
        args = [f"--login-server={HS_URL}", f"--authkey={authkey}", f"--hostname={self.name}",
                f"--accept-dns={'true' if self.accept_dns else 'false'}",
                f"--accept-routes={'true' if self.accept_routes else 'false'}", "--timeout=60s"]
        # a tagged node's tags come with its auth key (headscale refuses --advertise-tags beside one)
        if self.advertise:
            args.append(f"--advertise-routes={','.join(self.advertise)}")
        if self.uplink:  # a connector: the product masquerades what it steers, tailscaled must not SNAT
            args.append("--snat-subnet-routes=false")
        self.cli("up", *args, timeout=90)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.cli("status", "--json", timeout=15).stdout))

    def stable_id(self) -> str:
        return str(self.status()["Self"]["ID"])

    def ip4(self) -> str:
        return str(next(a for a in self.status()["Self"]["TailscaleIPs"] if ":" not in a))

    def online_peers(self) -> set[str]:
        """Host names of the peers this node sees online."""
        try:
            st = self.status()
        except (RuntimeError, subprocess.TimeoutExpired, ValueError):
            return set()
        return {p["HostName"] for p in (st.get("Peer") or {}).values() if p.get("Online")}

    def kill_tailscaled(self) -> None:
        assert self.tailscaled is not None
        self.tailscaled.kill()

    def stop(self) -> None:
        """A planned stop of the host: the connector (SIGTERM), then tailscaled."""
        for p in (self.appconnector, self.tailscaled):
            if p is not None:
                p.stop(15)

    def kill_all(self) -> None:
        """kill -9 of every process of this node (tailscaled and the connector): the host dies."""
        for p in (self.appconnector, self.tailscaled):
            if p is not None:
                p.kill()

    # ---- appconnector -------------------------------------------------------------------------------

    def write_config(self, *, cluster_tag: str = TAG, extra: str = "", upstream: list[str] | None = None,
                     name: str = "appconnector.toml", secret: bool = True) -> Path:
        up = [f"{UPSTREAM_DNS}:53"] if upstream is None else upstream
        cfg = self.dir / name
        cfg.write_text(f"""[tailnet]
mode = "tailscale"
localapi_socket = "{self.socket}"
interface = "tailscale0"
[dns]
upstream = [{", ".join(f'"{u}"' for u in up)}]
[pool]
prefixes = ["{POOL}"]
[cluster]
state_dir = "{self.dir / 'appconnector-state'}"
tag = "{cluster_tag}"
secret_file = "{self.net.secret if secret else ''}"
[nat]
enabled = true
[http]
listen = "127.0.0.1:8893"
admin_listen = "127.0.0.1:8894"
{extra}""")
        return cfg

    def start_appconnector(self, config: Path | None = None, wait: bool = True) -> Proc:
        cfg = config or self.write_config()
        self.appconnector = Proc(f"{self.name}-appconnector",
                                 ["ip", "netns", "exec", self.ns, *appconnector_argv(), "run", "--config", str(cfg)],
                                 self.dir / "appconnector.log")
        if wait:
            self.wait_connector_ready()
        return self.appconnector

    def http_get(self, path: str, timeout: float = 3.0, admin: bool = False) -> tuple[int, Any]:
        """GET the connector's read-only HTTP on its own loopback, or (``admin``) its admin listener
        with the token the connector made in its state directory."""
        import urllib.error
        import urllib.request
        headers = {}
        if admin:
            token = (self.dir / "appconnector-state" / "admin.token").read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        try:
            with self.sockets():
                req = urllib.request.Request(f"http://127.0.0.1:{8894 if admin else 8893}{path}", headers=headers)
                resp = urllib.request.urlopen(req, timeout=timeout)
            with resp as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except (OSError, ValueError):
            return 0, None

    def wait_connector_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            self._alive("appconnector", fail=True)
            return self.http_get("/readyz")[0] == 200
        wait_for(ready, timeout, lambda: f"{self.name}: appconnector ready: "
                 f"{self.appconnector.log() if self.appconnector else ''}")

    def connector_log(self) -> str:
        return self.appconnector.log(100_000) if self.appconnector else ""

    # ---- client side --------------------------------------------------------------------------------

    def resolve(self, name: str, server: str = MAGICDNS, timeout: float = 5.0) -> tuple[int, list[str]]:
        """(rcode, A addresses) of a real DNS query sent from this namespace."""
        return resolve_in(self.ns, name, server, timeout)

    def pool_address(self, name: str, timeout: float = 30) -> str:
        """Resolve ``name`` through MagicDNS until it answers (the route and split DNS settle first)."""
        last: list[object] = []

        def ask() -> str | None:
            try:
                rc, addrs = self.resolve(name, timeout=3)
            except (dns.exception.Timeout, OSError) as e:
                last[:] = [type(e).__name__]
                return None
            last[:] = [dns.rcode.to_text(dns.rcode.Rcode(rc)), addrs]
            return addrs[0] if rc == dns.rcode.NOERROR and addrs else None
        return str(wait_for(ask, timeout, lambda: f"{self.name}: {name} through MagicDNS (last: {last})"))

    def http(self, address: str, timeout: float = 5.0) -> str:
        """GET / from the origin at ``address`` (its body says which origin address answered whom)."""
        with self.sockets():
            s = socket.create_connection((address, HTTP_PORT), timeout=timeout)
        with s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.decode(errors="replace").split("\r\n\r\n", 1)[-1]

    def udp(self, address: str, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
        with self.sockets():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.settimeout(timeout)
            s.sendto(payload, (address, UDP_PORT))
            return s.recv(2048)

    def ping(self, address: str, timeout: float = 3.0) -> bool:
        """One ICMP echo from this namespace (a raw socket: no ping binary needed); True on its reply."""
        ident, seq = os.getpid() & 0xFFFF, int(time.monotonic() * 1000) & 0xFFFF
        payload = b"realnet-ping"
        with self.sockets():
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with s:
            s.settimeout(timeout)
            s.sendto(_icmp_echo(ident, seq, payload), (address, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    packet, (src, _) = s.recvfrom(2048)
                except TimeoutError:
                    return False
                icmp = packet[(packet[0] & 0x0F) * 4:]
                if src == address and icmp[0] == 0 and icmp[4:8] == struct.pack("!HH", ident, seq):
                    return True
        return False

    def tcp_connects(self, address: str, port: int, timeout: float = 3.0) -> bool:
        with self.sockets():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(timeout)
            try:
                s.connect((address, port))
            except OSError:
                return False
            return True


def resolve_in(ns: str, name: str, server: str, timeout: float = 5.0) -> tuple[int, list[str]]:
    """(rcode, A addresses) of a real DNS query over UDP from namespace ``ns``."""
    q = dns.message.make_query(name, "A")
    with entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.setblocking(False)  # dnspython waits with select
        r = dns.query.udp(q, server, timeout=timeout, sock=sock)
    return int(r.rcode()), [rr.address for rrset in r.answer for rr in rrset if rrset.rdtype == 1]


def _icmp_echo(ident: int, seq: int, payload: bytes) -> bytes:
    def checksum(b: bytes) -> int:
        b += b"\0" * (len(b) % 2)
        total: int = sum(struct.unpack(f"!{len(b) // 2}H", b))
        total = (total >> 16) + (total & 0xFFFF)
        total += total >> 16
        return ~total & 0xFFFF
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    return struct.pack("!BBHHH", 8, 0, checksum(head + payload), ident, seq) + payload


class Tailnet:
    def __init__(self, base: Path, tag: str = "") -> None:
        self.prefix = f"acrn-{os.getpid() % 100000}{'-' + tag if tag else ''}"
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.secret = base / "cluster-secret"
        self.secret.write_text(SECRET + "\n")
        self.secret.chmod(0o600)  # run refuses a secret file others can read
        self.nodes: dict[str, Node] = {}
        self.procs: list[Proc] = []
        self.upstream: Upstream | None = None
        self.headscale: Proc | None = None
        self.hs_dir = base / "headscale"
        self.policy_path = self.hs_dir / "policy.json"
        self.users: dict[str, int] = {}
        self._ports = 0

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    # ---- namespaces ---------------------------------------------------------------------------------

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        # its own resolv.conf: `ip netns exec` binds it over /etc/resolv.conf, and a tailscaled with
        # --accept-dns=true rewrites it (never the host's)
        (etc / "resolv.conf").write_text(f"nameserver {UPSTREAM_DNS}\n")
        return name

    def _plug(self, role: str, ifname: str, bridge: str, address: str) -> None:
        self._ports += 1
        port = f"p{self._ports}"
        sh("ip", "-n", self.ns(role), "link", "add", ifname, "type", "veth", "peer", "name", port,
           "netns", self.ns("hub"))
        sh("ip", "-n", self.ns("hub"), "link", "set", port, "master", bridge, "up")
        sh("ip", "-n", self.ns(role), "addr", "add", f"{address}/24", "dev", ifname)
        sh("ip", "-n", self.ns(role), "link", "set", ifname, "up")

    def start(self) -> Tailnet:
        self.destroy_namespaces()
        self._add_ns("hub")
        for br in ("br0", "br1"):
            sh("ip", "-n", self.ns("hub"), "link", "add", br, "type", "bridge")
            sh("ip", "-n", self.ns("hub"), "link", "set", br, "up")
        self._add_ns("hs")
        self._plug("hs", "eth0", "br0", HS_IP)
        self._add_ns("origin")
        self._plug("origin", "eth0", "br1", ORIGIN_IP)
        sh("ip", "-n", self.ns("origin"), "addr", "add", f"{UPSTREAM_DNS}/24", "dev", "eth0")
        sh("ip", "-n", self.ns("origin"), "route", "add", "local", ORIGIN_NET, "dev", "lo")
        self.upstream = Upstream(UPSTREAM_DNS, 53, netns=self.ns("origin"))
        self.start_headscale()
        return self

    def serve_origin(self, names: list[str]) -> None:
        """Real TCP (HTTP) and UDP echo servers on the origin addresses of ``names``; ICMP is the kernel's."""
        p = Proc("origin", ["ip", "netns", "exec", self.ns("origin"), sys.executable,
                            str(REPO / "tests" / "nat" / "origin.py"), *served_addresses(names)],
                 self.base / f"origin-{len(self.procs)}.log")
        self.procs.append(p)
        wait_for(lambda: "ready" in p.log() or not p.running(), 20, "origin servers")
        assert p.running(), p.log()

    # ---- headscale ----------------------------------------------------------------------------------

    def policy(self, grants: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The tailnet policy: connectors own ``tag:appconnector``, everyone reaches everyone, the pool
        routes are auto-approved for the tag; ``grants`` are added as given."""
        doc: dict[str, Any] = {
            "tagOwners": {TAG: ["ops@"]},
            "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
            "autoApprovers": {"routes": {POOL: [TAG]}},
        }
        if grants:
            doc["grants"] = grants
        return doc

    def set_policy(self, doc: dict[str, Any], reload: bool = True) -> None:
        """Write the policy file; with ``reload`` SIGHUP headscale, which re-reads it."""
        self.policy_path.write_text(json.dumps(doc, indent=1))
        if reload and self.headscale is not None:
            self.headscale.signal(signal.SIGHUP)

    def start_headscale(self) -> None:
        d = self.hs_dir
        d.mkdir(parents=True, exist_ok=True)
        self.set_policy(self.policy(), reload=False)
        cfg = {
            "server_url": HS_URL,
            "listen_addr": f"{HS_IP}:8080",
            "metrics_listen_addr": "127.0.0.1:9090",
            "grpc_listen_addr": "127.0.0.1:50443",
            "grpc_allow_insecure": False,
            "noise": {"private_key_path": str(d / "noise_private.key")},
            "prefixes": {"v4": NODE_PREFIX, "v6": "fd7a:115c:a1e0::/48", "allocation": "sequential"},
            "derp": {"server": {"enabled": True, "region_id": 999, "region_code": "realnet",
                                "region_name": "realnet embedded DERP", "verify_clients": True,
                                "stun_listen_addr": f"{HS_IP}:3478",
                                "private_key_path": str(d / "derp_server_private.key"),
                                "automatically_add_embedded_derp_region": True, "ipv4": HS_IP},
                     "urls": [], "paths": [], "auto_update_enabled": False},
            "disable_check_updates": True,
            "database": {"type": "sqlite", "sqlite": {"path": str(d / "db.sqlite"), "write_ahead_log": True}},
            "log": {"level": "info", "format": "text"},
            "policy": {"mode": "file", "path": str(self.policy_path)},
            "dns": {"magic_dns": True, "base_domain": BASE_DOMAIN, "override_local_dns": False,
                    "nameservers": {"global": [], "split": {APP_DOMAIN: [POOL_DNS]}}},
            "unix_socket": str(d / "headscale.sock"),
            "unix_socket_permission": "0770",
            "logtail": {"enabled": False},
        }
        self.hs_config = d / "config.yaml"
        self.hs_config.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        self.headscale = Proc("headscale", ["ip", "netns", "exec", self.ns("hs"), str(peers.headscale()),
                                            "-c", str(self.hs_config), "serve"], d / "headscale.log")
        self.procs.append(self.headscale)

        def up() -> bool:
            assert self.headscale is not None
            assert self.headscale.running(), f"headscale exited: {self.headscale.log()}"
            return self.hs("users", "list", "-o", "json", check=False).returncode == 0
        wait_for(up, 30, lambda: f"headscale: {self.headscale.log() if self.headscale else ''}")
        for user in ("ops", "alice", "bob"):
            out = json.loads(self.hs("users", "create", user, "-o", "json").stdout)
            self.users[user] = int(out["id"])

    def hs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The headscale CLI (over its unix socket)."""
        return sh(str(peers.headscale()), "-c", str(self.hs_config), *args, check=check, timeout=30)

    def authkey(self, node: Node) -> str:
        args = ["--tags", ",".join(node.tags)] if node.tags else ["--user", str(self.users[node.user or "alice"])]
        out = json.loads(self.hs("preauthkeys", "create", "--reusable", "--expiration", "1h", *args,
                                 "-o", "json").stdout)
        return str(out["key"])

    def hs_nodes(self) -> list[dict[str, Any]]:
        return list(json.loads(self.hs("nodes", "list", "-o", "json").stdout) or [])

    def approve_routes(self, node: Node, routes: Sequence[str]) -> None:
        """Approve ``routes`` for ``node`` by hand (what an admin does where autoApprovers do not apply)."""
        hs_id = next(n["id"] for n in self.hs_nodes() if n["given_name"] == node.name)
        self.hs("nodes", "approve-routes", "--identifier", str(hs_id), "--routes", ",".join(routes))

    # ---- nodes --------------------------------------------------------------------------------------

    def _node(self, name: str, underlay: str, **kw: Any) -> Node:
        self._add_ns(name)
        node = Node(self, name, underlay, **kw)
        self._plug(name, "eth0", "br0", underlay)
        if node.uplink:
            self._plug(name, "up0", "br1", node.uplink)
            sh("ip", "-n", node.ns, "route", "add", ORIGIN_NET, "via", ORIGIN_IP)
            node.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.nodes[name] = node
        node.start_tailscaled()
        node.up(self.authkey(node))
        return node

    def connector(self, name: str, *, tagged: bool = True, accept_dns: bool = False,
                  advertise: list[str] | None = None) -> Node:
        """A connector host: tailscaled (tagged, advertising nothing yet: the product adds the pool
        routes) and an uplink to the origin. ``start_appconnector()`` starts the product."""
        i = len([n for n in self.nodes.values() if n.uplink]) + 11
        return self._node(name, f"{UNDERLAY}.{i}", tags=(TAG,) if tagged else (), user="ops",
                          accept_dns=accept_dns, uplink=f"{UPLINK}.{i}", advertise=advertise or [])

    def client(self, name: str, user: str = "alice") -> Node:
        i = len([n for n in self.nodes.values() if not n.uplink]) + 31
        return self._node(name, f"{UNDERLAY}.{i}", user=user, accept_dns=True, accept_routes=True)

    def wait_online(self, timeout: float = 60) -> None:
        """Every node sees every other running node online."""
        names = {n.name for n in self.nodes.values() if n.tailscaled and n.tailscaled.running()}
        for n in self.nodes.values():
            if n.name in names:
                wait_for(lambda n=n: names - {n.name} <= n.online_peers(), timeout,
                         lambda n=n: f"{n.name} sees {sorted(names - {n.name})} online "
                         f"(sees {sorted(n.online_peers())})")

    def primary_route_node(self) -> str | None:
        """The host name headscale serves the pool route from (its primary), per the clients' view."""
        for n in self.nodes.values():
            if n.accept_routes and n.tailscaled and n.tailscaled.running():
                for p in (n.status().get("Peer") or {}).values():
                    if POOL in (p.get("PrimaryRoutes") or []):
                        return str(p["HostName"])
        return None

    # ---- teardown -----------------------------------------------------------------------------------

    def stop(self) -> None:
        # every connector at once, then every tailscaled, then the rest: the hosts' planned stops overlap
        # (one after another, each connector's stop waits for the route to move: ~20 s of the suite)
        _stop_together([n.appconnector for n in self.nodes.values()], 15)
        _stop_together([n.tailscaled for n in self.nodes.values()], 15)
        _stop_together(list(self.procs), 10)
        if self.upstream is not None:
            self.upstream.close()
        self.destroy_namespaces()

    def destroy_namespaces(self) -> None:
        for name in sorted(Path("/run/netns").glob(f"{self.prefix}-*")) if Path("/run/netns").exists() else []:
            sh("ip", "netns", "del", name.name, check=False)
        for etc in Path("/etc/netns").glob(f"{self.prefix}-*") if Path("/etc/netns").exists() else []:
            with contextlib.suppress(OSError):
                for f in etc.iterdir():
                    f.unlink()
                etc.rmdir()


@contextlib.contextmanager
def running(base: Path, tag: str = "") -> Iterator[Tailnet]:
    net = Tailnet(base, tag)
    try:
        yield net.start()
    finally:
        net.stop()
