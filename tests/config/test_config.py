"""The configuration contract (docs/design.md §7): defaults, env overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from appconnector import config
from appconnector.config import ConfigError
from appconnector.pool.api import clock_tick, reuse_window, touch_refresh


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_empty_file_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, ""), env={})
    assert cfg.tailnet.mode == "tailscale"
    assert cfg.pool.prefixes == ("100.64.1.0/24",)
    assert cfg.pool.reuse_after == 48 * 3600
    assert cfg.dns.ttl == 120
    assert cfg.cluster.raft_port == 6270
    assert cfg.cluster.fsync is True, "durable before acknowledged unless the operator says otherwise"
    # tailscale mode: DNS on the reserved lowest pool address, port 53
    assert cfg.dns_listen() == [("100.64.1.0", 53)]


def test_durations_and_lists(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, """
[tailnet]
mode = "standalone"
[dns]
ttl = "250ms"
upstream = ["127.0.0.1:5300", "9.9.9.9"]
[pool]
reuse_after = "90s"
prefixes = ["100.64.2.0/24", "100.64.1.0/25"]
"""), env={})
    assert cfg.dns.ttl == 0.25
    assert cfg.pool.reuse_after == 90
    assert cfg.dns_listen() == [("127.0.0.1", 5353)]
    assert [str(n) for n in config.pool_networks(cfg.pool.prefixes)] == ["100.64.1.0/25", "100.64.2.0/24"]


def test_env_overrides_file(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[dns]\nttl = "10s"\n'),
                      env={"APPCONNECTOR_DNS_TTL": "30s", "APPCONNECTOR_DNS_DOMAINS": "a.com, *.b.org"})
    assert cfg.dns.ttl == 30
    assert cfg.dns.domains == ("a.com", "*.b.org")
    assert config.load(write(tmp_path, ""), env={"APPCONNECTOR_CLUSTER_FSYNC": "false"}).cluster.fsync is False


@pytest.mark.parametrize(("text", "key"), [
    ('[pool]\nreuse_after = "two days"', "pool.reuse_after"),
    ('[pool]\nprefixes = ["100.64.1.1/24"]', "pool.prefixes"),
    ('[pool]\ncheckout_timeout = "0s"', "pool.checkout_timeout"),
    ('[pool]\ncheckout_timeout = "5m"', "pool.checkout_timeout"),
    ('[pool]\nmax_queued_checkouts = 0', "pool.max_queued_checkouts"),
    ('[pool]\nprefixes = ["fd00::/64"]', "pool.prefixes"),
    ('[pool]\nprefixes = ["100.64.1.0/24", "100.64.1.128/25"]', "pool.prefixes"),
    ('[dns]\nlisten = ["localhost:53"]', "dns.listen"),
    ('[dns]\nverify_upstream = "maybe"', "dns.verify_upstream"),
    ('[tailnet]\nmode = "cloud"', "tailnet.mode"),
    ('[tailnet]\nmode = "standalone"\n[cluster]\npeers = ["127.0.0.1:7000"]', "cluster.secret_file"),
    ('[cluster]\nraft_port = 70000', "cluster.raft_port"),
    ('[cluster]\ntag = "appconnector"', "cluster.tag"),
    ('[cluster]\nfsync = "sometimes"', "cluster.fsync"),
    ('[nat]\nmax_entries = 5', "nat.max_entries"),
    ('[colour]\nx = 1', "colour"),
    ("[dns\nttl=", "--config"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text), env={})
    assert err.value.key == key
    assert key in str(err.value)


def test_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[dns]\ndomains = ["caf\xe9.example"]\n')
    with pytest.raises(ConfigError) as err:
        config.load(path, env={})
    assert err.value.key == "--config" and "UTF-8" in str(err.value)


def test_unknown_env_variable_is_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        config.load(None, env={"APPCONNECTOR_DNS_TTLL": "5s"})
    assert err.value.key == "APPCONNECTOR_DNS_TTLL"


def test_command_variables_are_not_config_keys() -> None:
    # the command reads these itself (--log-level, --log-format defaults); a config load must not refuse them
    cfg = config.load(None, env={"APPCONNECTOR_LOG_LEVEL": "debug", "APPCONNECTOR_LOG_FORMAT": "json",
                                 "APPCONNECTOR_DNS_TTL": "30s"})
    assert cfg.dns.ttl == 30.0


def test_the_repositorys_tool_variables_are_not_config_keys() -> None:
    # `APPCONNECTOR_LONG=1 ./dev test` must not make every `appconnector run` the tests start refuse its config
    env = {name: "1" for name in config.TOOL_VARIABLES} | {"APPCONNECTOR_DNS_TTL": "30s"}
    assert config.load(None, env=env).dns.ttl == 30.0
    with pytest.raises(config.ConfigError):  # a typo is still named
        config.load(None, env={"APPCONNECTOR_LONGG": "1"})


def test_demo_is_standalone_offline(tmp_path: Path) -> None:
    cfg = config.demo(tmp_path, env={})
    assert cfg.standalone and not cfg.dns.verify_upstream
    assert cfg.cluster.state_dir == str(tmp_path)
    assert cfg.dns_listen() == [("127.0.0.1", 5353)]


def test_missing_secret_file_is_named(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, f'[cluster]\nsecret_file = "{tmp_path}/nope"'), env={})
    with pytest.raises(ConfigError) as err:
        cfg.read_secret()
    assert err.value.key == "cluster.secret_file"


def test_admin_listener_defaults_apart_from_the_read_only_one(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[cluster]\nstate_dir = "/srv/ac"\n'), env={})
    assert cfg.http.listen == "127.0.0.1:8893" and cfg.http.admin_listen == "127.0.0.1:8894"
    assert cfg.admin_token_path() == Path("/srv/ac/admin.token"), "the token lives in the state directory"
    cfg = config.load(None, env={"APPCONNECTOR_HTTP_ADMIN_TOKEN_FILE": "/etc/ac/token",
                                 "APPCONNECTOR_HTTP_ADMIN_LISTEN": "[::1]:9000"})
    assert cfg.admin_token_path() == Path("/etc/ac/token") and cfg.http.admin_listen == "[::1]:9000"


@pytest.mark.parametrize("listen,admin,mode", [
    ("127.0.0.1:8893", "127.0.0.1:8893", "standalone"),   # one listener for Prometheus and admin
    ("0.0.0.0:8894", "127.0.0.1:8894", "standalone"),     # the wildcard takes the admin port too
    ("127.0.0.1:8893", "0.0.0.0:8894", "standalone"),     # every interface: the token in clear text
    ("127.0.0.1:8893", "[::]:8894", "tailscale"),
    ("127.0.0.1:8893", "192.168.1.5:8894", "tailscale"),  # a LAN address
    ("127.0.0.1:8893", "100.101.2.3:8894", "standalone"),  # a tailnet address is WireGuard only in tailscale mode
    ("127.0.0.1:8893", "nowhere", "standalone"),
])
def test_unsafe_admin_listener_is_refused_naming_the_key(listen: str, admin: str, mode: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(None, env={"APPCONNECTOR_TAILNET_MODE": mode, "APPCONNECTOR_HTTP_LISTEN": listen,
                               "APPCONNECTOR_HTTP_ADMIN_LISTEN": admin})
    assert e.value.key == "http.admin_listen" and str(e.value).startswith("http.admin_listen = ")


def test_admin_listener_on_loopback_or_this_tailnet_address() -> None:
    for admin, mode in (("127.0.0.2:8894", "standalone"), ("[::1]:8894", "standalone"),
                        ("100.101.2.3:8894", "tailscale"), ("[fd7a:115c:a1e0::1]:8894", "tailscale"),
                        ("127.0.0.1:8893", "standalone")):  # the read-only one moved elsewhere
        env = {"APPCONNECTOR_TAILNET_MODE": mode, "APPCONNECTOR_HTTP_ADMIN_LISTEN": admin}
        if admin.endswith(":8893"):
            env["APPCONNECTOR_HTTP_LISTEN"] = "100.101.2.3:8893"
        assert config.load(None, env=env).http.admin_listen == admin


# ---- address sets (netaddr, at configuration time) --------------------------------------------------


def _load(**env: str) -> config.Config:
    return config.load(None, env={f"APPCONNECTOR_{k.upper()}": v for k, v in env.items()})


def test_overlapping_pool_prefixes_are_named_with_what_they_share() -> None:
    with pytest.raises(ConfigError) as ei:
        _load(pool_prefixes="10.255.0.0/22,192.168.7.0/24,10.255.2.0/24")
    assert ei.value.key == "pool.prefixes"
    assert "10.255.0.0/22 and 10.255.2.0/24 share 10.255.2.0/24" in str(ei.value)
    _load(pool_prefixes="10.255.0.0/24,10.255.1.0/24")  # adjacent is fine


def test_ignore_destinations_must_stay_outside_the_pool() -> None:
    # a pool address answered as "real" would pass a DNS loop through instead of refusing it
    with pytest.raises(ConfigError) as ei:
        _load(pool_prefixes="10.255.0.0/22,192.168.7.0/24", pool_ignore_destinations="192.0.2.0/24,10.0.0.0/8")
    assert ei.value.key == "pool.ignore_destinations" and ei.value.value == "10.0.0.0/8"
    assert "covers pool addresses 10.255.0.0/22" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        _load(pool_prefixes="10.255.0.0/22", pool_ignore_destinations="10.255.3.7")
    assert "10.255.3.7/32" in str(ei.value)
    cfg = _load(pool_prefixes="10.255.0.0/22", pool_ignore_destinations="10.255.4.0/22,2001:db8::/32")
    assert cfg.pool.ignore_destinations == ("10.255.4.0/22", "2001:db8::/32")


def test_pool_may_not_hold_tailscaleds_own_address_in_tailscale_mode() -> None:
    with pytest.raises(ConfigError) as ei:
        _load(pool_prefixes="100.100.100.0/24")
    assert ei.value.key == "pool.prefixes" and "100.100.100.100" in str(ei.value)
    _load(tailnet_mode="standalone", pool_prefixes="100.100.100.0/24")  # no tailscaled there


def test_ignore_networks_are_merged_once() -> None:
    nets = config.ignore_networks(("10.0.0.0/9", "10.128.0.0/9", "10.1.2.3/16", "2001:db8::/33",
                                   "2001:db8:8000::/33", "192.0.2.7"))
    assert [str(n) for n in nets] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]


def test_pool_in_tailscales_node_range() -> None:
    assert config.pool_in_node_range(("100.64.1.0/24",)) == "100.64.1.0/24"
    assert config.pool_in_node_range(("100.0.0.0/8",)) == "100.64.0.0/10"
    assert config.pool_in_node_range(("10.255.0.0/22",)) == ""


@pytest.mark.parametrize("value", ["2s", "3999ms", "0s"])
def test_reuse_after_below_the_floor_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    """Issue 13: at "2s" the clocks behind last-used marks were as coarse as the refresh interval."""
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, f'[pool]\nreuse_after = "{value}"'), env={})
    assert err.value.key == "pool.reuse_after" and '"4s"' in str(err.value)
    with pytest.raises(ConfigError):
        config.load(None, env={"APPCONNECTOR_POOL_REUSE_AFTER": value})


@pytest.mark.parametrize("reuse_after", [config.MIN_REUSE_AFTER, 60.0, 3600.0, 48 * 3600.0])
def test_every_accepted_reuse_after_has_a_clock_well_below_its_refresh_interval(reuse_after: float) -> None:
    cfg = config.load(None, env={"APPCONNECTOR_POOL_REUSE_AFTER": f"{reuse_after:g}s"})
    assert cfg.pool.reuse_after == reuse_after
    tick, refresh = clock_tick(reuse_after), touch_refresh(reuse_after)
    assert tick <= refresh / 10 and tick <= 1.0
    assert reuse_window(reuse_after) == reuse_after + tick
