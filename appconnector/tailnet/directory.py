"""``TailnetDirectory``: the node list from LocalAPI status, kept current by the IPN bus watch.

Both notification styles are handled (docs/design.md §10):
* tailscaled ≤1.96 sends the whole ``NetMap`` (``SelfNode`` + ``Peers``) on every change;
* ≥1.100 sends ``PeersChanged`` (full nodes, upsert) and ``PeersRemoved`` (numeric NodeIDs) because we
  ask for NotifyPeerChanges; anything we cannot apply exactly (an unknown NodeID, a patch, an empty
  notification from a version in between) triggers a fresh ``status`` instead. A ≥1.100 tailscaled
  delivers every peer change to such a watcher that way (patches promoted to full nodes), so its
  notifications without peer fields (only ``Version``, or ``UserProfiles``; it sends them around every
  change) are skipped, not answered with a full status read.
Once the watch is connected (its first notification) ``status`` is read again (changes made before it
connected were never sent, e.g. a route approval right after we advertise), on every reconnect too,
and a slow periodic resync does the same, so the list converges whatever tailscaled sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

from appconnector.metrics import TAILNET_PEERS
from appconnector.tailnet.api import NodeInfo, TailnetUnavailable
from appconnector.tailnet.localapi import DIRECTORY_WATCH_MASK, NOTIFY_PEER_CHANGES, LocalAPIClient, LocalAPIError
from appconnector.tailnet.nodeinfo import from_peer_status, from_tailcfg_node, numeric_id

log = logging.getLogger(__name__)

_PEER_FIELDS = ("NetMap", "PeersChanged", "PeersRemoved", "PeerChangedPatch", "SelfChange", "InitialStatus")


def sends_peer_deltas(version: Any) -> bool:
    """Whether a tailscaled of this ``Version`` (e.g. "1.102.3-t…") honours NotifyPeerChanges (≥1.100)."""
    m = re.match(r"(\d+)\.(\d+)\.", str(version or ""))
    return m is not None and (int(m[1]), int(m[2])) >= (1, 100)


class TailnetDirectory:
    """Implements ``NodeDirectory``. ``start()`` reads status once (raises TailnetUnavailable if
    tailscaled is not there) and starts the watch; ``stop()`` ends it."""

    def __init__(self, client: LocalAPIClient, cluster_tag: str = "", resync_interval: float = 300.0,
                 retry_interval: float = 1.0) -> None:
        self.client = client
        self.cluster_tag = cluster_tag
        self.resync_interval = resync_interval
        self.retry_interval = retry_interval
        self._nodes: dict[str, NodeInfo] = {}
        self._by_numeric: dict[int, str] = {}
        self._self: NodeInfo | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._prefs_callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()  # the watch and the resync must not apply statuses out of order
        self._watch_asks_deltas = False  # set once our own watch (mask with NotifyPeerChanges) runs
        self.generation = 0  # bumped on every change: tests and the identity cache wait on it

    # ---- NodeDirectory --------------------------------------------------------------------------

    def nodes(self) -> dict[str, NodeInfo]:
        return dict(self._nodes)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    # ---- extras the cluster and identity parts use ---------------------------------------------------

    def subscribe_prefs(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(prefs)`` whenever tailscaled announces new prefs (someone ran ``tailscale set``)."""
        self._prefs_callbacks.append(callback)

    def self_node(self) -> NodeInfo | None:
        return self._self

    def by_ip(self) -> dict[str, NodeInfo]:
        """Every node by each of its tailnet IPv4s."""
        return {ip: n for n in self._nodes.values() for ip in n.ipv4}

    def tagged(self, tag: str) -> list[NodeInfo]:
        """Nodes carrying ``tag`` (self included), by StableID."""
        return sorted((n for n in self._nodes.values() if tag in n.tags), key=lambda n: n.node)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch_loop(), name="tailnet-watch")
        self._resync_task = asyncio.create_task(self._resync_loop(), name="tailnet-resync")

    async def stop(self) -> None:
        for t in (self._task, self._resync_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        self._task = self._resync_task = None

    async def refresh(self) -> None:
        """Rebuild the list from ``status``."""
        async with self._refresh_lock:
            status = await self.client.status()
            self._apply_status(status)

    def _apply_status(self, status: dict[str, Any]) -> None:
        nodes: dict[str, NodeInfo] = {}
        numeric: dict[int, str] = {}
        entries: list[Any] = list((status.get("Peer") or {}).values())
        self_st = status.get("Self")
        if isinstance(self_st, dict):
            entries.append(self_st)
        for st in entries:
            if not isinstance(st, dict) or (info := from_peer_status(st)) is None:
                continue
            nodes[info.node] = info
            if (nid := numeric_id(st, "NodeID")) is not None:
                numeric[nid] = info.node
        self_info = from_peer_status(self_st) if isinstance(self_st, dict) else None
        self._replace(nodes, numeric, self_info)

    # ---- notifications --------------------------------------------------------------------------

    def apply_notify(self, notify: dict[str, Any]) -> bool:
        """Apply one Notify. Returns False when it cannot be applied exactly (caller re-reads status)."""
        if isinstance(prefs := notify.get("Prefs"), dict):
            for cb in list(self._prefs_callbacks):
                try:
                    cb(prefs)
                except Exception:
                    log.exception("prefs subscriber failed")
        if not any(k in notify for k in _PEER_FIELDS):
            if self._watch_asks_deltas and sends_peer_deltas(notify.get("Version")):
                return True  # nothing about peers: such a tailscaled sends every peer change as a delta
            # ≥1.100 without the peer-change bit sends empty notifications for peer changes; so may
            # versions in between. Prefs/State-only notifications carry a field we recognise.
            return any(k in notify for k in ("Prefs", "State", "Engine", "Health", "BrowseToURL",
                                               "LoginFinished", "ErrMessage", "ClientVersion"))
        exact = True
        if isinstance(netmap := notify.get("NetMap"), dict):
            self._apply_netmap(netmap)
        if isinstance(notify.get("InitialStatus"), dict):
            exact = False  # same shape as status: simplest to re-read it
        nodes = dict(self._nodes)
        numeric = dict(self._by_numeric)
        self_info = self._self
        for raw in notify.get("PeersChanged") or ():
            if isinstance(raw, dict) and (info := from_tailcfg_node(raw)) is not None:
                nodes[info.node] = info
                if (nid := numeric_id(raw, "ID")) is not None:
                    numeric[nid] = info.node
        for nid in notify.get("PeersRemoved") or ():
            stable = numeric.pop(nid, None) if isinstance(nid, int) else None
            if stable is None:
                exact = False
            else:
                nodes.pop(stable, None)
        if isinstance(selfc := notify.get("SelfChange"), dict) and (info := from_tailcfg_node(selfc)):
            nodes[info.node] = info
            self_info = info
        if notify.get("PeerChangedPatch"):
            exact = False  # we do not ask for patches; if they come anyway, re-read
        if "PeersChanged" in notify or "PeersRemoved" in notify or "SelfChange" in notify:
            self._replace(nodes, numeric, self_info)
        return exact

    def _apply_netmap(self, netmap: dict[str, Any]) -> None:
        nodes: dict[str, NodeInfo] = {}
        numeric: dict[int, str] = {}
        raws = [p for p in netmap.get("Peers") or () if isinstance(p, dict)]
        selfn = netmap.get("SelfNode")
        self_info = self._self
        if isinstance(selfn, dict):
            raws.append(selfn)
            self_info = from_tailcfg_node(selfn) or self_info
        for raw in raws:
            if (info := from_tailcfg_node(raw)) is not None:
                nodes[info.node] = info
                if (nid := numeric_id(raw, "ID")) is not None:
                    numeric[nid] = info.node
        self._replace(nodes, numeric, self_info)

    def _replace(self, nodes: dict[str, NodeInfo], numeric: dict[int, str], self_info: NodeInfo | None) -> None:
        changed = nodes != self._nodes or self_info != self._self
        self._nodes, self._by_numeric, self._self = nodes, numeric, self_info
        if self.cluster_tag:
            TAILNET_PEERS.set(sum(1 for n in nodes.values() if self.cluster_tag in n.tags))
        if changed:
            self.generation += 1
            for cb in list(self._callbacks):
                try:
                    cb()
                except Exception:  # one broken subscriber must not stop the others
                    log.exception("node directory subscriber failed")

    async def _watch_loop(self) -> None:
        while True:
            try:
                connected = False
                self._watch_asks_deltas = bool(DIRECTORY_WATCH_MASK & NOTIFY_PEER_CHANGES)
                async for notify in self.client.watch_ipn_bus(DIRECTORY_WATCH_MASK):
                    exact = self.apply_notify(notify)
                    if not connected or not exact:
                        # The first notification (NotifyInitialState) says the watch is up: re-read status,
                        # since whatever changed before it connected (the route approval that our own
                        # advertising triggers, seen on a real tailnet; a reconnect's gap) was never sent.
                        connected = True
                        await self.refresh()
                log.warning("tailscaled closed the IPN bus watch; reconnecting")
            except (TailnetUnavailable, LocalAPIError) as e:
                log.warning("IPN bus watch failed: %s; retrying in %.1fs", e, self.retry_interval)
            except Exception:  # never let the watch die: the node list would silently go stale
                log.exception("IPN bus watch broke; retrying in %.1fs", self.retry_interval)
            await asyncio.sleep(self.retry_interval)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            try:
                await self.refresh()
            except (TailnetUnavailable, LocalAPIError) as e:
                log.warning("periodic status refresh failed: %s", e)
