"""What the NAT part depends on, derived once from the config at start (docs/design.md, the parts).

``NatSettings.from_config`` is the only place NAT reads ``Config``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from appconnector.config import Config, pool_networks, pool_networks6


@dataclass(frozen=True)
class NatSettings:
    enabled: bool                    # nat.enabled: false = DNS only, no kernel table
    max_mappings: int                # nat.max_mappings: size of the steer map and the seen set
    interface: str                   # tailnet.interface: where tailnet traffic arrives
    pool: tuple[ipaddress.IPv4Network, ...]   # pool.prefixes, ordered
    pool6: tuple[ipaddress.IPv6Network, ...]  # pool.prefixes6, ordered (empty: no IPv6 steering)
    pool_prefixes: tuple[str, ...]   # pool.prefixes as configured (the v4 ↔ v6 offset mirror)
    pool_prefixes6: tuple[str, ...]  # pool.prefixes6 as configured
    reuse_after: float               # pool.reuse_after: how stale a last-used mark may get (touch refresh)
    dns_hosts: tuple[str, ...]       # the addresses DNS listens on (the DNS pool address is made local)

    @classmethod
    def from_config(cls, cfg: Config) -> NatSettings:
        return cls(enabled=cfg.nat.enabled, max_mappings=cfg.nat.max_mappings, interface=cfg.tailnet.interface,
                   pool=tuple(pool_networks(cfg.pool.prefixes)), pool6=tuple(pool_networks6(cfg.pool.prefixes6)),
                   pool_prefixes=cfg.pool.prefixes, pool_prefixes6=cfg.pool.prefixes6,
                   reuse_after=cfg.pool.reuse_after, dns_hosts=tuple(h for h, _ in cfg.dns_listen()))
