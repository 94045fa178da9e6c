"""What the DNS and raft benchmarks share: the shipped connector as a process, Unbound, dnsperf.

The connector under test is ``appconnector run --config FILE`` with the shipped defaults for every key
the file leaves out (compaction, Raft tuning, the stdlib event loop), standalone mode (the client IP is
the node), NAT off, all on loopback. It and Unbound are pinned to one core (``taskset -c 1``), every
client (dnsperf, the latency client) to the other (``taskset -c 0``). Processes start in their own
session and are stopped with ``os.killpg``; every client call has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
POOL = "100.80.0.0/12"
SERVER_CPU = "1"
CLIENT_CPU = "0"
RUN = "import sys; from appconnector.cli import main; sys.exit(main())"
# `run` with uvloop, for the comparison row only (the product's `run` uses the stdlib loop).
UVLOOP_RUN = ("import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
              "from appconnector.cli import main; sys.exit(main())")


def pinned(cpu: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_group(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM to the process group (a planned stop), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def dns_query(host: str, port: int, name: str, timeout: float = 0.5) -> bytes | None:
    packet = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (host, port))
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def start_unbound(workdir: Path, names: int) -> tuple[subprocess.Popen[bytes], int]:
    """Unbound, one thread, pinned: ``k<i>.bench.test`` as local data; every name under new.test → A."""
    port = free_port()
    lines = ["server:", f"  interface: 127.0.0.1@{port}", "  do-daemonize: no", '  username: ""', '  chroot: ""',
             f'  directory: "{workdir}"', '  pidfile: ""', "  use-syslog: no", "  verbosity: 0", "  num-threads: 1",
             "  do-ip6: no", "  access-control: 127.0.0.0/8 allow", '  module-config: "iterator"',
             '  local-zone: "bench.test." static',
             '  local-data: "bench.test. 3600 IN SOA ns.bench.test. h.bench.test. 1 3600 600 86400 60"',
             *[f'  local-data: "k{i}.bench.test. 300 IN A 192.0.2.{1 + i % 250}"' for i in range(names)],
             '  local-zone: "new.test." redirect', '  local-data: "new.test. 300 IN A 198.18.0.1"',
             "remote-control:", "  control-enable: no"]
    conf = workdir / "unbound.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(pinned(SERVER_CPU, ["unbound", "-d", "-c", str(conf)]), stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if dns_query("127.0.0.1", port, "k0.bench.test") is not None:
            return proc, port
        time.sleep(0.05)
    stop_group(proc)
    raise RuntimeError("unbound did not start")


def sources(count: int) -> list[str]:
    """Client source addresses on loopback: in standalone mode each one is a node."""
    return [f"127.0.0.{10 + i}" for i in range(count)]


def dnsperf(port: int, datafile: Path, seconds: float | None, *, once: bool = False, outstanding: int = 100,
            clients: int = 4, source: str | None = None) -> dict[str, float]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-c", str(clients),
           "-T", "1", "-q", str(outstanding), "-t", "5"]
    if source:
        cmd += ["-a", source]
    cmd += ["-n", "1"] if once else ["-l", str(seconds)]
    limit = 600 if seconds is None else seconds + 30
    out = subprocess.run(pinned(CLIENT_CPU, cmd), capture_output=True, text=True, check=True, timeout=limit).stdout

    def grab(label: str) -> float:
        m = re.search(rf"{label}:\s+([0-9.]+)", out)
        return float(m.group(1)) if m else float("nan")
    return {"qps": grab("Queries per second"), "completed": grab("Queries completed"),
            "lost": grab("Queries lost"), "avg_latency": grab(r"Average Latency \(s\)")}


def dnsperf_many(port: int, datafile: Path, seconds: float | None, srcs: Sequence[str], *, once: bool = False,
                 outstanding: int = 100) -> dict[str, float]:
    """One dnsperf per source address at once (all on the client core); qps and counts summed."""
    per = max(1, outstanding // len(srcs))
    cmd_for = []
    for src in srcs:
        cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(datafile), "-c", "1", "-T", "1",
               "-q", str(per), "-t", "5", "-a", src]
        cmd += ["-n", "1"] if once else ["-l", str(seconds)]
        cmd_for.append(pinned(CLIENT_CPU, cmd))
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for c in cmd_for]
    limit = 600 if seconds is None else seconds + 30
    total = {"qps": 0.0, "completed": 0.0, "lost": 0.0}
    for p in procs:
        out, _ = p.communicate(timeout=limit)
        for key, label in (("qps", "Queries per second"), ("completed", "Queries completed"),
                           ("lost", "Queries lost")):
            m = re.search(rf"{label}:\s+([0-9.]+)", out)
            total[key] += float(m.group(1)) if m else float("nan")
    return total


def latency_client(port: int, prefix: str, count: int, source: str = "127.0.0.1") -> list[float]:
    """In a child process on the client core: one fresh name at a time, wall time per answer."""
    code = f"""
