"""A config with every kind of mistake: ``appconnector check-config`` exits 2 and names the key."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from appconnector import config

# (what is wrong, TOML text, extra environment, the key the message must name)
MISTAKES: list[tuple[str, str, dict[str, str], str]] = [
    ("not TOML", "[dns\nlisten = 1", {}, "--config"),
    ("unknown section", "[dnss]\nttl = \"5s\"", {}, "dnss"),
    ("section that is not a table", "pool = 5", {}, "pool"),
    ("unknown key", "[dns]\nlissen = [\"127.0.0.1:53\"]", {}, "dns.lissen"),
    ("unknown mode", "[tailnet]\nmode = \"cloud\"", {}, "tailnet.mode"),
    ("wrong type", "[tailnet]\nmode = 3", {}, "tailnet.mode"),
    ("host name instead of address", "[dns]\nlisten = [\"localhost:53\"]", {}, "dns.listen"),
    ("port out of range", "[dns]\nlisten = [\"127.0.0.1:99999\"]", {}, "dns.listen"),
    ("listen not a list of strings", "[dns]\nlisten = [53]", {}, "dns.listen"),
    ("bad upstream", "[dns]\nupstream = [\"resolver.example:53\"]", {}, "dns.upstream"),
    ("duration without unit word", "[dns]\nttl = \"soon\"", {}, "dns.ttl"),
    ("negative duration", "[dns]\nttl = \"-5s\"", {}, "dns.ttl"),
    ("ttl too long", "[dns]\nttl = \"30d\"", {}, "dns.ttl"),
    ("not a boolean", "[dns]\nverify_upstream = \"maybe\"", {}, "dns.verify_upstream"),
    ("bad allow-list pattern", "[dns]\ndomains = [\"bad domain!\"]", {}, "dns.domains"),
    ("prefix length too long", "[pool]\nprefixes = [\"100.64.1.0/33\"]", {}, "pool.prefixes"),
    ("IPv6 pool", "[pool]\nprefixes = [\"fd00::/64\"]", {}, "pool.prefixes"),
    ("host bits set", "[pool]\nprefixes = [\"100.64.1.5/24\"]", {}, "pool.prefixes"),
    ("overlapping prefixes", "[pool]\nprefixes = [\"100.64.1.0/24\", \"100.64.1.128/25\"]", {}, "pool.prefixes"),
    ("pool too small", "[pool]\nprefixes = [\"100.64.1.1/32\"]", {}, "pool.prefixes"),
    ("empty pool", "[pool]\nprefixes = []", {}, "pool.prefixes"),
    ("zero reuse deadline", "[pool]\nreuse_after = \"0s\"", {}, "pool.reuse_after"),
    ("bad ignore prefix", "[pool]\nignore_destinations = [\"nope\"]", {}, "pool.ignore_destinations"),
    ("raft port out of range", "[cluster]\nraft_port = 70000", {}, "cluster.raft_port"),
    ("raft port not a number", "[cluster]\nraft_port = \"abc\"", {}, "cluster.raft_port"),
    ("peers not strings", "[cluster]\npeers = [1, 2]", {}, "cluster.peers"),
    ("follow_only not a boolean", "[cluster]\nfollow_only = 2", {}, "cluster.follow_only"),
    ("steer map too small", "[nat]\nmax_mappings = 10", {}, "nat.max_mappings"),
    ("http listen not an address", "[http]\nlisten = \"nowhere\"", {}, "http.listen"),
    ("admin on the read-only listener", "[http]\nadmin_listen = \"127.0.0.1:8893\"", {}, "http.admin_listen"),
    ("admin on every interface", "[http]\nadmin_listen = \"0.0.0.0:8894\"", {}, "http.admin_listen"),
    ("bad environment value", "", {"APPCONNECTOR_DNS_TTL": "bogus"}, "dns.ttl"),
    ("unknown environment key", "", {"APPCONNECTOR_DNS_TIMETOLIVE": "5s"}, "APPCONNECTOR_DNS_TIMETOLIVE"),
    ("MagicDNS as upstream (a DNS loop)",
     "[tailnet]\nmode = \"tailscale\"\n[dns]\nupstream = [\"100.100.100.100:53\"]", {}, "dns.upstream"),
    ("cluster without a secret",
     "[tailnet]\nmode = \"standalone\"\n[cluster]\npeers = [\"127.0.0.1:27991\"]\nself = \"127.0.0.1:27990\"",
     {}, "cluster.secret_file"),
    ("unreadable secret file",
     "[tailnet]\nmode = \"standalone\"\n[cluster]\npeers = [\"127.0.0.1:27991\"]\nself = \"127.0.0.1:27990\"\n"
     "secret_file = \"/nonexistent/acfault-secret\"", {}, "cluster.secret_file"),
]
IDS = [m[0] for m in MISTAKES]


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "appconnector"
    try:
        import appconnector.cli  # noqa: F401
    except ImportError as e:
        pytest.skip(f"appconnector.cli is not there yet: {e}")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from appconnector.cli import main; main()"]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPCONNECTOR_")}
    env.update(extra)
    return env


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    r = subprocess.run([*_cli(), "check-config", "--config", str(tmp_path / "acfault-missing.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert "--config" in r.stderr + r.stdout


def test_check_config_names_the_key_of_every_mistake(tmp_path: Path) -> None:
    cli = _cli()

    def one(i: int) -> tuple[str, subprocess.CompletedProcess[str]]:
        what, text, env, _ = MISTAKES[i]
        path = tmp_path / f"acfault-{i}.toml"
        path.write_text(text + "\n")
        r = subprocess.run([*cli, "check-config", "--config", str(path)], capture_output=True, text=True,
                           timeout=60, env=_env(env))
        return what, r

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(len(MISTAKES))))
    wrong = []
    for (what, r), (_, _, _, key) in zip(results, MISTAKES, strict=True):
        out = r.stderr + r.stdout
        if r.returncode != 2 or key not in out or "Traceback" in out:
            wrong.append(f"{what}: exit {r.returncode}, expected 2 naming {key!r}; said: {out.strip()[:300]!r}")
    assert not wrong, "\n".join(wrong)


def test_a_good_config_passes(tmp_path: Path) -> None:
    path = tmp_path / "acfault-good.toml"
    secret = tmp_path / "acfault-secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    path.write_text(f"""[tailnet]
