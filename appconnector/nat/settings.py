"""What the NAT part depends on, derived once from the config at start (docs/design.md, the parts).

``NatSettings.from_config`` is the only place NAT reads ``Config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from appconnector.config import Config


@dataclass(frozen=True)
class NatSettings:
    enabled: bool                    # nat.enabled: false = DNS only, no kernel table
    max_mappings: int                # nat.max_mappings: size of the steer map and the seen set
    interface: str                   # tailnet.interface: where tailnet traffic arrives
    pool_prefixes: tuple[str, ...]   # pool.prefixes
    pool_prefixes6: tuple[str, ...]  # pool.prefixes6 (empty: no IPv6 steering)
    reuse_after: float               # pool.reuse_after: how stale a last-used mark may get (touch refresh)
    dns_hosts: tuple[str, ...]       # the addresses DNS listens on (the DNS pool address is made local)

    @classmethod
    def from_config(cls, cfg: Config) -> NatSettings:
        return cls(enabled=cfg.nat.enabled, max_mappings=cfg.nat.max_mappings, interface=cfg.tailnet.interface,
                   pool_prefixes=cfg.pool.prefixes, pool_prefixes6=cfg.pool.prefixes6,
                   reuse_after=cfg.pool.reuse_after, dns_hosts=tuple(h for h, _ in cfg.dns_listen()))
