"""Each part gets its own settings, derived from the config once at the edge (docs/design.md §2): a
part's constructor takes its settings and collaborators, never the whole ``Config``, and no part module
derives anything from the config at run time (only the settings' ``from_config`` does)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from appconnector import config
from appconnector.admin import AdminServer
from appconnector.app import PartSettings
from appconnector.dns.service import DnsService
from appconnector.dns.settings import DnsSettings
from appconnector.http import StatusServer
from appconnector.leader import LeaderDuties
from appconnector.nat.service import NatService
from appconnector.statusdata import PageData
from appconnector.tailnet.cluster import ClusterDiscovery
from appconnector.tailnet.routes import RouteApprover
from appconnector.tailnet.service import TailnetService

PACKAGE = Path(__file__).resolve().parents[2] / "appconnector"
PARTS = (DnsService, NatService, TailnetService, ClusterDiscovery, RouteApprover, StatusServer, AdminServer,
         PageData, LeaderDuties)
# what only the edge may do with the config: hold it, derive networks from it, and call its methods
# that derive listeners, secrets and paths
DERIVATIONS = {"Config", "pool_networks", "pool_networks6", "ignore_networks"}
CONFIG_METHODS = {"dns_listen", "read_secret", "admin_token_path", "raft_self"}
# check-config's DNS-loop check runs on the config before anything starts; the edge itself
EDGE = {"config.py", "cli.py", "app.py", "dns/loops.py"}


def test_no_part_constructor_takes_the_whole_config() -> None:
    for part in PARTS:
        for name, param in inspect.signature(part.__init__).parameters.items():
            assert "Config" not in str(param.annotation), f"{part.__name__}({name}: {param.annotation})"


def _runtime_uses(path: Path) -> list[str]:
    """DERIVATIONS and CONFIG_METHODS calls in ``path`` outside a ``from_config``."""
    tree = ast.parse(path.read_text(), str(path))
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "from_config":
            allowed.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Name) and node.id in DERIVATIONS:
            found.append(f"{node.id} (line {node.lineno})")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in CONFIG_METHODS):
            found.append(f"{node.func.attr}() (line {node.lineno})")
    return found


def test_no_part_derives_from_the_config_at_run_time() -> None:
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel in EDGE or rel.startswith("pool/"):  # the pool's own seam is tests/pool's to check
            continue
        if uses := _runtime_uses(path):
            offenders[rel] = uses
    assert offenders == {}, offenders


def test_tailscale_mode_parts_agree_on_the_dns_address() -> None:
    """The settings are derived once and agree: DNS listens on the pool's first address (tailscale mode
    default), NAT makes exactly that address local, and the status page shows it."""
    cfg = config.load(None, env={"APPCONNECTOR_POOL_PREFIXES": "100.80.9.0/24,100.80.3.0/24"})
    parts = PartSettings.from_config(cfg)
    assert parts.dns.listen == (("100.80.3.0", 53),)
    assert parts.nat.dns_hosts == ("100.80.3.0",)
    assert parts.http.dns_listen == ("100.80.3.0:53",)
    assert parts.tailnet is not None and parts.tailnet.routes == ("100.80.9.0/24", "100.80.3.0/24")
    standalone = PartSettings.from_config(config.load(None, env={"APPCONNECTOR_TAILNET_MODE": "standalone"}))
    assert standalone.tailnet is None and standalone.dns.listen == (("127.0.0.1", 5353),)
    assert DnsSettings.from_config(cfg) == parts.dns, "derived the same way every time (frozen, comparable)"
