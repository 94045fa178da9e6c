"""LocalAPI JSON → ``NodeInfo``. Two shapes carry a node: ``tailcfg.Node`` (whois, NetMap,
PeersChanged: ``StableID``, ``Name``, ``Addresses`` as prefixes, ``Online`` may be null) and
``ipnstate.PeerStatus`` (status: ``ID`` is the StableID, ``DNSName``, ``TailscaleIPs``, ``Tags``
omitted when empty). Both carry ``PrimaryRoutes`` (omitted when empty) and ``AllowedIPs`` (own addresses
plus routed subnets; tailscale/tailscale ``ipn/ipnlocal/local.go`` ``peerStatusFromNode``).

Grants: the grants capability (``tailnet.capability``) arrives in whois as ``CapMap[capability]``: a
JSON array of the raw values every grant towards this connector gave the source (tailcfg.PeerCapMap).
Each value is an object ``{"apps": ["github", "internal-wiki"]}``; the source may use the union of the
names (:func:`granted_apps`). Values of another shape are skipped (a typo in one grant must not cost
the others)."""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from appconnector.tailnet.api import NodeInfo

APPS_FIELD = "apps"


def granted_apps(capmap: Any, capability: str) -> frozenset[str]:
    """The app names ``capmap`` (a whois ``CapMap``) grants under ``capability``; junk grants nothing."""
    if not isinstance(capmap, dict):
        return frozenset()
    values = capmap.get(capability)
    if not isinstance(values, list):
        return frozenset()
    names: set[str] = set()
    for value in values:
        apps = value.get(APPS_FIELD) if isinstance(value, dict) else None
        if isinstance(apps, list):
            names.update(a for a in apps if isinstance(a, str))
    return frozenset(names)



def _ipv4s(values: Any, version: int = 4) -> tuple[str, ...]:
    out = []
    for v in values or ():
        try:
            iface = ipaddress.ip_interface(str(v))
        except ValueError:
            continue
        if iface.version == version:
            out.append(str(iface.ip))
    return tuple(out)


def _prefixes(values: Any, own: Any = ()) -> tuple[str, ...]:
    """Normalised IP prefixes of ``values`` (a JSON list, or null), less the node's own addresses."""
    skip = set()
    for v in own or ():
        with contextlib.suppress(ValueError):
            skip.add(ipaddress.ip_interface(str(v)).ip)
    out: list[str] = []
    for v in values or ():
        try:
            net = ipaddress.ip_network(str(v), strict=False)
        except ValueError:
            continue
        if net.num_addresses == 1 and net.network_address in skip:
            continue
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _name(*candidates: Any) -> str:
    for c in candidates:
        if isinstance(c, str) and c:
            return c.rstrip(".")
    return ""


def from_tailcfg_node(node: dict[str, Any]) -> NodeInfo | None:
    """A ``tailcfg.Node`` dict as NodeInfo; None when it has no StableID."""
    stable = node.get("StableID")
    if not isinstance(stable, str) or not stable:
        return None
    raw_hostinfo = node.get("Hostinfo")
    hostinfo: dict[str, Any] = raw_hostinfo if isinstance(raw_hostinfo, dict) else {}
    online = node.get("Online")
    addresses = node.get("Addresses")
    return NodeInfo(node=stable, name=_name(node.get("Name"), node.get("ComputedName"), hostinfo.get("Hostname")),
                    ipv4=_ipv4s(addresses), tags=tuple(node.get("Tags") or ()),
                    online=True if online is None else bool(online),
                    primary_routes=_prefixes(node.get("PrimaryRoutes")),
                    routes=_prefixes(node.get("AllowedIPs"), addresses),  # null AllowedIPs: the addresses only
                    ipv6=_ipv4s(addresses, 6))


def from_peer_status(peer: dict[str, Any]) -> NodeInfo | None:
    """An ``ipnstate.PeerStatus`` dict as NodeInfo; None when it has no ID."""
    stable = peer.get("ID")
    if not isinstance(stable, str) or not stable:
        return None
    ips = peer.get("TailscaleIPs")
    return NodeInfo(node=stable, name=_name(peer.get("DNSName"), peer.get("HostName")),
                    ipv4=_ipv4s(ips), tags=tuple(peer.get("Tags") or ()),
                    online=bool(peer.get("Online", False)),
                    primary_routes=_prefixes(peer.get("PrimaryRoutes")), routes=_prefixes(peer.get("AllowedIPs"), ips),
                    ipv6=_ipv4s(ips, 6))


def numeric_id(node: dict[str, Any], key: str) -> int | None:
    """The numeric ``tailcfg.NodeID`` (``ID`` in a Node, ``NodeID`` in a PeerStatus), if present."""
    v = node.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None
