"""The ``appconnector`` command: exit codes scripts rely on (docs/design.md §7) and messages naming the key."""

from __future__ import annotations

from pathlib import Path

from tests.ops.helpers import cli, free_port

GOOD = """
[tailnet]
mode = "standalone"
[dns]
listen = ["127.0.0.1:15353"]
[cluster]
state_dir = "{state}"
"""


def test_check_config_valid(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(GOOD.format(state=tmp_path / "state"))
    res = cli("check-config", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok:") and "standalone" in res.stdout


def test_check_config_invalid_names_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[pool]\nreuse_after = "forever"\n')
    res = cli("check-config", "--config", str(cfg))
    assert res.returncode == 2
    assert "pool.reuse_after" in res.stderr
    cfg.write_text('[dns]\nlistne = []\n')  # a typo in a key name
    res = cli("check-config", "--config", str(cfg))
    assert res.returncode == 2 and "dns.listne" in res.stderr


def test_check_config_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(GOOD.format(state=tmp_path / "state"))
    res = cli("check-config", env={"APPCONNECTOR_CONFIG": str(cfg), "APPCONNECTOR_HTTP_LISTEN": "nonsense"})
    assert res.returncode == 2 and "http.listen" in res.stderr


def test_log_variables_do_not_make_the_config_bad(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.toml"
    cfg.write_text(GOOD.format(state=tmp_path / "state"))
    res = cli("check-config", "--config", str(cfg),
              env={"APPCONNECTOR_LOG_LEVEL": "debug", "APPCONNECTOR_LOG_FORMAT": "json"})
    assert res.returncode == 0, res.stderr


def test_check_config_refuses_magicdns_upstream(tmp_path: Path) -> None:
    cfg = tmp_path / "loop.toml"
    cfg.write_text('[dns]\nupstream = ["100.100.100.100:53"]\n')
    res = cli("check-config", "--config", str(cfg))
    assert res.returncode == 2
    assert "dns.upstream" in res.stderr and "--accept-dns=false" in res.stderr


def test_check_config_missing_file_and_secret(tmp_path: Path) -> None:
    res = cli("check-config", "--config", str(tmp_path / "absent.toml"))
    assert res.returncode == 2 and "--config" in res.stderr
    cfg = tmp_path / "secret.toml"
    cfg.write_text(GOOD.format(state=tmp_path / "s") + f'secret_file = "{tmp_path / "nosecret"}"\n'
                   'peers = ["127.0.0.1:16271"]\n')
    res = cli("check-config", "--config", str(cfg))
    assert res.returncode == 2 and "cluster.secret_file" in res.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[tailnet]\nmode = "carrier-pigeon"\n')
    res = cli("run", "--config", str(cfg))
    assert res.returncode == 2
    assert "tailnet.mode" in res.stderr


def test_status_unreachable_exits_1() -> None:
    res = cli("status", "--http", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert res.returncode == 1
    assert "cannot reach" in res.stderr


def test_client_commands_unreachable_exit_1(tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    token = tmp_path / "admin.token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    env = {"APPCONNECTOR_HTTP_ADMIN_TOKEN_FILE": str(token)}
    res = cli("cluster", "members", "--http", http, "--timeout", "2")
    assert res.returncode == 1 and "http.listen" in res.stderr, res.stderr
    for args in (["pool", "show"], ["pool", "lookup", "n1", "example.com"], ["cluster", "remove", "127.0.0.1:6270"]):
        res = cli(*args, "--admin", http, "--timeout", "2", env=env)
        assert res.returncode == 1 and "cannot reach" in res.stderr and "http.admin_listen" in res.stderr, \
            (args, res.stderr)


def test_admin_commands_without_the_token_file_exit_2_naming_the_key(tmp_path: Path) -> None:
    for args in (["pool", "show"], ["pool", "lookup", "n1", "example.com"], ["cluster", "remove", "127.0.0.1:6270"]):
        res = cli(*args, "--admin", f"127.0.0.1:{free_port()}",
                  env={"APPCONNECTOR_CLUSTER_STATE_DIR": str(tmp_path)})
        assert res.returncode == 2, (args, res.stderr)
        assert "http.admin_token_file" in res.stderr and str(tmp_path / "admin.token") in res.stderr


def test_bad_usage_exits_2() -> None:
    assert cli("status", "--bogus").returncode == 2
    assert cli("pool").returncode == 2
    assert cli("frobnicate").returncode == 2
    assert cli("print-ula", "--site-id", "70000").returncode == 2


def test_help_explains_each_command() -> None:
    res = cli("--help")
    assert res.returncode == 0
    for word in ("run", "check-config", "status", "print-ula", "pool", "cluster", "Exit codes"):
        assert word in res.stdout
    for sub in (["run"], ["check-config"], ["status"], ["pool", "show"], ["pool", "lookup"],
                ["cluster", "members"], ["cluster", "remove"], ["print-ula"]):
        res = cli(*sub, "--help")
        assert res.returncode == 0 and "usage: appconnector" in res.stdout


def test_print_ula_matches_upstream_natc() -> None:
    # natc's TestULA: site 1 → fd7a:115c:a1e0:a99c:0001::/80, 12345 → …:3039::/80
    assert cli("print-ula").stdout.strip() == "fd7a:115c:a1e0:a99c:1::/80"
    assert cli("print-ula", "--site-id", "12345").stdout.strip() == "fd7a:115c:a1e0:a99c:3039::/80"
    assert cli("print-ula", "--site-id", "0").stdout.strip() == "fd7a:115c:a1e0:a99c::/80"


def test_admin_commands_never_send_the_token_off_the_host(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    res = cli("pool", "show", "--admin", "192.0.2.1:8894", "--timeout", "2",
              env={"APPCONNECTOR_HTTP_ADMIN_TOKEN_FILE": str(token)})
    assert res.returncode == 2 and "--admin" in res.stderr and "clear text" in res.stderr, res.stderr


def test_check_config_notes_a_pool_inside_tailscales_node_range(tmp_path: Path) -> None:
    env = {"APPCONNECTOR_DNS_UPSTREAM": "192.0.2.53:53"}
    res = cli("check-config", env=env)
    assert res.returncode == 0 and "note: pool 100.64.1.0/24 lies inside 100.64.0.0/10" in res.stdout, res.stdout
    res = cli("check-config", env={**env, "APPCONNECTOR_POOL_PREFIXES": "10.255.0.0/22"})
    assert res.returncode == 0 and "lies inside" not in res.stdout
