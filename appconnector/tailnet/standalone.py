"""Standalone identity: no tailscaled, the client's IP address is the node (docs/design.md §3).

Every address that can reach the DNS listener is a node, so nothing is refused here; the listener's
address (and, with NAT, the firewall) decides who may ask.
"""

from __future__ import annotations

from appconnector.tailnet.api import NodeInfo

MAX_CACHED = 1 << 16


class StandaloneIdentity:
    """``NodeIdentity`` with ``node = name = ip``. Entries are cached so the fast path allocates nothing."""

    node_is_source_ip = True

    def __init__(self) -> None:
        self._nodes: dict[str, NodeInfo] = {}

    def cached(self, ip: str) -> NodeInfo | None:
        info = self._nodes.get(ip)
        if info is None:
            if len(self._nodes) >= MAX_CACHED:
                self._nodes.clear()
            info = self._nodes[ip] = NodeInfo(node=ip, name=ip, ipv4=(ip,) if ":" not in ip else ())
        return info

    async def whois(self, ip: str) -> NodeInfo | None:
        return self.cached(ip)

    async def refresh(self) -> set[str]:
        return set()  # static rules only: a source's access changes with the config alone
