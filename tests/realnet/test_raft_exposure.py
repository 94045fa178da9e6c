"""Nobody on the tailnet runs code on a connector through its Raft port: a real malicious pickle (its
``__reduce__`` creates a marker file) sent from a client to a connector's Raft port must never be
unpickled — neither in a tagged cluster (the Raft-port filter) nor on a single untagged connector with
the shipped defaults (no tag, no cluster secret)."""

from __future__ import annotations

import builtins
import pickle
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realnet.tailnet import POOL, RAFT_PORT, Node, Tailnet, running


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return builtins.open, (self.marker, "w")  # unpickling it creates the marker file


def _send_pickle(client: Node, address: str, marker: Path) -> str:
    """Send the exploit as pysyncobj frames it (4-byte length, zlib'd pickle); what happened."""
    frame = zlib.compress(pickle.dumps(_Exploit(marker)))
    with client.sockets():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(3)
        try:
            s.connect((address, RAFT_PORT))
        except OSError as e:
            return f"not connected ({e})"
        s.sendall(struct.pack("i", len(frame)) + frame)
        s.settimeout(5)
        try:
            while s.recv(4096):  # the member reads the frame, then (with a fix) drops us
                pass
        except OSError as e:
            return f"sent; then {e}"
        return "sent; closed by the connector"


@pytest.fixture(scope="module")
def single(_peers_present: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    """One untagged connector with the shipped cluster defaults (no tag, no secret) and a client."""
    with running(tmp_path_factory.mktemp("realnet-single"), "sg") as net:
        s1 = net.connector("s1", tagged=False)
        net.client("cl1")
        net.wait_online()
        s1.start_appconnector(s1.write_config(cluster_tag="", secret=False))
        net.approve_routes(s1, [POOL])  # autoApprovers cover the tag only: an admin approves it
        yield net


def test_a_pickle_to_a_single_untagged_connector_runs_nothing(single: Tailnet, tmp_path: Path) -> None:
    s1, cl1 = single.nodes["s1"], single.nodes["cl1"]
    marker = tmp_path / "pwned-single"
    assert cl1.pool_address("web.app.test")  # the connector serves this client
    what = _send_pickle(cl1, s1.ip4(), marker)
    assert not marker.exists(), f"a tailnet client ran code on the connector through its Raft port ({what})"
    assert s1.appconnector is not None and s1.appconnector.running()


def test_a_pickle_to_a_cluster_member_runs_nothing(shared: Tailnet, tmp_path: Path) -> None:
    c1, cl1 = shared.nodes["c1"], shared.nodes["cl1"]
    marker = tmp_path / "pwned-cluster"
    what = _send_pickle(cl1, c1.ip4(), marker)
    assert not marker.exists(), f"a tailnet client ran code on a cluster member through its Raft port ({what})"
