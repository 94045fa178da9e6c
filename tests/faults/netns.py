"""Network namespaces for connectors that run NAT: each connector has a kernel (and nftables) of its own.

    acfault-<tag>-c1..c3   connectors, eth0 = 10.77.0.11-13 (Raft, DNS), forwarding on
    acfault-<tag>-cl       clients 10.77.0.40-44 and the upstream DNS server 10.77.0.53
    acfault-<tag>-hub      the bridge br0 joining them (ports k1..k3, cl)

Only addresses inside these namespaces are used. The harness stays in its own namespace and enters
one per thread (``setns``) for the sockets it opens, so its clients and HTTP reads really come from the
client namespace or the connector's own loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import time
from collections.abc import Iterable, Iterator

from tests.faults.nemesis import Endpoint

SUBNET = "10.77.0"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def sh(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block with this thread inside network namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


class Topology:
    def __init__(self, tag: str, connectors: int = 3) -> None:
        self.prefix = f"acfault-{tag}"
        self.connectors = [f"c{i + 1}" for i in range(connectors)]

    def ns(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def address(self, role: str) -> str:
        if role in self.connectors:
            return f"{SUBNET}.{11 + self.connectors.index(role)}"
        raise KeyError(role)

    @property
    def upstream(self) -> str:
        return f"{SUBNET}.53"

    def clients(self, n: int = 4) -> list[str]:
        return [f"{SUBNET}.{40 + i}" for i in range(n)]

    def create(self) -> Topology:
        self.destroy()
        roles = ["hub", "cl", *self.connectors]
        for r in roles:
            sh("ip", "netns", "add", self.ns(r))
            sh("ip", "-n", self.ns(r), "link", "set", "lo", "up")
        hub = self.ns("hub")
        sh("ip", "-n", hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", hub, "link", "set", "br0", "up")
        for r in ["cl", *self.connectors]:
            port = "cl" if r == "cl" else f"k{r[1:]}"
            sh("ip", "-n", self.ns(r), "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", hub)
            sh("ip", "-n", hub, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", self.ns(r), "link", "set", "eth0", "up")
        for a in [*self.clients(5), self.upstream]:  # the fifth is the runner's probe node
            sh("ip", "-n", self.ns("cl"), "addr", "add", f"{a}/24", "dev", "eth0")
        for c in self.connectors:
            sh("ip", "-n", self.ns(c), "addr", "add", f"{self.address(c)}/24", "dev", "eth0")
            sh("ip", "netns", "exec", self.ns(c), "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def destroy(self) -> None:
        for r in ["hub", "cl", *self.connectors]:
            sh("ip", "netns", "del", self.ns(r), check=False)

    def wrap(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]


class NetnsNet:
    """The nemesis's network faults for namespaced connectors (same methods as ``LoopbackNet``)."""

    def __init__(self, topo: Topology, endpoints: Iterable[Endpoint]) -> None:
        self.topo = topo
        self.endpoints = {e.name: e for e in endpoints}
        self.cut: set[frozenset[str]] = set()

    def install(self) -> None:
        for c in self.topo.connectors:
            sh("ip", "netns", "exec", self.topo.ns(c), "nft", "add table inet acfault; "
               "add chain inet acfault cut { type filter hook input priority 0; policy accept; }")

    def remove(self) -> None:
        pass  # the namespaces go, and their tables with them

    def partition(self, *groups: Iterable[str]) -> None:
        sets = [set(g) for g in groups]
        rest = set(self.endpoints) - set().union(*sets)
        if rest:
            sets.append(rest)
        self._apply({frozenset((a, b)) for i, g in enumerate(sets) for h in sets[i + 1:] for a in g for b in h})

    def cut_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._apply({frozenset(p) for p in pairs})

    def heal(self) -> None:
        self._apply(set())

    def _apply(self, pairs: set[frozenset[str]]) -> None:
        for c in self.topo.connectors:
            peers = sorted(next(iter(p - {c})) for p in pairs if c in p)
            rules = "".join(f"; add rule inet acfault cut ip saddr {self.topo.address(o)} drop" for o in peers)
            sh("ip", "netns", "exec", self.topo.ns(c), "nft", f"flush chain inet acfault cut{rules}")
        self.cut = pairs

    def reset(self, name: str, pid: int | None = None) -> int:
        r = sh("ip", "netns", "exec", self.topo.ns(name), "ss", "-K", "-t", "-n", "-H", "state", "established",
               check=False)
        return len([ln for ln in r.stdout.splitlines() if ln.strip()])


def wait_until(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(what)
