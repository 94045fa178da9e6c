"""The LocalAPI stand-in (tests/localapi_standin.py) against real tailscaled: the same calls the product
makes (whois, status, prefs GET and PATCH, watch-ipn-bus with the directory's mask), through the
product's own client, on the same nodes; the JSON types of every field the product reads must agree.
A difference fails here; the stand-in is then fixed (it stays for the fast tier)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from appconnector.tailnet.localapi import DIRECTORY_WATCH_MASK, LocalAPIClient
from tests.localapi_standin import Standin
from tests.realnet.tailnet import Node, Tailnet

# what appconnector/tailnet/ reads (nodeinfo.py, directory.py, identity.py, routes.py, service.py)
NODE_READS = ("ID", "StableID", "Name", "ComputedName", "Hostinfo.Hostname", "Addresses", "Tags", "Online",
              "PrimaryRoutes", "AllowedIPs")
PEER_STATUS_READS = ("ID", "NodeID", "DNSName", "HostName", "TailscaleIPs", "Tags", "Online", "PrimaryRoutes",
                     "AllowedIPs")
STATUS_READS = ("BackendState", "TailscaleIPs", "Self", "Peer")
WHOIS_READS = ("Node", "UserProfile.LoginName", "CapMap")
PREFS_READS = ("AdvertiseRoutes",)


def _type(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, list):
        return "list[" + ",".join(sorted({_type(x) for x in v})) + "]"
    return {str: "str", int: "int", float: "float", dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def shape(doc: Any, paths: tuple[str, ...]) -> dict[str, str]:
    """``{path: JSON type}`` ("absent" when missing) of the fields at ``paths`` (dotted)."""
    out = {}
    for p in paths:
        v: Any = doc
        for part in p.split("."):
            v = v.get(part, KeyError) if isinstance(v, dict) else KeyError
        out[p] = "absent" if v is KeyError else _type(v)
    return out


def status_shape(st: dict[str, Any]) -> dict[str, Any]:
    peers = {p["ID"]: shape(p, PEER_STATUS_READS) for p in (st.get("Peer") or {}).values()}
    return {"top": shape(st, STATUS_READS), "self": shape(st["Self"], PEER_STATUS_READS), "peers": peers,
            "peer_keys": sorted({_type(k) for k in st.get("Peer") or {}})}


def whois_shape(w: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if w is None else {"top": shape(w, WHOIS_READS), "node": shape(w["Node"], NODE_READS)}


def standin_state(real_status: dict[str, Any], login: dict[str, str]) -> dict[str, Any]:
    """The stand-in state that mirrors a real node's view of the tailnet."""
    def node(p: dict[str, Any]) -> dict[str, Any]:
        own = {f"{a}/{128 if ':' in a else 32}" for a in p["TailscaleIPs"]}
        return {"stable_id": p["ID"], "node_id": p["NodeID"], "name": p["HostName"], "addresses": p["TailscaleIPs"],
                "tags": p.get("Tags") or [], "online": bool(p.get("Online")), "login": login.get(p["HostName"], ""),
                "primary_routes": p.get("PrimaryRoutes") or [],
                "approved_routes": [r for r in p.get("AllowedIPs") or [] if r not in own]}
    return {"style": "delta", "version": real_status["Version"], "self": node(real_status["Self"]),
            "peers": [node(p) for p in (real_status.get("Peer") or {}).values()]}


async def collect(api: LocalAPIClient, actions: list[Callable[[], Awaitable[None]]],
                  want: Callable[[list[dict[str, Any]]], bool], timeout: float = 30) -> list[dict[str, Any]]:
    """Watch the IPN bus with the directory's mask, run ``actions`` once it streams, until ``want``."""
    notes: list[dict[str, Any]] = []
    first = asyncio.Event()

    async def watch() -> None:
        stream: AsyncIterator[dict[str, Any]] = api.watch_ipn_bus(DIRECTORY_WATCH_MASK)
        async for n in stream:
            notes.append(n)
            first.set()
    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(first.wait(), timeout)
        for act in actions:
            await act()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not want(notes):
            assert loop.time() < deadline, f"watch did not deliver what was expected: {notes}"
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return notes


