"""Faults for processes talking TCP on loopback: partitions, connection resets, pauses, kills, clock skew.

Partitions on loopback cannot use addresses (every member connects from 127.0.0.1), so each member runs
with a group id of its own and a table of ours, ``inet acfault_<port>``, marks every new connection with the
initiator's group (``ct mark``, set in the output hook from ``meta skgid``). A cut between members X and
Y drops, in the input hook, packets of connections that X initiated towards Y's port or Y towards X's:
both directions of exactly those connections, nothing else on the host. Connection resets use
``ss -K`` (socket destroy) on a member's port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

TABLE = "acfault"
MARK_BASE = 0x0ACF0000
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


class NemesisUnavailable(Exception):
    """A tool or privilege the fault needs is missing (the test skips with this reason)."""


def require_root_tools() -> None:
    if os.geteuid() != 0:
        raise NemesisUnavailable("needs root: nftables partitions and per-member group ids")
    for tool in ("nft", "ss"):
        if shutil.which(tool) is None:
            raise NemesisUnavailable(f"needs {tool} (apt-get install nftables iproute2)")


def skew_env(seconds: float) -> dict[str, str]:
    """Environment that makes a process's wall clock run ``seconds`` ahead (monotonic untouched)."""
    if not os.path.exists(FAKETIME_LIB):
        raise NemesisUnavailable("needs libfaketime for clock skew (apt-get install libfaketime)")
    return {"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": f"{seconds:+g}s", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1"}


@dataclass(frozen=True)
class Endpoint:
    name: str
    gid: int     # the member process runs with this group id
    port: int    # its Raft port (what peers connect to)

    @property
    def mark(self) -> int:
        return MARK_BASE + (self.gid & 0xFFFF)


def _nft(script: str) -> None:
    r = subprocess.run(["nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"nft failed: {r.stderr.strip()}\n{script}")


class LoopbackNet:
    """Owns ``table inet acfault``. Install before the members start (so every connection is marked)."""

    def __init__(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = {e.name: e for e in endpoints}
        # One table per run (``acfault_<lowest port>``) so runs in parallel never touch each other's rules.
        self.table = f"{TABLE}_{min(e.port for e in self.endpoints.values())}"
        self.cut: set[frozenset[str]] = set()
        self.installed = False

    def install(self) -> None:
        require_root_tools()
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=10)
        marks = "\n".join(f"    ct state new meta skgid {e.gid} ct mark set {e.mark:#x}"
                          for e in self.endpoints.values())
        _nft(f"""table inet {self.table} {{
  chain tag {{
    type filter hook output priority 0; policy accept;
{marks}
  }}
  chain cut {{
    type filter hook input priority 0; policy accept;
  }}
}}
""")
        self.installed = True

    def remove(self) -> None:
        if self.installed:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, timeout=10)
            self.installed = False

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every pair of members that are in different groups (members not named form one more
        group). ``partition({"m1"})`` isolates m1."""
        sets = [set(g) for g in groups]
        rest = set(self.endpoints) - set().union(*sets)
        if rest:
            sets.append(rest)
        pairs = {frozenset((a, b)) for i, g in enumerate(sets) for h in sets[i + 1:] for a in g for b in h}
        self._apply(pairs)

    def cut_pairs(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Cut only these links (a non-transitive partition: a bridge member sees both sides)."""
        self._apply({frozenset(p) for p in pairs})

    def heal(self) -> None:
        self._apply(set())

    def _apply(self, pairs: set[frozenset[str]]) -> None:
        rules = []
        for pair in sorted(pairs, key=sorted):
            a, b = (self.endpoints[n] for n in sorted(pair))
            for x, y in ((a, b), (b, a)):
                rules.append(f"add rule inet {self.table} cut ct mark {x.mark:#x} meta l4proto tcp "
                             f"ct original proto-dst {y.port} drop")
        _nft(f"flush chain inet {self.table} cut\n" + "\n".join(rules) + "\n")
        self.cut = pairs

    def reset(self, name: str, pid: int | None = None) -> int:
        """Destroy every TCP connection of the member: those to its port and those it opened (found by
        ``pid``). Returns how many sockets were destroyed."""
        port = self.endpoints[name].port
        ports = {port}
        if pid is not None:
            listing = subprocess.run(["ss", "-t", "-n", "-p", "-H", "state", "established"],
                                     capture_output=True, text=True, timeout=10).stdout
            for line in listing.splitlines():
                if f"pid={pid}," in line:
                    fields = line.split()
                    ports.add(int(fields[2].rsplit(":", 1)[1]))
        expr = " or ".join(f"sport = :{p} or dport = :{p}" for p in sorted(ports))
        r = subprocess.run(["ss", "-K", "-t", "-n", "-H", f"( {expr} )"], capture_output=True, text=True, timeout=10)
        return len([ln for ln in r.stdout.splitlines() if ln.strip()])


def preexec_for(gid: int) -> Callable[[], None]:
    """A ``preexec_fn`` running the child as root with group ``gid`` (so nftables can tell members apart)."""
    def run() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setsid()
    return run


def pause(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
