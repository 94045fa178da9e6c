"""DNS-loop check of the upstreams in tailscale mode (docs/design.md §4, upstream natc PR #16292).

On a tailscaled host /etc/resolv.conf usually points at MagicDNS (100.100.100.100), which forwards the
app domains (split DNS) back to us: every query would loop until it timed out. So in tailscale mode
an upstream may not be MagicDNS, a tailnet address (100.64.0.0/10, fd7a:115c:a1e0::/48) or inside the
pool; with ``dns.upstream`` empty the same applies to the nameservers of /etc/resolv.conf.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from appconnector.config import (
    TAILSCALE_NODE_RANGE,
    TAILSCALE_SERVICE_ADDRESS,
    Config,
    ConfigError,
    parse_hostport,
    pool_networks,
)

MAGICDNS = ipaddress.ip_network(TAILSCALE_SERVICE_ADDRESS).network_address
TAILNET_RANGES = (ipaddress.ip_network(TAILSCALE_NODE_RANGE), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
RESOLV_CONF = "/etc/resolv.conf"

_ADVICE = ('set dns.upstream to resolvers outside the tailnet, e.g. ["1.1.1.1:53", "9.9.9.9:53"], '
           "or run tailscale with --accept-dns=false so /etc/resolv.conf does not point at MagicDNS")


def resolv_conf_nameservers(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf (zone suffixes such as ``%eth0`` dropped)."""
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1].split("%", 1)[0])
    return out


def loop_reason(ip: str, pool: list[ipaddress.IPv4Network]) -> str | None:
    """Why ``ip`` would loop back to us as an upstream, or None."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr == MAGICDNS:
        return "is MagicDNS (100.100.100.100), which sends app domains back to this connector"
    if any(addr in net for net in pool):
        return "is inside the pool (pool.prefixes)"
    if any(addr in net for net in TAILNET_RANGES):
        return "is a tailnet address (100.64.0.0/10 or fd7a:115c:a1e0::/48)"
    return None


def check_upstreams(cfg: Config, resolv_conf: str = RESOLV_CONF) -> None:
    """Raise ConfigError naming ``dns.upstream`` when an upstream would loop. No-op in standalone mode."""
    if cfg.standalone:
        return
    pool = pool_networks(cfg.pool.prefixes)
    if cfg.dns.upstream:
        for value in cfg.dns.upstream:
            host, _ = parse_hostport("dns.upstream", value, default_port=53)
            if reason := loop_reason(host, pool):
                raise ConfigError("dns.upstream", value, f"a resolver outside the tailnet: {host} {reason}; "
                                  + _ADVICE)
        return
    try:
        servers = resolv_conf_nameservers(Path(resolv_conf).read_text())
    except OSError as e:
        raise ConfigError("dns.upstream", [], f"resolvers (dns.upstream is empty and {resolv_conf} cannot be "
                          f"read: {e.strerror}); " + _ADVICE) from None
    if not servers:
        raise ConfigError("dns.upstream", [], f"resolvers (dns.upstream is empty and {resolv_conf} lists no "
                          "nameserver); " + _ADVICE)
    for host in servers:
        if reason := loop_reason(host, pool):
            raise ConfigError("dns.upstream", [], f"resolvers outside the tailnet: dns.upstream is empty, so "
                              f"{resolv_conf} is used, and its nameserver {host} {reason}; " + _ADVICE)
