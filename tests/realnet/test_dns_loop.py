"""tailscaled's own DNS on a connector host (``--accept-dns=true``, MagicDNS): 100.100.100.100 sends
the app domain to the pool DNS address (split DNS), i.e. back to the connectors, so the loop guard
refuses it as an upstream, whether it comes from /etc/resolv.conf (written by tailscaled) or from
dns.upstream."""

from __future__ import annotations

import json
import subprocess

from tests.realnet.tailnet import APP_DOMAIN, MAGICDNS, POOL_DNS, Node, Tailnet, appconnector_argv


def _run(node: Node, upstream: list[str], name: str) -> subprocess.CompletedProcess[str]:
    cfg = node.write_config(upstream=upstream, name=name)
    return node.run(*appconnector_argv(), "run", "--config", str(cfg), check=False, timeout=60)


def test_the_loop_guard_refuses_the_real_magicdns(shared: Tailnet) -> None:
    c3 = shared.nodes["c3"]
    assert f"nameserver {MAGICDNS}" in c3.resolv_conf()  # tailscaled took over this host's DNS
    routes = json.loads(c3.cli("dns", "status", "--json", timeout=15).stdout)
    assert POOL_DNS in json.dumps(routes) and APP_DOMAIN in json.dumps(routes), routes  # the way back to us
    for upstream, name in (([], "from-resolv-conf.toml"), ([f"{MAGICDNS}:53"], "magicdns.toml")):
        r = _run(c3, upstream, name)
        assert r.returncode == 2, (upstream, r.returncode, r.stderr[-2000:])
        assert "dns.upstream" in r.stderr and MAGICDNS in r.stderr, r.stderr[-2000:]
