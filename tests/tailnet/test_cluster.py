"""Membership decision (both split-brain cases), discovery against real sockets, and the Raft-port
filter with real traffic in network namespaces."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appconnector import config
from appconnector.tailnet.api import NodeInfo
from appconnector.tailnet.cluster import (
    Action,
    Candidate,
    ClusterDiscovery,
    candidates,
    decide,
    probe_tcp,
    render_raft_filter,
)
from appconnector.tailnet.directory import TailnetDirectory
from appconnector.tailnet.localapi import LocalAPIClient
from appconnector.tailnet.settings import TailnetSettings
from tests.tailnet.helpers import TAG, base_state, run, started, wait_for

A = Candidate("nA", "100.100.0.1:6270", True)
B = Candidate("nB", "100.100.0.2:6270", True)
C = Candidate("nC", "100.100.0.3:6270", True)


def test_lowest_online_fresh_node_bootstraps_alone() -> None:
    d = decide("nA", [A, B, C], [], follow_only=False, has_state=False)
    assert d.action is Action.BOOTSTRAP


def test_two_fresh_nodes_only_one_bootstraps() -> None:
    """Split brain 1: two fresh connectors start together; neither answers yet."""
    da = decide("nA", [A, B], [], follow_only=False, has_state=False)
    db = decide("nB", [A, B], [], follow_only=False, has_state=False)
    assert [da.action, db.action].count(Action.BOOTSTRAP) == 1
    assert db.action is Action.WAIT and "nA" in db.reason
    # once A has bootstrapped (its Raft port answers), B joins it
    db = decide("nB", [A, B], [A.raft_addr or ""], follow_only=False, has_state=False)
    assert db.action is Action.JOIN and db.via == (A.raft_addr,)


def test_fresh_node_beside_existing_cluster_joins_even_with_lowest_id() -> None:
    """Split brain 2: a fresh node (lowest StableID) starts while a cluster of B and C runs."""
    d = decide("nA", [A, B, C], [B.raft_addr or "", C.raft_addr or ""], follow_only=False, has_state=False)
    assert d.action is Action.JOIN
    assert d.via == (B.raft_addr, C.raft_addr)


def test_offline_lower_node_does_not_block_bootstrap() -> None:
    a_off = Candidate("nA", A.raft_addr, False)
    assert decide("nB", [a_off, B], [], follow_only=False, has_state=False).action is Action.BOOTSTRAP


def test_follow_only_never_bootstraps_and_state_resumes() -> None:
    assert decide("nA", [A, B], [], follow_only=True, has_state=False).action is Action.WAIT
    assert decide("nA", [A, B], [], follow_only=True, has_state=True).action is Action.RESUME
    # a node with state never bootstraps a fresh cluster, whoever answers
    assert decide("nA", [A], [], follow_only=False, has_state=True).action is Action.RESUME


def test_untagged_self_waits() -> None:
    d = decide("nZ", [A, B], [], follow_only=False, has_state=False)
    assert d.action is Action.WAIT and "cluster.tag" in d.reason


def test_candidates_from_nodes() -> None:
    nodes = [NodeInfo("nB", "b", ("100.100.0.2",), (TAG,)), NodeInfo("nX", "x", ("100.101.0.9",)),
             NodeInfo("nA", "a", ("100.100.0.1",), (TAG, "tag:other"), online=False)]
    assert candidates(nodes, TAG, 6270) == [Candidate("nA", "100.100.0.1:6270", False),
                                            Candidate("nB", "100.100.0.2:6270", True)]


def _free_port() -> int:
    """A TCP port free on both 127.0.0.1 and 127.0.0.2 (the two connectors' "tailnet" addresses)."""
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
            try:
                b.bind(("127.0.0.2", port))
            except OSError:
                continue
            return port


def _two_connectors(self_id: str) -> dict[str, object]:
    return {"self": {"stable_id": self_id, "addresses": ["127.0.0.1" if self_id == "nConnA" else "127.0.0.2"],
                     "tags": [TAG]},
            "peers": [{"stable_id": "nConnB" if self_id == "nConnA" else "nConnA", "tags": [TAG],
                       "addresses": ["127.0.0.2" if self_id == "nConnA" else "127.0.0.1"]}]}


def test_discovery_probes_real_ports(tmp_path: Path) -> None:
    """B (higher StableID) waits while nobody listens, and joins as soon as A's Raft port answers."""
    async def body() -> None:
        port = _free_port()
        sock = str(tmp_path / "b.sock")
        s = await started(sock, _two_connectors("nConnB"))
        d = TailnetDirectory(LocalAPIClient(sock))
        await d.refresh()
        cfg = config.load(None, env={"APPCONNECTOR_CLUSTER_TAG": TAG, "APPCONNECTOR_CLUSTER_RAFT_PORT": str(port),
                                     "APPCONNECTOR_CLUSTER_SECRET_FILE": "/dev/null"})
        disc = ClusterDiscovery(d, TailnetSettings.from_config(cfg), has_state=False, interval=0.05)
        try:
            first = await disc.once()
            assert first.action is Action.WAIT and "nConnA" in first.reason
            task = asyncio.create_task(disc.decide())
            await asyncio.sleep(0.2)
            assert not task.done(), "B must not bootstrap while A (lower StableID) is online"
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            try:
                decision = await asyncio.wait_for(task, 5)
            finally:
                server.close()
            assert decision.action is Action.JOIN and decision.via == (f"127.0.0.1:{port}",)
            assert disc.self_address() == f"127.0.0.2:{port}"
        finally:
            await s.stop()
    run(body())


def test_discovery_lowest_bootstraps_only_when_nobody_answers(tmp_path: Path) -> None:
    """A (lowest StableID, fresh) bootstraps after confirm_rounds silent probes, but joins when B answers."""
    async def body() -> None:
        port = _free_port()
        sock = str(tmp_path / "a.sock")
        s = await started(sock, _two_connectors("nConnA"))
        d = TailnetDirectory(LocalAPIClient(sock))
        await d.refresh()
        cfg = config.load(None, env={"APPCONNECTOR_CLUSTER_TAG": TAG, "APPCONNECTOR_CLUSTER_RAFT_PORT": str(port),
                                     "APPCONNECTOR_CLUSTER_SECRET_FILE": "/dev/null"})
        probes: list[str] = []

        async def counting_probe(addr: str) -> bool:
            probes.append(addr)
            return await probe_tcp(addr, 0.5)

        settings = TailnetSettings.from_config(cfg)
        try:
            decision = await asyncio.wait_for(
                ClusterDiscovery(d, settings, has_state=False, probe=counting_probe, interval=0.05).decide(), 5)
            assert decision.action is Action.BOOTSTRAP
            assert len(probes) >= 2, "a bootstrap decision must hold for two probes in a row"
            # B runs a cluster (its Raft port answers): A, although lowest, joins it
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.2", port)
            try:
                discovery = ClusterDiscovery(d, settings, has_state=False, interval=0.05)
                decision = await asyncio.wait_for(discovery.decide(), 5)
            finally:
                server.close()
            assert decision.action is Action.JOIN and decision.via == (f"127.0.0.2:{port}",)
        finally:
            await s.stop()
    run(body())


# ---- Raft-port filter in network namespaces --------------------------------------------------------

NS = f"actn-{os.getpid() % 100000}"


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def raft_netns() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and nftables")
    if not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("needs iproute2 and nftables")
    names = {"srv": f"{NS}-srv", "tagged": f"{NS}-tag", "untagged": f"{NS}-unt"}
    try:
        for n in names.values():
            _sh("ip", "netns", "add", n)
        for i, peer in enumerate(("tagged", "untagged"), start=1):
            a, b = f"actn{i}s{os.getpid() % 10000}", f"actn{i}p{os.getpid() % 10000}"
            _sh("ip", "link", "add", a, "netns", names["srv"], "type", "veth", "peer", "name", b,
                "netns", names[peer])
            _sh("ip", "-n", names["srv"], "addr", "add", f"100.100.{i}.1/24", "dev", a)
            _sh("ip", "-n", names[peer], "addr", "add", f"100.100.{i}.2/24", "dev", b)
            _sh("ip", "-n", names["srv"], "link", "set", a, "up")
            _sh("ip", "-n", names[peer], "link", "set", b, "up")
        for n in names.values():
            _sh("ip", "-n", n, "link", "set", "lo", "up")
        yield names
    finally:
        for n in names.values():
            _sh("ip", "netns", "del", n, check=False)


def _connects(ns: str, addr: str, port: int) -> bool:
    code = (f"import socket,sys\ns=socket.socket();s.settimeout(1.0)\n"
            f"try:\n s.connect(({addr!r},{port}))\nexcept OSError:\n sys.exit(1)\n")
    return _sh("ip", "netns", "exec", ns, sys.executable, "-c", code, check=False).returncode == 0


def _apply_in(ns: str, port: int, allowed: list[str]) -> None:
    # through the product's own default path (the libnftables binding, or nft), inside ns
    code = ("from appconnector.kernel.nftables import transaction_runner\n"
            "from appconnector.tailnet.cluster import render_raft_filter\n"
            f"transaction_runner()(render_raft_filter({port}, {allowed!r}))")
    res = _sh("ip", "netns", "exec", ns, sys.executable, "-c", code, check=False)
    assert res.returncode == 0, res.stderr


@pytest.mark.root
def test_untagged_peer_cannot_reach_raft_port(raft_netns: dict[str, str]) -> None:
    port = 6270
    srv = raft_netns["srv"]
    listener = subprocess.Popen(
        ["ip", "netns", "exec", srv, sys.executable, "-c",
         f"import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
         f"s.bind(('0.0.0.0',{port}));s.listen(16);print('ready',flush=True)\n"
         "while True:\n c,_=s.accept(); c.close()\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        # before the filter both reach it (the test itself is sound)
        assert _connects(raft_netns["tagged"], "100.100.1.1", port)
        assert _connects(raft_netns["untagged"], "100.100.2.1", port)
        _apply_in(srv, port, ["100.100.1.2"])
        assert _connects(raft_netns["tagged"], "100.100.1.1", port)
        assert not _connects(raft_netns["untagged"], "100.100.2.1", port)
        listing = _sh("ip", "netns", "exec", srv, "nft", "list", "table", "inet", "appconnector_raft").stdout
        dropped = re.search(r"counter packets (\d+) bytes \d+ drop", listing)
        assert dropped is not None and int(dropped.group(1)) > 0, listing  # the refusal is counted
        # the untagged node gets the tag: the refreshed filter lets it in
        _apply_in(srv, port, ["100.100.1.2", "100.100.2.2"])
        assert _connects(raft_netns["untagged"], "100.100.2.1", port)
    finally:
        listener.kill()
        listener.wait()


def test_render_is_one_replacing_transaction() -> None:
    cmds = render_raft_filter(6270, ["100.100.0.2", "100.100.0.1", "100.100.0.2"])
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "appconnector_raft"}}}
    assert cmds[1] == {"delete": {"table": {"family": "inet", "name": "appconnector_raft"}}}
    elems = [c["add"]["element"]["elem"] for c in cmds if "element" in c.get("add", {})]
    assert elems == [["100.100.0.1", "100.100.0.2"]]
    assert not any("element" in c.get("add", {}) for c in render_raft_filter(6270, []))


