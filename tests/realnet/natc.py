"""Upstream natc beside the product on one real tailnet (issue 16): the harness shared by
``test_natc_differential.py`` and ``bench/bench_natc.py``.

    natc     a tsnet node of its own (no tailscaled) in namespace ``natc`` (underlay .21, uplink .21),
             tagged ``tag:natc`` (not the product's cluster tag), pool 100.64.2.0/24 auto-approved for
             that tag, DNS on 100.64.2.0 through its userspace stack; its v6 ULA route stays unapproved
    ours     ``appconnector run`` beside tailscaled on connector c1…, pool 100.64.1.0/24, DNS on 100.64.1.0
    upstream both ask :class:`CorpusUpstream` on 198.51.100.54 (origin namespace): the names of the
             differential corpus, each with one upstream behaviour (NXDOMAIN, SERVFAIL, silence, …)

Clients address each connector's DNS directly (through WireGuard: the client routes both pools to
their connectors); no split DNS is needed for that. natc runs with the flags the issue names, read
from its source (cmd/natc/natc.go at v1.102.3): ``--v4-pfx``, ``--dns-servers``, ``--login-server``,
``--hostname``, ``--state-dir``, ``--ignore-destinations``, ``--cluster-tag``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import socket
import struct
import threading
from pathlib import Path

import dns.exception
import dnslib

from tests.faults.netns import entered
from tests.faults.upstream import targets_of
from tests.realnet import peers
from tests.realnet.tailnet import (
    HS_URL,
    ORIGIN_NET,
    POOL,
    UNDERLAY,
    UPLINK,
    Node,
    Proc,
    Tailnet,
    child_env,
    resolve_in,
    sh,
    wait_for,
)

NATC_POOL = "100.64.2.0/24"
NATC_DNS = str(ipaddress.ip_network(NATC_POOL).network_address)
OURS_DNS = str(ipaddress.ip_network(POOL).network_address)
NATC_TAG = "tag:natc"
NATC_ULA = "fd7a:115c:a1e0:a99c::/64"   # natc's ULA prefix (site ID in bytes 8–9)
CORPUS_DNS = f"{UPLINK}.54"
IGNORED_NET = "203.0.113.0/24"           # pool.ignore_destinations / --ignore-destinations on both
IGNORED_ADDR = "203.0.113.5"
IGNORED_ADDR6 = "2001:db8::5"
PRIME_PORT = 9                           # see Natc.prime


def natc_missing() -> str | None:
    """Why natc cannot run here, or None."""
    if (reason := peers.missing()) is not None:
        return reason
    if not peers.natc().exists():
        return f"natc not built ({peers.natc()}): run ./dev peers"
    return None


class CorpusUpstream:
    """The upstream both connectors ask, over UDP and TCP. The first label of the name picks the
    behaviour: ``nx`` NXDOMAIN + SOA, ``noaddr`` NODATA + SOA, ``fail`` SERVFAIL, ``refused`` REFUSED,
    ``silent`` no answer, ``loop`` A inside both pools, ``direct`` an ignored destination (A and AAAA),
    ``v6`` A and AAAA; any other name the A pair of ``targets_of`` (the origin serves them), TXT and MX,
    other types NODATA."""

    def __init__(self, address: str = CORPUS_DNS, netns: str | None = None) -> None:
        with entered(netns):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.udp.bind((address, 53))
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((address, 53))
        self.tcp.listen(64)
        self.queries = 0
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, name="natc-corpus-upstream", daemon=True).start()

    def answer(self, data: bytes) -> bytes | None:
        self.queries += 1
        req = dnslib.DNSRecord.parse(data)
        name = str(req.q.qname).lower()
        first = name.split(".", 1)[0]
        qt = req.q.qtype
        reply = req.reply()
        soa = dnslib.RR("app.test.", dnslib.QTYPE.SOA, ttl=60, rdata=dnslib.SOA(
            "ns.app.test.", "hostmaster.app.test.", (1, 3600, 600, 86400, 60)))
        if first == "silent":
            return None
        if first in ("fail", "refused"):
            reply.header.rcode = dnslib.RCODE.SERVFAIL if first == "fail" else dnslib.RCODE.REFUSED
        elif first == "nx":
            reply.header.rcode = dnslib.RCODE.NXDOMAIN
            reply.add_auth(soa)
        elif qt == dnslib.QTYPE.A and first != "noaddr":
            addrs = {"loop": ["100.64.1.77", "100.64.2.77"], "direct": [IGNORED_ADDR]}.get(first, targets_of(name))
            for a in addrs:
                reply.add_answer(dnslib.RR(req.q.qname, qt, rdata=dnslib.A(a), ttl=300))
        elif qt == dnslib.QTYPE.AAAA and first in ("direct", "v6"):
            reply.add_answer(dnslib.RR(req.q.qname, qt, rdata=dnslib.AAAA(IGNORED_ADDR6 if first == "direct"
                                                                          else "2001:db8::6"), ttl=300))
        elif qt == dnslib.QTYPE.TXT and first != "noaddr":
            reply.add_answer(dnslib.RR(req.q.qname, qt, rdata=dnslib.TXT("upstream"), ttl=300))
        elif qt == dnslib.QTYPE.MX and first != "noaddr":
            reply.add_answer(dnslib.RR(req.q.qname, qt, rdata=dnslib.MX("mx.app.test."), ttl=300))
        else:
            reply.add_auth(soa)
        return bytes(reply.pack())

    def _serve_udp(self) -> None:
        while True:
            try:
                data, addr = self.udp.recvfrom(4096)
            except OSError:
                return
            with contextlib.suppress(Exception):
                if (out := self.answer(data)) is not None:
                    self.udp.sendto(out, addr)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(Exception):
            conn.settimeout(5)
            while head := conn.recv(2):
                data = b""
                while len(data) < struct.unpack("!H", head)[0]:
                    data += conn.recv(65535)
                if (out := self.answer(data)) is not None:
                    conn.sendall(struct.pack("!H", len(out)) + out)

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def allow_natc(net: Tailnet) -> None:
    """The policy with ``tag:natc`` owned and natc's pool auto-approved for it (headscale re-reads it)."""
    doc = net.policy()
    doc["tagOwners"][NATC_TAG] = ["ops@"]
    doc["autoApprovers"]["routes"][NATC_POOL] = [NATC_TAG]
    # headscale gives a node its own approved routes (netmap SelfNode.AllowedIPs) only where a rule
    # lets it reach them; without that natc's netstack never owns its DNS address and every reply
    # fails "network is unreachable" ("*" as a destination covers node addresses, not routes)
    doc["acls"].append({"action": "accept", "src": [NATC_TAG], "dst": [f"{NATC_POOL}:*"]})
    net.set_policy(doc)


