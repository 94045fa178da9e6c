"""The one tailscaled stand-in: a real HTTP/1.1 server on a unix socket speaking the LocalAPI.

tailscaled cannot be installed in CI, so tests talk to this instead. It follows tailscale/tailscale
``ipn/localapi`` where our code depends on it:

* every request must carry ``Host: local-tailscaled.sock`` (or no Host): anything else gets
  403 "invalid localapi request"; unknown paths get 404;
* ``GET /localapi/v0/whois?addr=IP[:PORT]`` → ``{"Node": tailcfg.Node, "UserProfile": ..., "CapMap": ...}``
  (``Tags`` omitted when empty; tests/realnet/test_conformance.py checks these shapes against tailscaled).
  ``CapMap`` is ``apitype.WhoIsResponse.CapMap`` (tailscale/tailscale client/tailscale/apitype/apitype.go),
  a ``tailcfg.PeerCapMap``: capability name → JSON array of the raw JSON values the grants give the
  source towards this node (state key ``capmap`` per node); ``null`` when there are none, as tailscaled
  sends it (tests/realnet/test_grants.py sees a headscale grant value arrive verbatim in that array),
  404 "no match for IP:port" for strangers, 400 for a bad or missing ``addr``;
* ``GET /localapi/v0/status`` → ``ipnstate.Status`` with ``Self`` and ``Peer`` keyed by node key; each
  ``PeerStatus`` has ``ID`` (StableID), ``NodeID``, ``HostName``, ``DNSName``, ``TailscaleIPs``,
  ``Tags`` (omitted when empty), ``Online``;
* subnet routes (tailscale/tailscale ``ipn/ipnstate/ipnstate.go`` ``PeerStatus``, ``tailcfg/tailcfg.go``
  ``Node``; filled in ``ipn/ipnlocal/local.go`` ``peerStatusFromNode`` for Self and peers alike):
  ``PrimaryRoutes`` (prefixes this node is the primary subnet router for, as the control plane decided;
  omitted when empty) and ``AllowedIPs`` (the node's own addresses as /32 and /128 plus the routes
  routed to it; a ``PeerStatus`` omits it when empty). headscale puts only primary routes in both;
  Tailscale's control puts every approved route in ``AllowedIPs``. With state ``"auto_approve":
  [prefixes]`` (headscale's ``autoApprovers``) an advertised route of this node in that list becomes
  approved and primary at once, and leaves both when withdrawn; in the delta style the watchers get a
  ``SelfChange`` (the self ``tailcfg.Node``), in the netmap style a ``NetMap``. (headscale 0.29.2 itself
  never updates a node's own routes for a route it advertised while connected: only its peers see
  them, checked on the real tier; ``set_routes`` on a peer models that view);
* ``GET /localapi/v0/prefs`` → prefs (``AdvertiseRoutes`` is ``null`` when empty, as Go encodes a nil
  slice); ``PATCH`` takes ``ipn.MaskedPrefs``: a field changes only when its ``<Field>Set`` is true,
  and then it is copied as given (so ``AdvertiseRoutesSet`` with a partial list wipes the rest);
  with state ``"prefs_write": false`` a PATCH gets 403 "prefs write access denied", as tailscaled
  answers a LocalAPI user without write access;
* ``GET /localapi/v0/watch-ipn-bus?mask=N`` streams one ``ipn.Notify`` JSON per line, chunked, with
  the Go encoder's ``null`` fields. Initial message per the mask bits (InitialState, InitialPrefs,
  InitialNetMap, InitialStatus). On a peer change: ``style="netmap"`` (tailscaled ≤1.96) sends the
  whole ``NetMap``; ``style="delta"`` (≥1.100) sends ``PeersChanged`` (full nodes) / ``PeersRemoved``
  (numeric NodeIDs) when the mask has NotifyPeerChanges (1<<12), else an empty Notify. Prefs changes
  send ``Prefs``. NotifyRateLimit with a peer-change bit is refused with 400, as ≥1.100 does.

Test-only control paths (not tailscaled's) on the same socket, for separate-process use:
``GET /standin/v0/state`` (the state below), ``PUT /standin/v0/state`` (replace it; watchers are told),
``GET /standin/v0/requests`` (a log of ``[method, path]`` served).

State (JSON file or dict)::

    {"self":  {"stable_id": "nSELF", "node_id": 1, "name": "conn-1", "addresses": ["100.100.0.1"],
               "tags": ["tag:appconnector"], "online": true, "login": "tagged-devices",
               "primary_routes": ["100.64.1.0/24"], "approved_routes": ["100.64.1.0/24"]},
     "peers": [ same shape ... ],
     "auto_approve": ["100.64.1.0/24"],
     "prefs": {"AdvertiseRoutes": ["10.9.0.0/24"]},
     "style": "netmap" | "delta",
     "version": "1.96.0"}

In-process (pytest)::

    standin = Standin(socket_path, state)      # state: the dict above (all keys optional)
    await standin.start(); ...; await standin.stop()
    standin.add_peer(stable_id=..., addresses=[...], tags=[...]); standin.remove_peer(stable_id)
    standin.set_peer(stable_id, online=False, tags=[...]); standin.prefs; standin.requests

Separate process::

    python tests/localapi_standin.py --socket /tmp/x.sock --state state.json
    set_state("/tmp/x.sock", {...}); get_state("/tmp/x.sock")   # from any process (blocking helpers)

Peers added without ``node_id`` get the next free one; ``addresses`` are IPs (IPv4 and/or IPv6).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import ipaddress
import json
import os
import signal
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCALAPI_HOST = "local-tailscaled.sock"
NOTIFY_INITIAL_STATE = 1 << 1
NOTIFY_INITIAL_PREFS = 1 << 2
NOTIFY_INITIAL_NETMAP = 1 << 3
NOTIFY_RATE_LIMIT = 1 << 8
NOTIFY_PEER_CHANGES = 1 << 12
NOTIFY_NO_NETMAP = 1 << 13
NOTIFY_INITIAL_STATUS = 1 << 14
NOTIFY_PEER_PATCHES = 1 << 15
_NEW_STYLE_BITS = NOTIFY_PEER_CHANGES | NOTIFY_NO_NETMAP | NOTIFY_INITIAL_STATUS | NOTIFY_PEER_PATCHES

_DEFAULT_PREFS: dict[str, Any] = {
    "ControlURL": "https://controlplane.tailscale.com", "RouteAll": False, "ExitNodeID": "",
    "CorpDNS": True, "WantRunning": True, "ShieldsUp": False, "AdvertiseTags": None,
    "Hostname": "", "AdvertiseRoutes": None, "NoSNAT": False, "NetfilterMode": 2,
}
# Notify fields the Go encoder always writes (no omitempty): we send them as null like tailscaled.
_NOTIFY_NULLS = ("ErrMessage", "LoginFinished", "State", "Prefs", "NetMap", "Engine", "BrowseToURL")


@dataclass
class Node:
    stable_id: str
    node_id: int
    name: str
    addresses: list[str]
    tags: list[str] = field(default_factory=list)
    online: bool = True
    login: str = ""
    primary_routes: list[str] = field(default_factory=list)
    approved_routes: list[str] = field(default_factory=list)  # besides the primary ones
    capmap: dict[str, list[Any]] = field(default_factory=dict)  # whois CapMap: capability → raw values

    @property
    def key(self) -> str:
        return "nodekey:" + hashlib.sha256(self.stable_id.encode()).hexdigest()

    def fqdn(self) -> str:
        return f"{self.name}.tailnet-test.ts.net."

    def login_name(self) -> str:
        return self.login or ("tagged-devices" if self.tags else f"{self.name}@example.com")

    def user_id(self) -> int:
        return 1000 + (int(hashlib.sha256(self.login_name().encode()).hexdigest()[:6], 16))

    def prefixes(self) -> list[str]:
        return [f"{a}/{32 if ipaddress.ip_address(a).version == 4 else 128}" for a in self.addresses]

    def allowed_ips(self) -> list[str]:
        """``AllowedIPs``: own addresses, then the routes routed to this node."""
        routes = [*self.primary_routes, *(r for r in self.approved_routes if r not in self.primary_routes)]
        return [*self.prefixes(), *routes]

    def tailcfg_node(self) -> dict[str, Any]:
        """``tailcfg.Node`` as JSON (the fields our code may read, plus a few for realism)."""
        prefixes = self.prefixes()
        node: dict[str, Any] = {
            "ID": self.node_id, "StableID": self.stable_id, "Name": self.fqdn(), "User": self.user_id(),
            "Key": self.key, "KeyExpiry": "0001-01-01T00:00:00Z", "Machine": "mkey:" + "0" * 64,
            "DiscoKey": "discokey:" + "0" * 64, "Addresses": prefixes, "AllowedIPs": self.allowed_ips(),
            "Endpoints": None, "Hostinfo": {"Hostname": self.name, "OS": "linux"},
            "Created": "2026-01-01T00:00:00Z", "Online": self.online,
            "MachineAuthorized": True, "ComputedName": self.name, "ComputedNameWithHost": self.name,
            **({"Tags": list(self.tags)} if self.tags else {}),  # omitempty, as real tailscaled sends it
        }
        if self.primary_routes:  # `json:",omitempty"`
            node["PrimaryRoutes"] = list(self.primary_routes)
        return node

    def peer_status(self) -> dict[str, Any]:
        """``ipnstate.PeerStatus`` as JSON."""
        st: dict[str, Any] = {
            "ID": self.stable_id, "NodeID": self.node_id, "PublicKey": self.key, "HostName": self.name,
            "DNSName": self.fqdn(), "OS": "linux", "UserID": self.user_id(), "TailscaleIPs": list(self.addresses),
            "Addrs": None, "CurAddr": "", "Relay": "", "RxBytes": 0, "TxBytes": 0,
            "Created": "2026-01-01T00:00:00Z", "LastWrite": "0001-01-01T00:00:00Z",
            "LastSeen": "0001-01-01T00:00:00Z", "LastHandshake": "0001-01-01T00:00:00Z",
            "Online": self.online, "ExitNode": False, "ExitNodeOption": False, "Active": False,
            "InNetworkMap": True, "InMagicSock": True, "InEngine": True,
        }
        if self.tags:
            st["Tags"] = list(self.tags)
        if self.primary_routes:  # both `json:",omitempty"`
            st["PrimaryRoutes"] = list(self.primary_routes)
        st["AllowedIPs"] = self.allowed_ips()
        return st


def node_from_dict(d: dict[str, Any], node_id: int) -> Node:
    return Node(stable_id=str(d["stable_id"]), node_id=int(d.get("node_id") or node_id),
                name=str(d.get("name") or d["stable_id"]), addresses=[str(a) for a in d.get("addresses", [])],
                tags=[str(t) for t in d.get("tags", [])], online=bool(d.get("online", True)),
                login=str(d.get("login", "")), primary_routes=[str(r) for r in d.get("primary_routes", [])],
                approved_routes=[str(r) for r in d.get("approved_routes", [])],
                capmap={str(k): list(v) for k, v in (d.get("capmap") or {}).items()})


def node_to_dict(n: Node) -> dict[str, Any]:
    return {"stable_id": n.stable_id, "node_id": n.node_id, "name": n.name, "addresses": n.addresses,
            "tags": n.tags, "online": n.online, "login": n.login, "primary_routes": n.primary_routes,
            "approved_routes": n.approved_routes, "capmap": n.capmap}


class _Watcher:
    def __init__(self, mask: int) -> None:
        self.mask = mask
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()


class Standin:
    """tailscaled's LocalAPI on ``socket_path``. Mutators notify open watchers at once."""

    def __init__(self, socket_path: str, state: dict[str, Any] | None = None) -> None:
        self.socket_path = socket_path
        self.requests: list[tuple[str, str]] = []
        self._server: asyncio.Server | None = None
        self._watchers: set[_Watcher] = set()
        self._conns: set[asyncio.Task[None]] = set()
        self.load_state(state or {}, notify=False)

    # ---- state ----------------------------------------------------------------------------------

    def load_state(self, state: dict[str, Any], notify: bool = True) -> None:
        self.style: str = str(state.get("style", "netmap"))
        if self.style not in ("netmap", "delta"):
            raise ValueError(f"style must be 'netmap' or 'delta', not {self.style!r}")
        self.version: str = str(state.get("version", "1.96.0" if self.style == "netmap" else "1.100.0"))
        old_self: Node | None = getattr(self, "self_node", None)
        self.self_node = node_from_dict(state.get("self") or {"stable_id": "nSELF", "name": "connector",
                                                             "addresses": ["100.100.0.1"]}, 1)
        old = dict(getattr(self, "peers", {}))
        self.peers: dict[str, Node] = {}
        for i, p in enumerate(state.get("peers", [])):
            n = node_from_dict(p, 100 + i)
            self.peers[n.stable_id] = n
        prefs = copy.deepcopy(_DEFAULT_PREFS)
        prefs.update(state.get("prefs") or {})
        self.prefs: dict[str, Any] = prefs
        self.prefs_write = bool(state.get("prefs_write", True))
        self.auto_approve: list[str] = [str(p) for p in state.get("auto_approve", [])]
        self._auto_approve()
        if notify:
            removed = [n.node_id for sid, n in old.items() if sid not in self.peers]
            changed = [n for sid, n in self.peers.items() if old.get(sid) != n]
            self._notify_peers(changed, removed, self.self_node if old_self != self.self_node else None)

    def dump_state(self) -> dict[str, Any]:
        return {"self": node_to_dict(self.self_node), "peers": [node_to_dict(n) for n in self.peers.values()],
                "prefs": self.prefs, "style": self.style, "version": self.version, "auto_approve": self.auto_approve}

    def _auto_approve(self) -> bool:
        """headscale's autoApprovers for this node: advertised routes in ``auto_approve`` are approved and
        primary, withdrawn ones are neither. True when that changed anything."""
        if not self.auto_approve:
            return False
        advertised = self.prefs.get("AdvertiseRoutes") or []
        me = self.self_node
        primary = [r for r in advertised if r in self.auto_approve]
        kept = [r for r in me.primary_routes if r not in self.auto_approve]
        new = [*kept, *(r for r in primary if r not in kept)]
        if new == me.primary_routes:
            return False
        me.primary_routes = new
        me.approved_routes = [r for r in me.approved_routes if r not in self.auto_approve or r in advertised]
        return True

    def set_routes(self, stable_id: str, primary: list[str], approved: list[str] | None = None) -> None:
        """The control plane made ``stable_id`` the primary router for ``primary`` (and approved ``approved``)."""
        n = self.self_node if stable_id == self.self_node.stable_id else self.peers[stable_id]
        n.primary_routes, n.approved_routes = list(primary), list(approved or [])
        if n is self.self_node:
            self._notify_peers([], [], self.self_node)
        else:
            self._notify_peers([n], [])

    def add_peer(self, stable_id: str, addresses: list[str], tags: list[str] | None = None,
                 online: bool = True, name: str = "", node_id: int = 0, login: str = "") -> Node:
        used = {n.node_id for n in self.peers.values()} | {self.self_node.node_id}
        nid = node_id or max(used | {99}) + 1
        n = Node(stable_id, nid, name or stable_id, list(addresses), list(tags or []), online, login)
        self.peers[stable_id] = n
        self._notify_peers([n], [])
        return n

    def set_peer(self, stable_id: str, *, online: bool | None = None, tags: list[str] | None = None,
                 addresses: list[str] | None = None) -> None:
        n = self.peers[stable_id]
        if online is not None:
            n.online = online
        if tags is not None:
            n.tags = list(tags)
        if addresses is not None:
            n.addresses = list(addresses)
        self._notify_peers([n], [])

    def set_capmap(self, stable_id: str, capmap: dict[str, list[Any]]) -> None:
        """Grants changed: the whois CapMap of a peer. Like tailscaled on a packet filter change, no
        peer notification goes out (the connector must ask whois again on its own)."""
        self.peers[stable_id].capmap = {k: list(v) for k, v in capmap.items()}

    def remove_peer(self, stable_id: str) -> None:
        n = self.peers.pop(stable_id)
        self._notify_peers([], [n.node_id])

    def _all_nodes(self) -> list[Node]:
        return [self.self_node, *self.peers.values()]

    def _find_ip(self, ip: str) -> Node | None:
        for n in self._all_nodes():
            if ip in n.addresses:
                return n
        return None

    # ---- documents ------------------------------------------------------------------------------

    def status_doc(self) -> dict[str, Any]:
        return {
            "Version": self.version, "TUN": True, "BackendState": "Running", "HaveNodeKey": True,
            "AuthURL": "", "TailscaleIPs": list(self.self_node.addresses), "Self": self.self_node.peer_status(),
            "Health": [], "MagicDNSSuffix": "tailnet-test.ts.net",
            "CurrentTailnet": {"Name": "example.com", "MagicDNSSuffix": "tailnet-test.ts.net",
                               "MagicDNSEnabled": True},
            "CertDomains": None, "Peer": {n.key: n.peer_status() for n in self.peers.values()},
            "User": {}, "ClientVersion": None,
        }

    def netmap_doc(self) -> dict[str, Any]:
        return {"SelfNode": self.self_node.tailcfg_node(), "NodeKey": self.self_node.key,
                "Peers": [n.tailcfg_node() for n in self.peers.values()], "Domain": "example.com"}

    def _notify(self, **fields: Any) -> dict[str, Any]:
        n: dict[str, Any] = {"Version": self.version}
        n.update({k: None for k in _NOTIFY_NULLS})
        n.update(fields)
        return n

    def _notify_peers(self, changed: list[Node], removed: list[int], self_change: Node | None = None) -> None:
        for w in list(self._watchers):
            if self.style == "netmap":
                w.queue.put_nowait(self._notify(NetMap=self.netmap_doc()))
            elif w.mask & (NOTIFY_PEER_CHANGES | NOTIFY_PEER_PATCHES):
                fields: dict[str, Any] = {}
                if changed:
                    fields["PeersChanged"] = [n.tailcfg_node() for n in changed]
                if removed:
                    fields["PeersRemoved"] = removed
                if self_change is not None:  # ≥1.100 tells a change of this node as SelfChange
                    fields["SelfChange"] = self_change.tailcfg_node()
                w.queue.put_nowait(self._notify(**fields))
            else:
                w.queue.put_nowait(self._notify())

    def _notify_prefs(self) -> None:
        for w in list(self._watchers):
            w.queue.put_nowait(self._notify(Prefs=copy.deepcopy(self.prefs)))

    # ---- server ---------------------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        self._server = await asyncio.start_unix_server(self._serve_conn, self.socket_path)

    async def stop(self) -> None:
        for w in list(self._watchers):
            w.queue.put_nowait(None)
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def drop_watchers(self) -> None:
        """Close every watch stream (as a tailscaled restart would)."""
        for w in list(self._watchers):
            w.queue.put_nowait(None)

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    k, sep, v = line.partition(":")
                    if sep:
                        headers[k.strip().lower()] = v.strip()
                body = b""
                if n := int(headers.get("content-length", "0") or 0):
                    body = await reader.readexactly(n)
                keep = await self._handle(method, target, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except asyncio.CancelledError:
            pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes,
                      writer: asyncio.StreamWriter) -> bool:
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.requests.append((method, target))
        host = headers.get("host", "")
        if host not in ("", LOCALAPI_HOST) or headers.get("origin") or headers.get("referer"):
            return self._text(writer, 403, "invalid localapi request")
        path = url.path
        if path == "/localapi/v0/whois" and method == "GET":
            return self._whois(writer, query.get("addr", ""))
        if path == "/localapi/v0/status" and method == "GET":
            return self._json(writer, 200, self.status_doc())
        if path == "/localapi/v0/prefs":
            return self._prefs(writer, method, body)
        if path == "/localapi/v0/watch-ipn-bus" and method == "GET":
            await self._watch(writer, query.get("mask", "0"))
            return False
        if path == "/standin/v0/state":
            if method == "PUT":
                try:
                    self.load_state(json.loads(body))
                except (ValueError, KeyError, TypeError) as e:
                    return self._text(writer, 400, f"bad state: {e}")
                self._notify_prefs()
            return self._json(writer, 200, self.dump_state())
        if path == "/standin/v0/requests":
            return self._json(writer, 200, {"requests": self.requests})
        if path.startswith("/localapi/v0/"):
            return self._text(writer, 404, "404 page not found")
        return self._text(writer, 404, "404 page not found")

    def _whois(self, writer: asyncio.StreamWriter, addr: str) -> bool:
        if not addr:
            return self._text(writer, 400, "missing 'addr' parameter")
        try:
            ip = str(ipaddress.ip_address(addr))
        except ValueError:
            host, sep, port = addr.rpartition(":")
            try:
                if not sep or not port.isdigit():
                    raise ValueError(addr)
                ip = str(ipaddress.ip_address(host.strip("[]")))
            except ValueError:
                return self._text(writer, 400, "invalid 'addr' parameter")
        n = self._find_ip(ip)
        if n is None:
            return self._text(writer, 404, "no match for IP:port")
        profile = {"ID": n.user_id(), "LoginName": n.login_name(), "DisplayName": n.name, "ProfilePicURL": ""}
        # a node without peer capabilities has "CapMap": null, as real tailscaled answers
        return self._json(writer, 200, {"Node": n.tailcfg_node(), "UserProfile": profile,
                                        "CapMap": dict(n.capmap) or None})

    def _prefs(self, writer: asyncio.StreamWriter, method: str, body: bytes) -> bool:
        if method == "PATCH":
            if not self.prefs_write:
                return self._text(writer, 403, "prefs write access denied")
            try:
                masked = json.loads(body)
                if not isinstance(masked, dict):
                    raise ValueError("not an object")
            except ValueError as e:
                return self._text(writer, 400, str(e))
            changed = False
            for key, value in masked.items():
                if key.endswith("Set") and value is True and key[:-3] in masked:
                    self.prefs[key[:-3]] = copy.deepcopy(masked[key[:-3]])
                    changed = True
                elif key.endswith("Set") and value is True:
                    self.prefs[key[:-3]] = None  # MaskedPrefs copies the zero value when the field is absent
                    changed = True
            if changed:
                self._notify_prefs()
                if self._auto_approve():
                    self._notify_peers([], [], self.self_node)
        elif method not in ("GET", "HEAD"):
            return self._text(writer, 405, "unsupported method")
        return self._json(writer, 200, self.prefs, indent=True)

    async def _watch(self, writer: asyncio.StreamWriter, mask_s: str) -> None:
        if not mask_s.isdigit():
            self._text(writer, 400, "bad mask")
            return
        mask = int(mask_s)
        if mask & NOTIFY_RATE_LIMIT and mask & _NEW_STYLE_BITS:
            self._text(writer, 400, "NotifyRateLimit is incompatible with new-style IPN bus subscription bits")
            return
        w = _Watcher(mask)
        first: dict[str, Any] = {}
        if mask & NOTIFY_INITIAL_STATE:
            first["State"] = 6
            first["SessionID"] = "standin-session"
        if mask & NOTIFY_INITIAL_PREFS:
            first["Prefs"] = copy.deepcopy(self.prefs)
        if mask & NOTIFY_INITIAL_NETMAP:
            first["NetMap"] = self.netmap_doc()
        if mask & NOTIFY_INITIAL_STATUS and self.style == "delta":
            first["InitialStatus"] = self.status_doc()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        self._watchers.add(w)
        try:
            msg: dict[str, Any] | None = self._notify(**first) if first else None
            while True:
                if msg is not None:
                    data = json.dumps(msg).encode() + b"\n"
                    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    await writer.drain()
                msg = await w.queue.get()
                if msg is None:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    return
        finally:
            self._watchers.discard(w)

    @staticmethod
    def _write(writer: asyncio.StreamWriter, status: int, ctype: str, data: bytes) -> bool:
        reason = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
                  405: "Method Not Allowed"}.get(status, "Error")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(data)}\r\nTailscale-Version: standin\r\n\r\n".encode() + data)
        return True

    def _text(self, writer: asyncio.StreamWriter, status: int, text: str) -> bool:
        return self._write(writer, status, "text/plain; charset=utf-8", (text + "\n").encode())

    def _json(self, writer: asyncio.StreamWriter, status: int, doc: Any, indent: bool = False) -> bool:
        data = json.dumps(doc, indent="\t" if indent else None).encode() + b"\n"
        return self._write(writer, status, "application/json", data)