import socket, struct, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.bind(("{source}", 0))
out = []
for i in range({count}):
    name = "{prefix}" + str(i) + ".new.test"
    p = struct.pack("!6H", i & 0xffff, 0x0100, 1, 0, 0, 0)
    for l in name.split("."):
        p += bytes([len(l)]) + l.encode()
    p += b"\\x00\\x00\\x01\\x00\\x01"
    t = time.perf_counter(); s.sendto(p, ("127.0.0.1", {port})); s.recv(4096)
    out.append(time.perf_counter() - t)
print(" ".join(repr(x) for x in out))
"""
    res = subprocess.run(pinned(CLIENT_CPU, [sys.executable, "-c", code]), capture_output=True, text=True,
                         check=True, timeout=600)
    return [float(x) for x in res.stdout.split()]


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Connector:
    """One ``appconnector run --config FILE`` process, pinned to the server core."""

    def __init__(self, base: Path, name: str, upstream_port: int, *, raft_port: int | None = None,
                 peers: Sequence[str] = (), secret: Path | None = None, uvloop: bool = False,
                 code: Path = REPO, cluster_extra: Sequence[str] = ()) -> None:
        self.name = name
        self.code = code  # the source tree whose `appconnector` runs (another version: a before/after row)
        self.dns_port, self.http_port, self.admin_port = free_port(), free_port(), free_port()
        self.raft_port = raft_port or free_port()
        self.state_dir = base / f"{name}-state"
        self.config_path = base / f"{name}.toml"
        self.log_path = base / f"{name}.log"
        self.uvloop = uvloop
        self.proc: subprocess.Popen[bytes] | None = None
        cluster = [f'state_dir = "{self.state_dir}"', f'self = "127.0.0.1:{self.raft_port}"',
                   "peers = [" + ", ".join(f'"{p}"' for p in peers) + "]"]
        if secret is not None:
            cluster.append(f'secret_file = "{secret}"')
        cluster += cluster_extra  # more [cluster] lines, e.g. "fsync = false" (bench_durability)
        self.config_path.write_text("\n".join([
            "[tailnet]", 'mode = "standalone"',
            "[dns]", f'listen = ["127.0.0.1:{self.dns_port}"]', f'upstream = ["127.0.0.1:{upstream_port}"]',
            "[pool]", f'prefixes = ["{POOL}"]',
            "[cluster]", *cluster,
            "[nat]", "enabled = false",
            "[http]", f'listen = "127.0.0.1:{self.http_port}"', f'admin_listen = "127.0.0.1:{self.admin_port}"',
        ]) + "\n")

    @property
    def raft_address(self) -> str:
        return f"127.0.0.1:{self.raft_port}"

    def start(self) -> Connector:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
        env["PYTHONPATH"] = f"{self.code}{os.pathsep}{env.get('PYTHONPATH', '')}"
        exe = Path(sys.executable).parent / "appconnector"
        if self.uvloop:
            argv = [sys.executable, "-c", UVLOOP_RUN]
        else:
            argv = [str(exe)] if exe.exists() else [sys.executable, "-c", RUN]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(pinned(SERVER_CPU, [*argv, "run", "--config", str(self.config_path)]),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.code,
                                         start_new_session=True)
        return self

    def get(self, path: str, timeout: float = 2.0) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=1.0):
                    pass
                if dns_query("127.0.0.1", self.dns_port, "k0.bench.test", 1.0) is not None:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {timeout:.0f}s:\n{self.log_text()[-3000:]}")

    def role(self) -> str:
        try:
            return str((self.get("/status").get("raft") or {}).get("role"))
        except (OSError, ValueError):
            return "unknown"

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_cluster(base: Path, upstream_port: int, *, uvloop: bool = False,
                  cluster_extra: Sequence[str] = ()) -> list[Connector]:
    """Three standalone connectors with static peers and a shared secret; returns leader first."""
    secret = base / "secret"
    secret.write_text("bench-secret-" + os.urandom(8).hex() + "\n")
    secret.chmod(0o600)
    raft = [free_port() for _ in range(3)]
    addrs = [f"127.0.0.1:{p}" for p in raft]
    members = [Connector(base, f"m{i}", upstream_port, raft_port=raft[i], secret=secret, uvloop=uvloop,
                         peers=[a for a in addrs if a != addrs[i]], cluster_extra=cluster_extra) for i in range(3)]
    try:
        for m in members:
            m.start()
        for m in members:
            m.wait_ready()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            roles = [m.role() for m in members]
            if roles.count("leader") == 1 and roles.count("follower") == 2:
                return sorted(members, key=lambda m: m.role() != "leader")
            time.sleep(0.2)
        raise RuntimeError(f"no stable leader: {[m.role() for m in members]}")
    except BaseException:
        for m in members:
            m.stop()
        raise