@pytest.mark.root
def test_raft_filter_refresh_never_blocks_the_event_loop(raft_netns: dict[str, str], tmp_path: Path) -> None:
    """A netmap change re-renders the filter; nftables (slowed here to 1 s a transaction) runs off the
    loop, which keeps answering (DNS shares it), and the new member's address lands in the kernel."""
    import time

    from appconnector.kernel.nftables import nft_cli_apply
    from appconnector.tailnet.cluster import RaftFilter

    srv = raft_netns["srv"]

    def slow_apply(commands: Any) -> None:
        time.sleep(1.0)
        nft_cli_apply(commands, prefix=["ip", "netns", "exec", srv])

    def members() -> str:
        return _sh("ip", "netns", "exec", srv, "nft", "list", "set", "inet", "appconnector_raft", "members4",
                   check=False).stdout

    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state("delta"))
        d = TailnetDirectory(LocalAPIClient(sock), cluster_tag=TAG)
        filt = RaftFilter(6270, apply=slow_apply)
        try:
            await d.start()
            await filt.follow(d, TAG)
            assert "100.100.0.2" in members() and "100.100.0.3" not in members()
            gaps: list[float] = []

            async def ticker() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.02)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            await wait_for(lambda: bool(s._watchers), what="watch connected")
            tick = asyncio.create_task(ticker())
            s.add_peer("nConn3", ["100.100.0.3"], tags=[TAG])
            deadline = time.monotonic() + 15
            while "100.100.0.3" not in members():
                assert time.monotonic() < deadline, "the new member never reached the filter"
                await asyncio.sleep(0.1)
            tick.cancel()
            assert gaps and max(gaps) < 0.5, f"the event loop stalled {max(gaps):.2f}s behind nftables"
        finally:
            await filt.remove()
            await d.stop()
            await s.stop()
    run(body())
