"""DNS-loop refusal in tailscale mode: upstreams that would send app domains back to us."""

from __future__ import annotations

from pathlib import Path

import pytest

from appconnector import config
from appconnector.config import ConfigError
from appconnector.dns.loops import check_upstreams, resolv_conf_nameservers


def _cfg(**env: str) -> config.Config:
    return config.load(None, env={f"APPCONNECTOR_{k.upper()}": v for k, v in env.items()})


@pytest.mark.parametrize("upstream,fragment", [
    ("100.100.100.100:53", "MagicDNS"),
    ("100.64.1.9", "inside the pool"),
    ("100.90.1.1:53", "tailnet address"),
    ("[fd7a:115c:a1e0::53]:53", "tailnet address"),
])
def test_loop_upstreams_refused(upstream: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check_upstreams(_cfg(dns_upstream=upstream))
    assert ei.value.key == "dns.upstream"
    assert fragment in str(ei.value)
    assert "--accept-dns=false" in str(ei.value)


def test_good_upstream_and_standalone_pass(tmp_path: Path) -> None:
    check_upstreams(_cfg(dns_upstream="1.1.1.1:53,9.9.9.9"))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 100.100.100.100\n")
    check_upstreams(_cfg(tailnet_mode="standalone"), str(resolv))  # standalone never checks


def test_resolv_conf_is_checked_when_upstream_empty(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# tailscale\nnameserver 100.100.100.100\nsearch tailnet-test.ts.net\n")
    with pytest.raises(ConfigError) as ei:
        check_upstreams(_cfg(), str(resolv))
    assert "resolv.conf" in str(ei.value) and "MagicDNS" in str(ei.value)
    resolv.write_text("nameserver 192.0.2.53\nnameserver fe80::1%eth0\n")
    check_upstreams(_cfg(), str(resolv))
    assert resolv_conf_nameservers(resolv.read_text()) == ["192.0.2.53", "fe80::1"]
    resolv.write_text("")
    with pytest.raises(ConfigError):
        check_upstreams(_cfg(), str(resolv))
