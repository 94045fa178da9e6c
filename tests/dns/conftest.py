"""Fixtures of the DNS tests: a real Unbound on loopback serving the test names, a small dnslib
upstream for failure modes (silence, SERVFAIL, truncation, delay), and a DnsService with a LocalPool
running on its own event loop in a thread, so tests can use blocking clients (dnspython, kdig)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import dns.message
import dns.query
import dns.rcode
import dnslib
import pytest
import uvloop

from appconnector.config import Config, load
from appconnector.dns.service import DnsService
from appconnector.dns.settings import DnsSettings
from appconnector.dns.upstream import UpstreamResolver
from appconnector.tailnet.api import NodeDirectory, NodeIdentity
from appconnector.tailnet.standalone import StandaloneIdentity
from tests.replicas import start_replica

T = TypeVar("T")

POOL = "100.64.1.0/24"
IGNORED = "198.51.100.0/24"

# name → records Unbound serves ("test." is a static zone: every other name is NXDOMAIN)
ZONE = [
    "test. 3600 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60",
    "app.test. 300 IN A 192.0.2.10",
    "app.test. 300 IN A 192.0.2.11",
    "other.test. 300 IN A 192.0.2.20",
    "v6only.test. 300 IN AAAA 2001:db8::1",
    "ignored.test. 300 IN A 198.51.100.7",
    "ignored.test. 300 IN AAAA 2001:db8::7",
    "loop.test. 300 IN A 100.64.1.77",
    "allowed.test. 300 IN A 192.0.2.30",
    "x.allowed.test. 300 IN A 192.0.2.31",
    *[f"big.test. 300 IN A 198.51.100.{i}" for i in range(10, 70)],
    *[f"n{i}.test. 300 IN A 192.0.2.{100 + i}" for i in range(8)],
    # HTTPS/SVCB (tests/dns/test_svcb.py): hints to strip, targets we steer (".", other.test) and
    # one we do not (nothere.test: NXDOMAIN), AliasMode both ways, a pass-through name with hints
    "svc.test. 300 IN A 192.0.2.40",
    "svc.test. 300 IN HTTPS 1 . alpn=h3,h2 port=8443 ipv4hint=192.0.2.40 ipv6hint=2001:db8::40 ech=AAT+DQAA",
    "svc.test. 300 IN HTTPS 2 other.test. mandatory=alpn,ipv4hint alpn=h2 ipv4hint=192.0.2.20",
    "svc.test. 300 IN HTTPS 3 nothere.test. alpn=h2",
    "svc.test. 300 IN SVCB 1 . port=853 ipv4hint=192.0.2.40 ipv6hint=2001:db8::40",
    "foreign.test. 300 IN A 192.0.2.41",
    "foreign.test. 300 IN HTTPS 1 ignored.test. alpn=h2 ipv4hint=198.51.100.7",
    "alias.test. 300 IN A 192.0.2.50",
    "alias.test. 300 IN HTTPS 0 ignored.test.",
    "alias2.test. 300 IN A 192.0.2.51",
    "alias2.test. 300 IN HTTPS 0 svc.test.",
    "ignored.test. 300 IN HTTPS 1 . ipv4hint=198.51.100.7",
    # dual stack (tests/dns/test_aaaa.py): AAAA is answered from the v6 pool only for names with real AAAA
    "dual.test. 300 IN A 192.0.2.60",
    "dual.test. 300 IN AAAA 2001:db8::60",
    "dual.test. 300 IN AAAA 2001:db8::61",
    "dual2.test. 300 IN A 192.0.2.61",
    "dual2.test. 300 IN AAAA 2001:db8::62",
    "loop6.test. 300 IN A 192.0.2.62",
    "loop6.test. 300 IN AAAA fd7a:115c:a1e0:a99c:1::5",
]


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return int(port)
    raise RuntimeError("no free port")


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class Unbound:
    """unbound -d on 127.0.0.1:port, one thread, serving ``records`` as local data."""

    def __init__(self, workdir: Path, records: list[str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        conf = workdir / "unbound.conf"
        lines = [
            "server:", f"  interface: 127.0.0.1@{self.port}", "  do-daemonize: no", '  username: ""',
            '  chroot: ""', f'  directory: "{workdir}"', '  pidfile: ""', "  use-syslog: no",
            "  verbosity: 0", "  num-threads: 1", "  do-ip6: no", "  access-control: 127.0.0.0/8 allow",
            '  module-config: "iterator"', '  local-zone: "test." static',
            *[f'  local-data: "{r}"' for r in records],
            "remote-control:", "  control-enable: no",
        ]
        conf.write_text("\n".join(lines) + "\n")
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["unbound", "-d", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"unbound exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                dns.query.udp(dns.message.make_query("app.test", "A"), "127.0.0.1", port=self.port, timeout=0.2)
                return True
            except (dns.exception.Timeout, OSError):
                return False
        wait_until(answers, 10, "unbound to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    if shutil.which("unbound") is None:
        pytest.skip("needs unbound (apt-get install unbound): the real upstream of the DNS tests")
    ub = Unbound(tmp_path_factory.mktemp("acdns-unbound"), ZONE)
    ub.start()
    yield ub
    ub.stop()


class StubUpstream:
    """A dnslib upstream on loopback (UDP and TCP, threads) whose behaviour tests switch:
    ``ok`` (A 192.0.2.99 for any name), ``silent``, ``servfail``, ``refused``, ``truncate`` (UDP
    answers TC, TCP answers in full), ``delay`` (answers ok after ``delay`` seconds)."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.delay = 0.5
        self.https_rdata: bytes | None = None
        self.queries = 0
        self.tcp_queries = 0
        self.sources: list[tuple[str, int]] = []  # (address, port) each UDP query came from
        self.idents: list[int] = []  # each UDP query's transaction ID
        self.port = free_port()
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._tcp.bind(("127.0.0.1", self.port))
        self._tcp.listen(16)
        self._stop = False
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]
        for t in self._threads:
            t.start()

    def _reply(self, data: bytes, tcp: bool) -> bytes | None:
        req = dnslib.DNSRecord.parse(data)
        reply = req.reply()
        mode = self.mode
        if mode == "silent":
            return None
        if mode == "delay":
            time.sleep(self.delay)
        if mode == "servfail":
            reply.header.rcode = dnslib.RCODE.SERVFAIL
        elif mode == "refused":
            reply.header.rcode = dnslib.RCODE.REFUSED
        elif mode == "truncate" and not tcp:
            reply.header.tc = 1
        elif req.q.qtype == dnslib.QTYPE.A:
            reply.add_answer(dnslib.RR(req.q.qname, dnslib.QTYPE.A, rdata=dnslib.A("192.0.2.99"), ttl=60))
        elif req.q.qtype == 65 and self.https_rdata is not None:
            reply.add_answer(dnslib.RR(req.q.qname, 65, rdata=dnslib.RD(self.https_rdata), ttl=60))
        return bytes(reply.pack())

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                data, addr = self._udp.recvfrom(4096)
            except OSError:
                return
            self.queries += 1
            self.sources.append(addr)
            self.idents.append(int.from_bytes(data[:2], "big"))
            with contextlib.suppress(Exception):
                out = self._reply(data, tcp=False)
                if out is not None:
                    self._udp.sendto(out, addr)

    def _serve_tcp(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._tcp.accept()
            except OSError:
                return
            with conn, contextlib.suppress(Exception):
                (n,) = struct.unpack("!H", conn.recv(2))
                data = b""
                while len(data) < n:
                    data += conn.recv(n - len(data))
                self.tcp_queries += 1
                out = self._reply(data, tcp=True)
                if out is not None:
                    conn.sendall(struct.pack("!H", len(out)) + out)

    def close(self) -> None:
        self._stop = True
        self._udp.close()
        self._tcp.close()


@pytest.fixture
def stub() -> Iterator[StubUpstream]:
    s = StubUpstream()
    yield s
    s.close()


def make_config(*, upstream: list[str], port: int | None = None, **env: str) -> Config:
    """A standalone config via the real loader (env overrides), DNS on a free loopback port."""
    values = {
        "APPCONNECTOR_TAILNET_MODE": "standalone",
        "APPCONNECTOR_DNS_LISTEN": f"127.0.0.1:{port or free_port()}",
        "APPCONNECTOR_DNS_UPSTREAM": ",".join(upstream),
        "APPCONNECTOR_POOL_PREFIXES": POOL,
        "APPCONNECTOR_POOL_IGNORE_DESTINATIONS": IGNORED,
        "APPCONNECTOR_NAT_ENABLED": "false",
    }
    values.update({f"APPCONNECTOR_{k.upper()}": v for k, v in env.items()})
    return load(None, env=values)


class Running:
    """A DnsService + a replica (``replica_kind``: LocalPool or a one-member RaftReplica, see
    tests/replicas.py) on a uvloop event loop in a background thread."""

    pool: Any  # LocalPool or RaftReplica: tests use what both offer, LocalPool-only tests say so

    def __init__(self, cfg: Config, identity: NodeIdentity | None = None, upstream_timeout: float = 0.5,
                 identity_factory: Callable[[], Coroutine[Any, Any, NodeIdentity | tuple[NodeIdentity, NodeDirectory]]]
                 | None = None,
                 use_uvloop: bool = True, replica_kind: str = "local", pool: Any = None) -> None:
        self.cfg = cfg
        self.replica_kind = replica_kind
        self.loop = uvloop.new_event_loop() if use_uvloop else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # ``pool``: a started replica the identity factory fills first (state from before this run)
        self._given_pool = pool
        self._identity_factory = identity_factory
        self.identity = identity
        self.upstream = UpstreamResolver([_hp(u) for u in cfg.dns.upstream], timeout=upstream_timeout)
        self.service: DnsService | None = None
        self.directory: NodeDirectory | None = None  # a factory returning (identity, directory) sets it
        try:
            self.call(self._start())
        except BaseException:
            self.close()
            raise
        assert self.service is not None
        self.host, self.port = self.service.bound[0]

    async def _start(self) -> None:
        if self._identity_factory is not None:
            made = await self._identity_factory()
            self.identity, self.directory = made if isinstance(made, tuple) else (made, None)
        if self.identity is None:
            self.identity = StandaloneIdentity()
        self.pool = self._given_pool or await start_replica(self.replica_kind, self.cfg)
        self.service = DnsService(DnsSettings.from_config(self.cfg), self.pool, self.identity, upstream=self.upstream,
                                  directory=self.directory)
        await self.service.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def query(self, name: str, rdtype: str = "A", *, tcp: bool = False, source: str | None = None,
              **kw: Any) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)
        if tcp:
            return dns.query.tcp(q, self.host, port=self.port, timeout=5, source=source)
        return dns.query.udp(q, self.host, port=self.port, timeout=5, source=source)

    def raw(self, data: bytes, timeout: float = 2.0) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(data, (self.host, self.port))
            try:
                return s.recv(65535)
            except TimeoutError:
                return None

    def close(self) -> None:
        async def _stop() -> None:
            if self.service is not None:
                await self.service.stop()
            if hasattr(self, "pool"):
                with contextlib.suppress(Exception):
                    await self.pool.stop()
        try:
            self.call(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


def _hp(v: str) -> tuple[str, int]:
    host, _, port = v.rpartition(":")
    return host, int(port)


@pytest.fixture
def running(replica_kind: str) -> Iterator[Callable[..., Running]]:
    """``running(cfg, identity=None)`` starts a service; all are stopped at the end of the test. Each
    test runs against both replicas (``replica_kind``)."""
    started: list[Running] = []

    def start(cfg: Config, **kw: Any) -> Running:
        r = Running(cfg, replica_kind=replica_kind, **kw)
        started.append(r)
        return r
    yield start
    for r in started:
        r.close()
