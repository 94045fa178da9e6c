"""The whole product as a user meets it: `appconnector run` in a connector namespace, a real upstream
resolver (Unbound) and real services in an origin namespace, tailnet clients asking DNS with kdig and
then talking to the answer.

    cli1, cli2 ──tsnet0── conn1 (appconnector run) ──up0── origin (Unbound :53, HTTP :8080, UDP echo)

Standalone mode (the client IP is the node). DNS listens on the pool's reserved first address
(100.64.1.0), which the connector puts on lo itself; the clients reach it through their pool route.
"""

from __future__ import annotations

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

from tests.nat.netns import (
    CONNECTORS,
    CONNECTORS6,
    HERE,
    ORIGIN,
    ORIGIN6,
    ORIGIN_B,
    POOL6,
    REPO,
    TAILNET_IF,
    Topology,
    sh,
)

pytestmark = pytest.mark.root

DNS = "100.64.1.0"  # the pool's reserved first address
DNS6 = CONNECTORS6["conn1"][0]  # with v6: the connector's own tailnet IPv6 (standalone: the node is the asking IP)


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and nftables")
    for tool in ("ip", "nft", "unbound", "kdig"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (./dev deps installs it)")


def _wait(cond: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        got = cond() if callable(cond) else None
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class Product:
    def __init__(self, topo: Topology, workdir: Path, v6: bool = False) -> None:
        self.topo = topo
        self.workdir = workdir
        self.v6 = v6  # pool.prefixes6, DNS also on the connector's tailnet IPv6, a dual-stack origin
        self.log = open(workdir / "conn1.log", "w+")  # noqa: SIM115 - read back on failure
        self.proc: subprocess.Popen[str] | None = None

    def start_origin(self) -> None:
        extra = (ORIGIN6,) if self.v6 else ()
        origin = self.topo.spawn("origin", sys.executable, str(HERE / "origin.py"), ORIGIN, ORIGIN_B, *extra)
        assert origin.stdout is not None and origin.stdout.readline().strip() == "ready"
        conf = self.workdir / "unbound.conf"
        conf.write_text(f"""server:
    interface: {ORIGIN}
    port: 53
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{self.workdir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    num-threads: 1
    access-control: 0.0.0.0/0 allow
    module-config: "iterator"
    local-zone: "test." static
    local-data: "app.test. 300 IN A {ORIGIN}"
    local-data: "other.test. 300 IN A {ORIGIN_B}"
    local-data: "nodata.test. 300 IN TXT hello"
    local-data: "dual.test. 300 IN A {ORIGIN}"
    local-data: "dual.test. 300 IN AAAA {ORIGIN6}"
""")
        self.topo.spawn("origin", "unbound", "-d", "-c", str(conf))
        _wait(lambda: "NOERROR" in self.dig("conn1", "app.test", server=ORIGIN), 15, "Unbound in the origin")

    def start_connector(self) -> None:
        cfg = self.workdir / "appconnector.toml"
        cfg.write_text(f"""
[tailnet]
mode = "standalone"
interface = "{TAILNET_IF}"
[dns]
listen = ["{DNS}:53"{f', "[{DNS6}]:53"' if self.v6 else ""}]
upstream = ["{ORIGIN}:53"]
ttl = "60s"
[pool]
prefixes = ["100.64.1.0/24"]
prefixes6 = [{f'"{POOL6}"' if self.v6 else ""}]
[cluster]
state_dir = "{self.workdir / 'state'}"
[http]
listen = "127.0.0.1:8893"
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.topo.ns("conn1"), sys.executable, "-m", "appconnector.cli", "run",
             "--config", str(cfg)], cwd=REPO, env=env, stdout=self.log, stderr=self.log, text=True)
        _wait(lambda: self.proc is not None and (self.proc.poll() is not None or "connector ready" in self.logs()),
              60, "the connector to start")
        assert self.proc.poll() is None, f"connector exited: {self.logs()}"

    def logs(self) -> str:
        self.log.flush()
        return (self.workdir / "conn1.log").read_text()

    def dig(self, client: str, name: str, qtype: str = "A", server: str = DNS, tcp: bool = False) -> str:
        args = ["kdig", f"@{server}", name, qtype, "+timeout=2", "+retry=1"]
        if tcp:
            args.append("+tcp")
        return self.topo.run_in(client, *args, check=False).stdout

    def answer(self, client: str, name: str, qtype: str = "A", server: str = DNS) -> str:
        out = self.topo.run_in(client, "kdig", f"@{server}", name, qtype, "+short", "+timeout=2",
                               check=False).stdout
        lines = [line for line in out.splitlines() if line and not line.startswith(";")]
        assert len(lines) == 1, f"one {qtype} record for {name}, got {out!r}; log: {self.logs()[-3000:]}"
        return lines[0]

    def client(self, client: str, *args: str) -> dict[str, object]:
        out = self.topo.run_in(client, sys.executable, str(HERE / "client.py"), *args, check=False, timeout=30)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    def tables(self) -> str:
        return self.topo.run_in("conn1", "nft", "list", "tables").stdout

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(params=[False])
def product(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Product]:
    _require()
    topo = Topology(f"e2e{os.getpid() % 100000}").create()
    p = Product(topo, tmp_path, v6=request.param)
    try:
        p.start_origin()
        p.start_connector()
        yield p
    finally:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)
        topo.destroy()
        p.log.close()


def test_dns_answer_steers_tcp_udp_icmp_to_the_real_service(product: Product) -> None:
    addr1 = product.answer("cli1", "app.test")
    assert addr1.startswith("100.64.1.") and addr1 != DNS, "a pool address, never the DNS address"
    # the same question again (UDP fast path, then TCP) gives the same address
    assert product.answer("cli1", "app.test") == addr1
    assert f"A\t{addr1}" in product.dig("cli1", "APP.test", tcp=True).replace(" ", "\t")

    body = product.client("cli1", "http", addr1)
    assert body["ok"], body
    # DNAT to the real address, masqueraded out of the connector's uplink
    assert f"origin {ORIGIN} from {CONNECTORS['conn1'][1]}" in str(body["body"])
    udp = product.client("cli1", "udp", addr1, "ping")
    assert udp["ok"] and f"echo {ORIGIN}" in str(udp["reply"]), udp
    assert product.client("cli1", "icmp", addr1)["ok"]


def test_each_node_gets_its_own_mapping_and_names_keep_upstream_semantics(product: Product) -> None:
    a1 = product.answer("cli1", "app.test")
    o1 = product.answer("cli1", "other.test")
    a2 = product.answer("cli2", "other.test")
    assert a1 != o1
    # every node gets the whole pool: cli2's first name takes the first free address, as cli1's did
    assert a2 == a1
    body = product.client("cli2", "http", a2)
    assert body["ok"] and f"origin {ORIGIN_B}" in str(body["body"]), "cli2's address means other.test for cli2"
    body = product.client("cli1", "http", a1)
    assert body["ok"] and f"origin {ORIGIN} " in str(body["body"]), "and still app.test for cli1"

    assert "NXDOMAIN" in product.dig("cli1", "missing.test")
    nodata = product.dig("cli1", "nodata.test")
    assert "NOERROR" in nodata and "ANSWER: 0" in nodata
    aaaa = product.dig("cli1", "app.test", "AAAA")
    assert "NOERROR" in aaaa and "ANSWER: 0" in aaaa and "SOA" in aaaa, "AAAA: NODATA with SOA"


def test_unmapped_pool_traffic_is_refused_and_stop_removes_only_our_table(product: Product) -> None:
    product.answer("cli1", "app.test")
    # an address nobody asked for does not reach anything, and says so at once (a reset, not a timeout)
    udp = product.client("cli1", "udp", "100.64.1.200", "x")
    assert not udp["ok"]
    tcp = product.client("cli1", "connect", "100.64.1.200")
    assert tcp["errno"] == "ECONNREFUSED" and float(str(tcp["seconds"])) < 1.0, tcp
    product.topo.run_in("conn1", "nft", "add", "table", "inet", "bystander")
    assert "appconnector" in product.tables()
    assert product.stop() == 0
    tables = product.tables()
    assert "inet appconnector" not in tables and "inet bystander" in tables
    routes = sh("ip", "-n", product.topo.ns("conn1"), "route", "show", "table", "local").stdout
    assert DNS not in routes, "the DNS address is taken off lo again"


@pytest.mark.parametrize("product", [True], indirect=True)
def test_v6_pool_steers_a_dual_stack_service_and_keeps_nodata_for_a_v4_only_one(product: Product) -> None:
    """pool.prefixes6 in the shipped product: a client asking over IPv6 gets the v6 pool address of a
    service with real AAAA and reaches it over IPv6 (TCP, UDP, ICMPv6); a v4-only service's AAAA is
    NODATA. (Standalone mode: the node is the asking IP; tailscale mode links a node's addresses.)"""
    v6 = product.answer("cli1", "dual.test", "AAAA", server=DNS6)
    assert v6.startswith("fd7a:115c:a1e0:a99c:1::"), v6
    body = product.client("cli1", "http", v6)
    assert body["ok"] and f"origin {ORIGIN6} from {CONNECTORS6['conn1'][1]}" in str(body["body"]), (
        body, product.logs()[-3000:])
    udp = product.client("cli1", "udp", v6, "ping")
    assert udp["ok"] and f"echo {ORIGIN6}" in str(udp["reply"]), udp
    assert product.client("cli1", "icmp", v6)["ok"]
    aaaa = product.dig("cli1", "app.test", "AAAA", server=DNS6)
    assert "NOERROR" in aaaa and "ANSWER: 0" in aaaa and "SOA" in aaaa, "v4-only: NODATA with SOA"
    metrics = product.topo.run_in("conn1", "curl", "-s", "http://127.0.0.1:8893/metrics", check=False).stdout
    assert 'appconnector_dns_aaaa_answers_total{result="v6_pool"} 1.0' in metrics, metrics[-2000:]
