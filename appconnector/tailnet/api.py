"""Contracts of the tailnet side: who a source address is, and which nodes exist.

``tailnet.localapi`` implements them over tailscaled's LocalAPI (tailscale mode);
``tailnet.standalone`` implements them with the client IP as the node (standalone mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A tailnet node as the product needs it."""

    node: str                      # StableID in tailscale mode; the IP text in standalone mode
    name: str                      # DNS name or host name, for logs
    ipv4: tuple[str, ...]          # tailnet IPv4 addresses (what the kernel sees as ip saddr)
    tags: tuple[str, ...] = ()
    online: bool = True
    primary_routes: tuple[str, ...] = ()  # subnet routes the control plane made this node primary for
    routes: tuple[str, ...] = ()          # subnet routes routed to it (AllowedIPs beyond its own addresses)
    login: str = ""                # the owner's login name (whois UserProfile; "" elsewhere)
    granted: frozenset[str] = frozenset()  # app names the grants capability gives it (whois CapMap)
    ipv6: tuple[str, ...] = ()     # tailnet IPv6 addresses (fd7a:115c:a1e0::/48; ip6 saddr, v6 steering)


class NodeIdentity(Protocol):
    """Maps a query's source address to a tailnet node. Cached; safe to call for every query."""

    node_is_source_ip: bool
    """True when a source's node is its IP itself (standalone mode: nothing to ask): the DNS fast path
    then keys on the IP without a lookup, and access checks ask about the node's own address."""

    def cached(self, ip: str) -> NodeInfo | None:
        """The node for ``ip`` if it is in the cache (no I/O): the DNS fast path uses this."""

    async def whois(self, ip: str) -> NodeInfo | None:
        """The node for ``ip`` (one LocalAPI round trip on a cache miss), or None for a stranger.
        Raises ``TailnetUnavailable`` when tailscaled cannot be asked."""

    async def refresh(self) -> set[str]:
        """Ask again for every cached source (grants change without a netmap change); returns the
        nodes whose grants, owner or tags changed. Never raises."""


class NodeDirectory(Protocol):
    """The current node list (netmap): NAT needs every node's tailnet IPv4s, the leader needs it to
    forget departed nodes and to exclude node addresses from the pool."""

    def nodes(self) -> dict[str, NodeInfo]:
        """Every known node by ``NodeInfo.node`` (a consistent copy)."""

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (on the event loop) whenever the node list changes."""


class TailnetUnavailable(Exception):
    """tailscaled did not answer (socket missing, timeout, HTTP 5xx)."""