def watch_shape(notes: list[dict[str, Any]], peer_id: str) -> dict[str, Any]:
    changed = [p for n in notes for p in n.get("PeersChanged") or () if p.get("StableID") == peer_id]
    prefs = [n["Prefs"] for n in notes if isinstance(n.get("Prefs"), dict)]
    return {"first": shape(notes[0], ("State",)), "peer_changed": shape(changed[-1], NODE_READS),
            "prefs": shape(prefs[-1], PREFS_READS)}


async def _scenario(api: LocalAPIClient, client_ip: str, connector_ip: str, stranger: str, peer_id: str,
                    rename: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    """Every call the product makes, in the product's order, reduced to the types it reads."""
    out: dict[str, Any] = {"status": status_shape(await api.status())}
    out["whois_client"] = whois_shape(await api.whois(client_ip))
    out["whois_connector"] = whois_shape(await api.whois(connector_ip))
    out["whois_stranger"] = await api.whois(stranger)
    prefs = await api.get_prefs()
    routes = list(prefs.get("AdvertiseRoutes") or [])
    out["prefs"] = shape(prefs, PREFS_READS)

    async def add_route() -> None:
        got = await api.patch_prefs({"AdvertiseRoutes": [*routes, "198.51.100.0/26"], "AdvertiseRoutesSet": True})
        out["patched"] = shape(got, PREFS_READS)

    def seen(notes: list[dict[str, Any]]) -> bool:
        return any(p.get("StableID") == peer_id and p.get("Name", "").startswith("renamed")
                   for n in notes for p in n.get("PeersChanged") or ()) and \
            any("198.51.100.0/26" in (n.get("Prefs", {}).get("AdvertiseRoutes") or []) for n in notes)
    try:
        out["watch"] = watch_shape(await collect(api, [rename, add_route], seen), peer_id)
    finally:
        await api.patch_prefs({"AdvertiseRoutes": routes, "AdvertiseRoutesSet": True})
    return out


def test_the_standin_answers_like_real_tailscaled(shared: Tailnet, tmp_path: Path) -> None:
    c1, c2, cl2 = shared.nodes["c1"], shared.nodes["c2"], shared.nodes["cl2"]
    cl2_ip, c2_ip, cl2_id = cl2.ip4(), c2.ip4(), cl2.stable_id()
    stranger = "100.64.3.250"

    async def real() -> tuple[dict[str, Any], dict[str, Any]]:
        api = LocalAPIClient(c1.socket)
        status = await api.status()

        async def rename() -> None:
            await asyncio.to_thread(cl2.cli, "set", "--hostname=renamed-cl2")
        try:
            return status, await _scenario(api, cl2_ip, c2_ip, stranger, cl2_id, rename)
        finally:
            await asyncio.to_thread(cl2.cli, "set", f"--hostname={cl2.name}")

    status, want = asyncio.run(real())
    logins = {n.name: f"{n.user}" for n in shared.nodes.values() if isinstance(n, Node) and not n.tags}

    async def fake() -> dict[str, Any]:
        state = standin_state(status, logins)
        state["prefs"] = {"AdvertiseRoutes": (await LocalAPIClient(c1.socket).get_prefs()).get("AdvertiseRoutes")}
        s = Standin(str(tmp_path / "standin.sock"), state)
        await s.start()
        try:
            async def rename() -> None:
                renamed = {**state, "peers": [{**p, "name": "renamed-cl2"} if p["stable_id"] == cl2_id else p
                                              for p in state["peers"]]}
                s.load_state(renamed)
            return await _scenario(LocalAPIClient(s.socket_path), cl2_ip, c2_ip, stranger, cl2_id, rename)
        finally:
            await s.stop()

    got = asyncio.run(fake())
    for key in want:
        assert got[key] == want[key], f"{key}: stand-in {got[key]} != real tailscaled {want[key]}"
