"""Host checks and routes the dataplane needs, through netlink (pyroute2) and procfs.

- The DNS address (the pool's reserved lowest address) becomes a ``scope host`` local route on ``lo``,
  so DNS can bind it and the kernel delivers queries to it locally; it is not an interface address,
  so tailscaled and others never see it advertised or announced.
- Forwarding must be on, or steered packets are never routed out.
- CAP_NET_ADMIN is what nftables, routes and conntrack need (root has it; so does our systemd unit).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

_CAP_NET_ADMIN = 12
_LOCAL_TABLE = 255


def has_net_admin() -> bool:
    """True when this process holds CAP_NET_ADMIN (effective)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def forwarding_enabled(version: int = 4) -> bool:
    """net.ipv4.ip_forward (or net.ipv6.conf.all.forwarding) in this network namespace."""
    path = "/proc/sys/net/ipv4/ip_forward" if version == 4 else "/proc/sys/net/ipv6/conf/all/forwarding"
    try:
        return Path(path).read_text().strip() == "1"
    except OSError:
        return False


def missing_prerequisite() -> str | None:
    """Why this host cannot steer pool traffic in the kernel (CAP_NET_ADMIN, forwarding), or None."""
    if not has_net_admin():
        return "not root (CAP_NET_ADMIN is needed for nftables)"
    if not forwarding_enabled():
        return "IPv4 forwarding is off (sysctl net.ipv4.ip_forward=1 turns it on)"
    return None


def _local_route(ipr: IPRoute, command: str, address: str) -> None:
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.route(command, dst=address, dst_len=32, type="local", scope="host", table=_LOCAL_TABLE, oif=lo)


def add_local_route(address: str) -> None:
    """Make ``address`` local (``ip route replace local ADDRESS/32 dev lo scope host``)."""
    with IPRoute() as ipr:
        _local_route(ipr, "replace", address)


def remove_local_route(address: str) -> None:
    """Undo :func:`add_local_route`; fine when the route is already gone."""
    with IPRoute() as ipr:
        try:
            _local_route(ipr, "del", address)
        except NetlinkError as e:
            if e.code != 3:  # ESRCH: no such route
                raise
