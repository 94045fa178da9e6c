"""What the status and admin listeners (``http``, ``admin``, ``statusdata``) depend on, derived once from
the config at start (docs/design.md, the parts). ``HttpSettings.from_config`` is the only place they read
``Config``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appconnector.config import Config, parse_hostport


@dataclass(frozen=True)
class HttpSettings:
    listen: str                      # http.listen: the read-only listener (as configured: logs, the page)
    admin_listen: str                # http.admin_listen: per-node data and changes, with the token
    listen_at: tuple[str, int]       # http.listen parsed: where to bind
    admin_listen_at: tuple[str, int]  # http.admin_listen parsed
    admin_token_path: Path           # http.admin_token_file, else admin.token in the state directory
    mode: str                        # tailnet.mode, shown on /status and the page
    source: str                      # the config file the connector runs with
    pool_prefixes: tuple[str, ...]   # pool.prefixes, shown (no per-node data)
    dns_listen: tuple[str, ...]      # where DNS listens, as "ip:port"
    nat_configured: bool             # nat.enabled

    @classmethod
    def from_config(cls, cfg: Config) -> HttpSettings:
        return cls(listen=cfg.http.listen, admin_listen=cfg.http.admin_listen,
                   listen_at=parse_hostport("http.listen", cfg.http.listen),
                   admin_listen_at=parse_hostport("http.admin_listen", cfg.http.admin_listen),
                   admin_token_path=cfg.admin_token_path(), mode=cfg.tailnet.mode, source=cfg.source,
                   pool_prefixes=cfg.pool.prefixes,
                   dns_listen=tuple(f"{h}:{p}" for h, p in cfg.dns_listen()),
                   nat_configured=cfg.nat.enabled)