def _control(socket_path: str, method: str, body: bytes = b"") -> dict[str, Any]:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(socket_path)
        s.sendall(f"{method} /standin/v0/state HTTP/1.1\r\nHost: {LOCALAPI_HOST}\r\nConnection: close\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stand-in refused {method}: {data[:200]!r}")
    doc: dict[str, Any] = json.loads(payload)
    return doc


def get_state(socket_path: str) -> dict[str, Any]:
    """The state of a running stand-in (in this or another process)."""
    return _control(socket_path, "GET")


def set_state(socket_path: str, state: dict[str, Any]) -> dict[str, Any]:
    """Replace a running stand-in's state; its watchers get the netmap change. Blocking: from async
    code in the stand-in's own process, use ``Standin.load_state`` instead."""
    return _control(socket_path, "PUT", json.dumps(state).encode())


async def _main(socket_path: str, state_file: str | None) -> None:
    state = json.loads(Path(state_file).read_text()) if state_file else {}
    standin = Standin(socket_path, state)
    await standin.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"localapi stand-in listening on {socket_path}", flush=True)
    await stop.wait()
    await standin.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="tailscaled LocalAPI stand-in for tests")
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    ap.add_argument("--state", help="JSON state file (see the module docstring)")
    args = ap.parse_args()
    asyncio.run(_main(args.socket, args.state))
