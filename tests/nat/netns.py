"""Network namespaces for the NAT tests: clients ── tailnet bridge ── connectors ── uplink bridge ── origin.

Only addresses inside these namespaces are used:
  tailnet 100.101.0.0/24: clients .2 and .3, connectors .11 and .12 (interface ``tsnet0``)
  uplink 198.51.100.0/24: connectors .11 and .12, origin .10 with real service addresses .10 and .20
  and IPv6 on every link: tailnet fd7a:115c:a1e0::/64 (Tailscale's node range; clients ::2, ::3,
  connectors ::11, ::12), uplink 2001:db8:100::/64 (connectors ::11, ::12; origin ::10 and ::20)
The clients route the pool prefix via connector 1; :meth:`Topology.route_via` moves it.
Every name starts with ``acnat-`` and carries the pid, so parallel runs do not collide.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
POOL = "100.64.1.0/24"
TAILNET_IF = "tsnet0"
CLIENTS = {"cli1": "100.101.0.2", "cli2": "100.101.0.3"}
CONNECTORS = {"conn1": ("100.101.0.11", "198.51.100.11"), "conn2": ("100.101.0.12", "198.51.100.12")}
ORIGIN = "198.51.100.10"
ORIGIN_B = "198.51.100.20"
POOL6 = "fd7a:115c:a1e0:a99c:1::/80"
CLIENTS6 = {"cli1": "fd7a:115c:a1e0::2", "cli2": "fd7a:115c:a1e0::3"}
CONNECTORS6 = {"conn1": ("fd7a:115c:a1e0::11", "2001:db8:100::11"), "conn2": ("fd7a:115c:a1e0::12", "2001:db8:100::12")}
ORIGIN6 = "2001:db8:100::10"
ORIGIN6_B = "2001:db8:100::20"
HTTP_PORT = 8080
UDP_PORT = 7007


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=timeout)


class Topology:
    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid() % 100000)
        self.prefix = f"acnat-{tag}"
        self.procs: list[subprocess.Popen[str]] = []

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def all_ns(self) -> list[str]:
        return [self.ns(r) for r in ("tn", "up", "origin", *CLIENTS, *CONNECTORS)]

    def ip(self, role: str, *args: str) -> None:
        sh("ip", "-n", self.ns(role), *args)

    def run_in(self, role: str, *args: str, check: bool = True,
               timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns(role), *args, check=check, timeout=timeout)

    def _veth(self, a: str, a_if: str, bridge_ns: str, port: str) -> None:
        """veth ``a_if`` in namespace ``a`` ↔ ``port`` on br0 of ``bridge_ns``."""
        sh("ip", "-n", self.ns(a), "link", "add", a_if, "type", "veth", "peer", "name", port,
           "netns", self.ns(bridge_ns))
        self.ip(bridge_ns, "link", "set", port, "master", "br0", "up")
        self.ip(a, "link", "set", a_if, "up")

    def create(self) -> Topology:
        self.destroy()
        for name in self.all_ns():
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for b in ("tn", "up"):
            self.ip(b, "link", "add", "br0", "type", "bridge")
            self.ip(b, "link", "set", "br0", "up")
        for i, (c, addr) in enumerate(CLIENTS.items()):
            self._veth(c, "eth0", "tn", f"c{i}")
            self.ip(c, "addr", "add", f"{addr}/24", "dev", "eth0")
            self.ip(c, "addr", "add", f"{CLIENTS6[c]}/64", "dev", "eth0", "nodad")
        for i, (c, (tn_addr, up_addr)) in enumerate(CONNECTORS.items()):
            self._veth(c, TAILNET_IF, "tn", f"k{i}")
            self._veth(c, "up0", "up", f"k{i}")
            self.ip(c, "addr", "add", f"{tn_addr}/24", "dev", TAILNET_IF)
            self.ip(c, "addr", "add", f"{up_addr}/24", "dev", "up0")
            self.ip(c, "addr", "add", f"{CONNECTORS6[c][0]}/64", "dev", TAILNET_IF, "nodad")
            self.ip(c, "addr", "add", f"{CONNECTORS6[c][1]}/64", "dev", "up0", "nodad")
            self.run_in(c, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.run_in(c, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        self._veth("origin", "eth0", "up", "o0")
        self.ip("origin", "addr", "add", f"{ORIGIN}/24", "dev", "eth0")
        self.ip("origin", "addr", "add", f"{ORIGIN_B}/24", "dev", "eth0")
        for a in (ORIGIN6, ORIGIN6_B):
            self.ip("origin", "addr", "add", f"{a}/64", "dev", "eth0", "nodad")
        self.route_via("conn1")
        return self

    def route_via(self, connector: str) -> None:
        """Send the clients' pool traffic to ``connector`` (a subnet router change)."""
        for c in CLIENTS:
            self.ip(c, "route", "replace", POOL, "via", CONNECTORS[connector][0])
            self.ip(c, "-6", "route", "replace", POOL6, "via", CONNECTORS6[connector][0])

    def spawn(self, role: str, *args: str, stderr: IO[str] | None = None) -> subprocess.Popen[str]:
        """Start a process in ``role``'s namespace (stderr to ``stderr``, default discarded: an unread
        pipe would block a chatty process)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=stderr or subprocess.DEVNULL, text=True)
        self.procs.append(p)
        return p

    def destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        self.procs.clear()
        for name in self.all_ns():
            sh("ip", "netns", "del", name, check=False)


def read_json_line(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert p.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the driver")
        ready, _, _ = select.select([p.stdout], [], [], left)
        if ready:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"process exited ({p.wait(5)})")
            if line.startswith("{"):
                return dict(json.loads(line))


class Driver:
    """A NAT service running in a connector namespace (tests/nat/driver.py), driven over stdin/stdout."""

    def __init__(self, topo: Topology, role: str, wrapper: tuple[str, ...] = (), **options: Any) -> None:
        self.role = role
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix=f"acnat-{role}-", suffix=".log")  # noqa: SIM115
        self.proc = topo.spawn(role, *wrapper, sys.executable, str(HERE / "driver.py"), json.dumps(options),
                               stderr=self.log_file)
        try:
            self.hello = read_json_line(self.proc, 20)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {self.log()}") from None

    def log(self) -> str:
        """What the driver logged so far."""
        with open(self.log_file.name) as f:
            return f.read()

    def call(self, op: str, timeout: float = 20, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = read_json_line(self.proc, timeout)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"driver {op}: {e}: {self.log()[-3000:]}") from None
        if "error" in reply:
            raise RuntimeError(f"driver {op}: {reply['error']}: {self.log()[-3000:]}")
        return reply

    def stop(self) -> str:
        """Graceful stop; returns the driver's stderr (its log)."""
        self.call("stop")
        self.proc.wait(20)
        return self.log()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


def wait_for(cond: Any, timeout: float, what: Any, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
