"""Where the real-tailnet peers live: built by ``./dev peers`` into a cache outside the tree, keyed by
version (``${APPCONNECTOR_PEERS_DIR:-~/.cache/appconnector-peers}/<name>-<version>/``). Test peers
only: none of their code is part of the product."""

from __future__ import annotations

import os
from pathlib import Path

TAILSCALE_VERSION = "v1.102.3"   # keep in step with ./dev
HEADSCALE_VERSION = "v0.29.2"


def peers_dir() -> Path:
    return Path(os.environ.get("APPCONNECTOR_PEERS_DIR") or Path.home() / ".cache" / "appconnector-peers")


def tailscaled() -> Path:
    return peers_dir() / f"tailscale-{TAILSCALE_VERSION}" / "tailscaled"


def tailscale() -> Path:
    """The CLI: ``tailscaled`` built with ``ts_include_cli`` runs as the CLI when called ``tailscale``."""
    return peers_dir() / f"tailscale-{TAILSCALE_VERSION}" / "tailscale"


def natc() -> Path:
    """Upstream's ``cmd/natc`` (``go install tailscale.com/cmd/natc@<version>``), only for the side-by-side
    tests and bench (tests/realnet/natc.py); its code never enters the repo."""
    return peers_dir() / f"tailscale-{TAILSCALE_VERSION}" / "natc"


def headscale() -> Path:
    return peers_dir() / f"headscale-{HEADSCALE_VERSION}" / "headscale"


def missing() -> str | None:
    """Why the tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root: network namespaces, tun devices and nftables"
    absent = [str(p) for p in (tailscaled(), tailscale(), headscale()) if not os.access(p, os.X_OK)]
    if absent:
        return f"real-tailnet peers not built ({', '.join(absent)}): run ./dev peers (needs go)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun for tailscaled"
    return None
