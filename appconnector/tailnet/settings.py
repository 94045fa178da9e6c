"""What the tailnet part depends on, derived once from the config at start (docs/design.md, the parts).

``TailnetSettings.from_config`` is the only place ``tailnet/`` reads ``Config`` (tailscale mode; in
standalone mode the part is not built).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appconnector.config import Config

RECORD_FILE = "advertised-routes.json"
"""The routes this product added to tailscaled's prefs, recorded in the state directory."""


@dataclass(frozen=True)
class TailnetSettings:
    localapi_socket: str             # tailnet.localapi_socket
    capability: str                  # tailnet.capability: the grants capability listing a source's apps
    advertise_routes: bool           # tailnet.advertise_routes
    pool_prefixes: tuple[str, ...]   # pool.prefixes: the routes whose service is watched
    routes: tuple[str, ...]          # pool.prefixes + pool.prefixes6: the routes advertised
    route_approval_grace: float      # tailnet.route_approval_grace
    record_path: Path                # <cluster.state_dir>/advertised-routes.json (one per state directory)
    api_key_file: str                # tailnet.api_key_file: control-API route approval ...
    oauth_client_id: str             # ... or an OAuth client
    oauth_secret_file: str           # ... with its secret in this file
    cluster_tag: str                 # cluster.tag ("" = a one-member cluster)
    raft_port: int                   # cluster.raft_port
    follow_only: bool                # cluster.follow_only: never bootstrap a cluster

    @classmethod
    def from_config(cls, cfg: Config) -> TailnetSettings:
        t = cfg.tailnet
        return cls(localapi_socket=t.localapi_socket, capability=t.capability, advertise_routes=t.advertise_routes,
                   pool_prefixes=cfg.pool.prefixes, routes=cfg.pool.prefixes + cfg.pool.prefixes6,
                   route_approval_grace=t.route_approval_grace,
                   record_path=Path(cfg.cluster.state_dir) / RECORD_FILE, api_key_file=t.api_key_file,
                   oauth_client_id=t.oauth_client_id, oauth_secret_file=t.oauth_secret_file,
                   cluster_tag=cfg.cluster.tag, raft_port=cfg.cluster.raft_port,
                   follow_only=cfg.cluster.follow_only)
