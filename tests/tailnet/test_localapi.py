"""The LocalAPI client against the stand-in over a real unix socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from appconnector.tailnet.api import TailnetUnavailable
from appconnector.tailnet.localapi import (
    NOTIFY_INITIAL_NETMAP,
    NOTIFY_INITIAL_STATE,
    NOTIFY_PEER_CHANGES,
    NOTIFY_RATE_LIMIT,
    LocalAPIClient,
    LocalAPIError,
    whois_addr,
)
from tests.localapi_standin import get_state, set_state
from tests.tailnet.helpers import TAG, base_state, run, started


def test_whois_known_and_stranger(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state())
        try:
            c = LocalAPIClient(sock)
            resp = await c.whois("100.101.0.10")
            assert resp is not None
            assert resp["Node"]["StableID"] == "nClientA"
            assert resp["Node"]["Addresses"] == ["100.101.0.10/32"]
            assert "LoginName" in resp["UserProfile"]
            assert await c.whois("100.101.0.99") is None  # 404 "no match"
            # the client sends ip:port, which every tailscaled version parses
            assert any("addr=100.101.0.10%3A0" in path for _, path in s.requests)
        finally:
            await s.stop()
    run(body())


def test_whois_addr_forms() -> None:
    assert whois_addr("100.64.0.1") == "100.64.0.1:0"
    assert whois_addr("fd7a:115c:a1e0::1") == "[fd7a:115c:a1e0::1]:0"
    assert whois_addr("100.64.0.1:53") == "100.64.0.1:53"


def test_host_header_is_checked(tmp_path: Path) -> None:
    """tailscaled refuses requests whose Host is not local-tailscaled.sock; our client passes."""
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state())
        try:
            r, w = await asyncio.open_unix_connection(sock)
            w.write(b"GET /localapi/v0/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            await w.drain()
            raw = await r.read()
            w.close()
            assert raw.startswith(b"HTTP/1.1 403")
            assert b"invalid localapi request" in raw
            st = await LocalAPIClient(sock).status()
            assert st["Self"]["ID"] == "nConn1"
        finally:
            await s.stop()
    run(body())


def test_status_fields(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state())
        try:
            st = await LocalAPIClient(sock).status()
            peers = {p["ID"]: p for p in st["Peer"].values()}
            assert set(peers) == {"nClientA", "nConn2"}
            assert peers["nConn2"]["Tags"] == [TAG]
            assert "Tags" not in peers["nClientA"]          # omitted when empty, as Go does
            assert peers["nConn2"]["TailscaleIPs"] == ["100.100.0.2"]
            assert all(k.startswith("nodekey:") for k in st["Peer"])
        finally:
            await s.stop()
    run(body())


def test_prefs_get_and_patch(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state())
        try:
            c = LocalAPIClient(sock)
            prefs = await c.get_prefs()
            assert prefs["AdvertiseRoutes"] is None
            out = await c.patch_prefs({"AdvertiseRoutes": ["10.0.0.0/24"], "AdvertiseRoutesSet": True})
            assert out["AdvertiseRoutes"] == ["10.0.0.0/24"]
            # without the Set flag the field is ignored, as ipn.MaskedPrefs does
            out = await c.patch_prefs({"AdvertiseRoutes": ["10.1.0.0/24"]})
            assert out["AdvertiseRoutes"] == ["10.0.0.0/24"]
        finally:
            await s.stop()
    run(body())


def test_unavailable_when_socket_missing(tmp_path: Path) -> None:
    async def body() -> None:
        c = LocalAPIClient(str(tmp_path / "absent.sock"), timeout=1.0)
        with pytest.raises(TailnetUnavailable):
            await c.status()
        with pytest.raises(TailnetUnavailable):
            await c.whois("100.64.0.1")
    run(body())


def test_bad_mask_is_a_client_error(tmp_path: Path) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state("delta"))
        try:
            c = LocalAPIClient(sock)
            with pytest.raises(LocalAPIError) as ei:
                async for _ in c.watch_ipn_bus(NOTIFY_RATE_LIMIT | NOTIFY_PEER_CHANGES):
                    pass
            assert ei.value.status == 400
        finally:
            await s.stop()
    run(body())


@pytest.mark.parametrize("style", ["netmap", "delta"])
def test_watch_streams_notifications(tmp_path: Path, style: str) -> None:
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        s = await started(sock, base_state(style))
        try:
            c = LocalAPIClient(sock)
            got: list[dict[str, Any]] = []
            agen = c.watch_ipn_bus(NOTIFY_INITIAL_STATE | NOTIFY_INITIAL_NETMAP | NOTIFY_PEER_CHANGES)
            first = await asyncio.wait_for(agen.__anext__(), 5)
            assert first["State"] == 6 and "NetMap" in first
            assert "ErrMessage" not in first  # Go's nulls are dropped by the client
            removed_id = s.add_peer("nClientB", ["100.101.0.11"]).node_id
            got.append(await asyncio.wait_for(agen.__anext__(), 5))
            s.remove_peer("nClientB")
            got.append(await asyncio.wait_for(agen.__anext__(), 5))
            await agen.aclose()
            if style == "netmap":
                ids = [{p["StableID"] for p in n["NetMap"]["Peers"]} for n in got]
                assert "nClientB" in ids[0] and "nClientB" not in ids[1]
            else:
                assert [p["StableID"] for p in got[0]["PeersChanged"]] == ["nClientB"]
                assert got[1]["PeersRemoved"] == [removed_id]
                assert "NetMap" not in got[1]
        finally:
            await s.stop()
    run(body())


def test_standin_separate_process(tmp_path: Path) -> None:
    """The stand-in runs as its own process with a state file (multi-process tests use it so)."""
    async def body() -> None:
        sock = str(tmp_path / "ts.sock")
        state = tmp_path / "state.json"
        state.write_text(json.dumps(base_state("delta")))
        proc = await asyncio.create_subprocess_exec(
            "python3", str(Path(__file__).parents[1] / "localapi_standin.py"), "--socket", sock, "--state", str(state),
            stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert b"listening" in line
            c = LocalAPIClient(sock)
            assert (await c.whois("100.100.0.2") or {})["Node"]["Tags"] == [TAG]
            # control path: replace the state; the stranger becomes known
            doc = base_state("delta")
            doc["peers"].append({"stable_id": "nNew", "addresses": ["100.101.0.50"]})
            await asyncio.to_thread(set_state, sock, doc)
            assert [p["stable_id"] for p in (await asyncio.to_thread(get_state, sock))["peers"]][-1] == "nNew"
            assert (await c.whois("100.101.0.50") or {})["Node"]["StableID"] == "nNew"
        finally:
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 10) == 0
    run(body())
