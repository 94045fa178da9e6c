"""What the DNS part depends on, derived once from the config at start (docs/design.md, the parts).

``DnsSettings.from_config`` is the only place DNS reads ``Config``: it parses the listeners, the
upstreams and the pool's networks, so nothing under ``dns/`` calls back into ``config`` at run time.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from appconnector.config import AppConfig, Config, ignore_networks, parse_hostport, pool_networks, pool_networks6


@dataclass(frozen=True)
class DnsSettings:
    listen: tuple[tuple[str, int], ...]          # dns.listen, else the mode's default
    upstream: tuple[tuple[str, int], ...]        # dns.upstream (empty: /etc/resolv.conf)
    verify_upstream: bool                        # dns.verify_upstream
    ttl: float                                   # dns.ttl
    domains: tuple[str, ...]                     # dns.domains (empty: every name)
    pool_prefixes: tuple[str, ...]               # pool.prefixes as configured
    pool_prefixes6: tuple[str, ...]              # pool.prefixes6 (empty: no v6 pool)
    pool: tuple[ipaddress.IPv4Network, ...]      # pool.prefixes, ordered
    pool6: tuple[ipaddress.IPv6Network, ...]     # pool.prefixes6, ordered
    ignore: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]  # pool.ignore_destinations, merged
    reuse_after: float                           # pool.reuse_after: how long local answers may be given
    apps: tuple[AppConfig, ...]                  # [[apps]] (empty: every node may use every name)
    access_recheck: float                        # tailnet.access_recheck

    @classmethod
    def from_config(cls, cfg: Config) -> DnsSettings:
        return cls(
            listen=tuple(cfg.dns_listen()),
            upstream=tuple(parse_hostport("dns.upstream", s, default_port=53) for s in cfg.dns.upstream),
            verify_upstream=cfg.dns.verify_upstream, ttl=cfg.dns.ttl, domains=cfg.dns.domains,
            pool_prefixes=cfg.pool.prefixes, pool_prefixes6=cfg.pool.prefixes6,
            pool=tuple(pool_networks(cfg.pool.prefixes)), pool6=tuple(pool_networks6(cfg.pool.prefixes6)),
            ignore=tuple(ignore_networks(cfg.pool.ignore_destinations)), reuse_after=cfg.pool.reuse_after,
            apps=cfg.apps, access_recheck=cfg.tailnet.access_recheck)