def start_corpus_upstream(net: Tailnet) -> CorpusUpstream:
    sh("ip", "-n", net.ns("origin"), "addr", "add", f"{CORPUS_DNS}/24", "dev", "eth0")
    return CorpusUpstream(CORPUS_DNS, netns=net.ns("origin"))


class Natc:
    """One natc process as it ships: its own tsnet node in a namespace of its own with an uplink."""

    def __init__(self, net: Tailnet, name: str, index: int, *, cluster_tag: str = "", extra: tuple[str, ...] = (),
                 upstream: str = f"{CORPUS_DNS}:53", pools: tuple[str, ...] = (NATC_POOL,)) -> None:
        """``pools``: its --v4-pfx (the first holds the DNS address; more for bench_natc_cluster's scale)."""
        self.net = net
        self.pools = pools
        self.name = name
        self.ns = net._add_ns(name)
        self.dir = net.base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        underlay, uplink = f"{UNDERLAY}.{index}", f"{UPLINK}.{index}"
        net._plug(name, "eth0", "br0", underlay)
        net._plug(name, "up0", "br1", uplink)
        sh("ip", "-n", self.ns, "route", "add", ORIGIN_NET, "via", f"{UPLINK}.10")
        key = net.hs("preauthkeys", "create", "--reusable", "--expiration", "1h", "--tags", NATC_TAG,
                      "-o", "json").stdout
        env = child_env({"TAILSCALE_USE_WIP_CODE": "1", "TS_AUTHKEY": str(json.loads(key)["key"]),
                         "TS_DEBUG_USE_DERP_HTTP": "1", "TS_NO_LOGS_NO_SUPPORT": "1",
                         "TS_LOGS_DIR": str(self.dir / "logs")})
        argv = ["ip", "netns", "exec", self.ns, str(peers.natc()), f"--login-server={HS_URL}",
                f"--hostname={name}", f"--state-dir={self.dir / 'state'}", f"--v4-pfx={','.join(pools)}",
                f"--dns-servers={upstream}", f"--ignore-destinations={IGNORED_NET}", *extra]
        if cluster_tag:
            argv.append(f"--cluster-tag={cluster_tag}")
        sh("ip", "-n", self.ns, "route", "add", "local", f"{NATC_DNS}/32", "dev", "lo")  # see prime()
        self.argv, self.env = argv, env
        self.proc = self.start()

    def start(self) -> Proc:
        p = Proc(self.name, self.argv, self.dir / "natc.log", self.env)
        self.net.procs.append(p)
        return p

    def route_approved(self) -> bool:
        assert self.proc.running(), f"natc exited: {self.proc.log()}"
        return any(n.get("given_name") == self.name and set(self.pools) <= set(n.get("approved_routes") or [])
                   for n in self.net.hs_nodes())

    def prime(self, client: Node) -> None:
        """Make natc's netstack own its DNS address for the next 2 minutes: one datagram from ``client``
        to another port of it. headscale v0.29.2 does not reliably list a node's own approved route in
        the node's map (SelfNode.AllowedIPs), and natc's netstack owns its DNS address only from there;
        until then every DNS reply fails "network is unreachable". A datagram to a subnet address on a
        port nothing listens on makes netstack add that address while it forwards the flow (2 min idle
        timeout, natc's own namespace takes the forwarded copy on ``lo``). Changes nothing natc does."""
        with client.sockets():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.sendto(b"natc-prime", (NATC_DNS, PRIME_PORT))

    def wait_serving(self, client: Node, name: str = "web.app.test", timeout: float = 90) -> None:
        """Until ``client`` gets an answer from natc's DNS (login, route approval, the client's route),
        priming natc's address (:meth:`prime`) each second."""
        def answered() -> bool:
            assert self.proc.running(), f"natc exited: {self.proc.log()}"
            with contextlib.suppress(dns.exception.Timeout, OSError):
                self.prime(client)
                return resolve_in(client.ns, name, NATC_DNS, timeout=1)[0] == 0
            return False
        wait_for(self.route_approved, timeout, lambda: f"{self.name}: {NATC_POOL} approved: {self.proc.log()}")
        wait_for(answered, timeout, lambda: f"natc answers {name}: {self.proc.log()}")


def ours_config(node: Node, upstream: str = f"{CORPUS_DNS}:53") -> Path:
    """The product's config for ``node``: the corpus upstream and the same ignored destinations as natc."""
    cfg = node.write_config(upstream=[upstream])
    text = cfg.read_text().replace(f'prefixes = ["{POOL}"]',
                                   f'prefixes = ["{POOL}"]\nignore_destinations = ["{IGNORED_NET}"]', 1)
    cfg.write_text(text)
    return cfg


def stable_name(seed: str, i: int) -> str:
    """A fresh, deterministic app name (``n<hash>.app.test``) the corpus upstream answers with A records."""
    return f"n{hashlib.sha256(f'{seed}{i}'.encode()).hexdigest()[:10]}.app.test"