mode = "standalone"
[dns]
listen = ["127.0.0.1:27953"]
verify_upstream = false
[pool]
prefixes = ["100.64.1.0/24"]
reuse_after = "48h"
[cluster]
state_dir = "{tmp_path}"
self = "127.0.0.1:27990"
peers = ["127.0.0.1:27991", "127.0.0.1:27992"]
secret_file = "{secret}"
[nat]
enabled = false
""")
    r = subprocess.run([*_cli(), "check-config", "--config", str(path)], capture_output=True, text=True,
                       timeout=60, env=_env({}))
    assert r.returncode == 0, r


@pytest.mark.parametrize("case", range(len(MISTAKES)), ids=IDS)
def test_config_load_raises_naming_the_key(case: int, tmp_path: Path) -> None:
    """The same mistakes through the library: ConfigError whose ``key`` is the one named (where the
    mistake is one the loader itself can see; loops and secrets are checked when the app starts)."""
    what, text, env, key = MISTAKES[case]
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    try:
        cfg = config.load(path, env=env)
    except config.ConfigError as e:
        assert key in str(e), f"{what}: {e}"
        return
    if key in ("dns.upstream", "cluster.secret_file"):
        if key == "cluster.secret_file" and "nonexistent" in text:
            with pytest.raises(config.ConfigError, match=r"cluster\.secret_file"):
                cfg.read_secret()
        return  # checked by check-config (test above), not by the loader
    pytest.fail(f"{what}: loaded without error")
