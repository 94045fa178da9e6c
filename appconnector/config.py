"""Typed configuration: TOML file, then ``APPCONNECTOR_<SECTION>_<KEY>`` environment overrides.

The keys are the contract in docs/design.md §7: add keys, never rename them. Every error names the key,
the value that was given and what is allowed, so ``appconnector check-config`` can be read by a human.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import netaddr

from appconnector.errors import ConfigError as ConfigError  # raised here, re-exported for every caller
from appconnector.pool import addresses
from appconnector.secrets_file import read_secret_file

ENV_PREFIX = "APPCONNECTOR_"
# Variables the ``appconnector`` command reads itself (--config, --log-level, --log-format): not config keys.
COMMAND_VARIABLES = frozenset({"APPCONNECTOR_CONFIG", "APPCONNECTOR_LOG_LEVEL", "APPCONNECTOR_LOG_FORMAT"})
# Variables of this repository's own tools (./dev, the tests): set in a developer's or CI's shell, they reach
# every `appconnector run` a test starts, and are no config keys either.
TOOL_VARIABLES = frozenset({"APPCONNECTOR_LONG", "APPCONNECTOR_VENV", "APPCONNECTOR_PEERS_DIR",
                            "APPCONNECTOR_ARTIFACTS"})
DEFAULT_RAFT_PORT = 6270
STANDALONE_DNS_LISTEN = "127.0.0.1:5353"
ADMIN_TOKEN_NAME = "admin.token"
DEFAULT_CAPABILITY = "appconnector.example/cap/apps"
# Tailscale's address ranges: traffic to them crosses the network inside WireGuard
TAILNET_NETWORKS = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
MIN_REUSE_AFTER = 4.0
"""The smallest pool.reuse_after accepted (see pool.api.clock_tick)."""


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(key: str, value: object) -> float:
    """``"48h"``, ``"90s"``, ``"250ms"`` → seconds. Bare numbers are seconds."""
    if isinstance(value, bool):
        raise ConfigError(key, value, 'a duration such as "90s", "5m", "48h" or "250ms"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ConfigError(key, value, 'a duration such as "90s", "5m", "48h" or "250ms"')
    if seconds < 0:
        raise ConfigError(key, value, "a duration that is not negative")
    return seconds


def parse_hostport(key: str, value: object, default_port: int | None = None) -> tuple[str, int]:
    """``"127.0.0.1:53"`` or ``"[::1]:53"`` → (host, port). The host must be an IP address."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, value, 'an address as "ip:port", e.g. "127.0.0.1:53"')
    host, sep, port_s = value.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        if default_port is None:
            raise ConfigError(key, value, 'an address as "ip:port", e.g. "127.0.0.1:53"')
        host, port_s = value, str(default_port)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(key, value, "an IP address and port; host names are not accepted") from None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(key, value, "a port from 1 to 65535")
    return host, int(port_s)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class TailnetConfig:
    mode: str = "tailscale"
    localapi_socket: str = "/var/run/tailscale/tailscaled.sock"
    interface: str = "tailscale0"
    advertise_routes: bool = True      # advertise the pool prefixes via LocalAPI prefs (union, never wipes)
    api_key_file: str = ""             # control-API key file: approve our routes (else use autoApprovers)
    oauth_client_id: str = ""          # or an OAuth client (scope devices:core) ...
    oauth_secret_file: str = ""        # ... with its secret in this file
    route_approval_grace: float = 60.0  # advertised pool routes not served this long → a warning
    capability: str = DEFAULT_CAPABILITY  # grants capability whose values list the apps a source may use
    access_recheck: float = 10.0       # how often granted access is asked again (whois), with [[apps]]


@dataclass(frozen=True)
class DnsConfig:
    listen: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    verify_upstream: bool = True
    ttl: float = 120.0
    domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class PoolConfig:
    prefixes: tuple[str, ...] = ("100.64.1.0/24",)
    reuse_after: float = 48 * 3600.0
    ignore_destinations: tuple[str, ...] = ()
    checkout_timeout: float = 2.0
    max_queued_checkouts: int = 4096
    prefixes6: tuple[str, ...] = ()  # IPv6 pool, off when empty: offset o of the v4 pool ↔ offset o here


@dataclass(frozen=True)
class ClusterConfig:
    state_dir: str = "/var/lib/appconnector"
    raft_port: int = DEFAULT_RAFT_PORT
    tag: str = ""
    peers: tuple[str, ...] = ()
    self: str = ""
    secret_file: str = ""
    follow_only: bool = False
    fsync: bool = True  # journal, vote and snapshots synced before Raft relies on them (docs/design.md §6)


@dataclass(frozen=True)
class NatConfig:
    enabled: bool = True
    max_mappings: int = 1_048_576


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:8893"         # read-only: metrics, health, cluster status (no per-node data)
    admin_listen: str = "127.0.0.1:8894"   # per-node data and changes, each request with the admin token
    admin_token_file: str = ""             # "" = <cluster.state_dir>/admin.token, made at first start


@dataclass(frozen=True)
class AppConfig:
    """One ``[[apps]]`` entry: names a source may be granted together (docs/design.md, grants)."""

    name: str
    domains: tuple[str, ...]
    users: tuple[str, ...] = ()     # login names allowed without a grant (tailscale mode)
    tags: tuple[str, ...] = ()      # node tags allowed without a grant (tailscale mode)
    sources: tuple[str, ...] = ()   # source IP prefixes allowed (standalone mode: no whois there)


APP_KEYS = ("name", "domains", "users", "tags", "sources")


@dataclass(frozen=True)
class Config:
    tailnet: TailnetConfig = field(default_factory=TailnetConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    apps: tuple[AppConfig, ...] = ()
    source: str = "<defaults>"

    @property
    def standalone(self) -> bool:
        return self.tailnet.mode == "standalone"

    def dns_listen(self) -> list[tuple[str, int]]:
        """Where DNS listens: the configured list, else the mode's default."""
        if self.dns.listen:
            return [parse_hostport("dns.listen", v) for v in self.dns.listen]
        if self.standalone:
            return [parse_hostport("dns.listen", STANDALONE_DNS_LISTEN)]
        return [(str(pool_networks(self.pool.prefixes)[0].network_address), 53)]

    def raft_self(self) -> str:
        """This member's Raft address in standalone mode."""
        return self.cluster.self or format_hostport("127.0.0.1", self.cluster.raft_port)

    def admin_token_path(self) -> Path:
        """Where the admin token is (``http.admin_token_file``, else ``admin.token`` in the state directory)."""
        return Path(self.http.admin_token_file or Path(self.cluster.state_dir) / ADMIN_TOKEN_NAME)

    def read_secret(self) -> str | None:
        """The shared cluster secret, or None when no secret file is configured (a lone member then uses one
        of its own, ``secrets_file.MEMBER_SECRET_FILE``). The file must be private."""
        if not self.cluster.secret_file:
            return None
        return read_secret_file("cluster.secret_file", Path(self.cluster.secret_file))


# Tailscale's own ranges (tailscale/tailscale net/tsaddr): nodes get addresses from the CGNAT range, and
# 100.100.100.100 is tailscaled's service address (MagicDNS) on every node.
TAILSCALE_NODE_RANGE = "100.64.0.0/10"
TAILSCALE_SERVICE_ADDRESS = "100.100.100.100/32"


def _cidrs(s: netaddr.IPSet) -> str:
    return ", ".join(str(c) for c in s.iter_cidrs())


def ignore_networks(prefixes: tuple[str, ...] | list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``pool.ignore_destinations`` merged into the fewest prefixes (netaddr), for the DNS policy's
    per-answer check; overlapping or adjacent entries cost one test, not several."""
    merged = netaddr.cidr_merge([netaddr.IPNetwork(ipaddress.ip_network(p, strict=False).compressed)
                                 for p in prefixes])
    return [ipaddress.ip_network(str(n)) for n in merged]


def _check_address_sets(cfg: Config, nets: list[ipaddress.IPv4Network]) -> None:
    """Configuration-time set algebra over the pool (netaddr; never per query): the pool prefixes must not
    overlap each other, ``pool.ignore_destinations`` nor, in tailscale mode, tailscaled's service address."""
    pool = netaddr.IPSet()
    for i, net in enumerate(nets):
        shared = pool & netaddr.IPSet([str(net)])
        if shared:
            other = next(n for n in nets[:i] if n.overlaps(net))
            raise ConfigError("pool.prefixes", list(cfg.pool.prefixes),
                              f"prefixes that do not overlap ({other} and {net} share {_cidrs(shared)})")
        pool.add(str(net))
    for p in cfg.pool.ignore_destinations:
        shared = pool & netaddr.IPSet([ipaddress.ip_network(p, strict=False).compressed])
        if shared:  # a pool address passed through as "real" would hide a DNS loop (dns/policy.classify)
            raise ConfigError("pool.ignore_destinations", p,
                              f"prefixes outside the pool: {p} covers pool addresses {_cidrs(shared)}")
    if cfg.tailnet.mode == "tailscale" and pool & netaddr.IPSet([TAILSCALE_SERVICE_ADDRESS]):
        raise ConfigError("pool.prefixes", list(cfg.pool.prefixes),
                          "prefixes without 100.100.100.100 (tailscaled's own MagicDNS address on every node)")


def pool_in_node_range(prefixes: tuple[str, ...] | list[str]) -> str:
    """The part of the pool inside the range Tailscale assigns node addresses from ("" when none): nodes
    holding those addresses are skipped by the allocator (``leader.excluded_addresses``), with a warning."""
    return _cidrs(netaddr.IPSet([str(n) for n in pool_networks(prefixes)]) & netaddr.IPSet([TAILSCALE_NODE_RANGE]))


def pool_networks(prefixes: tuple[str, ...] | list[str]) -> list[ipaddress.IPv4Network]:
    """The pool prefixes as networks, ordered numerically (docs/design.md §3); parsed by the pool's own
    parser (:mod:`appconnector.pool.addresses`), its error turned into a ConfigError naming the key."""
    try:
        return addresses.pool_networks(prefixes)
    except addresses.PrefixError as e:
        raise ConfigError(e.key, e.value, e.allowed) from None


def pool_networks6(prefixes: tuple[str, ...] | list[str]) -> list[ipaddress.IPv6Network]:
    """``pool.prefixes6`` as networks, ordered numerically; empty: no IPv6 pool."""
    try:
        return addresses.pool_networks6(prefixes)
    except addresses.PrefixError as e:
        raise ConfigError(e.key, e.value, e.allowed) from None


def _check_pool6(cfg: Config, size4: int) -> None:
    """The v6 pool mirrors the v4 one offset for offset, so it must hold every v4 offset; its
    prefixes must not overlap each other, ``pool.ignore_destinations`` nor ::ffff:0:0/96 (v4-mapped)."""
    nets = pool_networks6(cfg.pool.prefixes6)
    if not nets:
        return
    size6 = sum(n.num_addresses for n in nets)
    if size6 < size4:
        raise ConfigError("pool.prefixes6", list(cfg.pool.prefixes6),
                          f"prefixes holding at least as many addresses as pool.prefixes ({size4}; these "
                          f"hold {size6}): the v6 address of a mapping is the v6 pool at the v4 offset")
    pool = netaddr.IPSet()
    for net in nets:
        if pool & netaddr.IPSet([str(net)]):
            raise ConfigError("pool.prefixes6", list(cfg.pool.prefixes6), f"prefixes that do not overlap ({net})")
        pool.add(str(net))
    for p in (*cfg.pool.ignore_destinations, "::ffff:0:0/96", "::/96"):
        shared = pool & netaddr.IPSet([ipaddress.ip_network(p, strict=False).compressed])
        if shared:
            raise ConfigError("pool.prefixes6", list(cfg.pool.prefixes6),
                              f"prefixes outside {p} (they share {_cidrs(shared)})")


# ---- parsing -------------------------------------------------------------------------------------


def _str(key: str, v: object) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, v, "a string")
    return v


def _bool(key: str, v: object) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return v.lower() in ("true", "1", "yes", "on")
    raise ConfigError(key, v, "true or false")


def _int(key: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(key, v, f"a whole number from {lo} to {hi}")
    return v


def _strlist(key: str, v: object) -> tuple[str, ...]:
    if isinstance(v, str):  # env overrides: comma-separated
        return tuple(s.strip() for s in v.split(",") if s.strip())
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ConfigError(key, v, 'a list of strings, e.g. ["a", "b"]')
    return tuple(v)


_DOMAIN_PATTERN_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}$")


def _check_domain_patterns(key: str, patterns: tuple[str, ...]) -> None:
    for d in patterns:
        if not _DOMAIN_PATTERN_RE.match(d.lower().rstrip(".")):
            raise ConfigError(key, d, 'domain names, optionally "*." wildcards such as "*.example.com"')


_APP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def _apps(raw: object, standalone: bool) -> tuple[AppConfig, ...]:
    """``[[apps]]`` tables → AppConfig; names unique, every domain pattern valid, the static rules the
    mode can apply (standalone has no whois: source prefixes only; tailscale mode: users and tags)."""
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise ConfigError("apps", raw, "an array of tables ([[apps]] entries)")
    out: list[AppConfig] = []
    for i, table in enumerate(raw):
        for key in table:
            if key not in APP_KEYS:
                raise ConfigError(f"apps[{i}].{key}", table[key], f"a known key of [[apps]]: {', '.join(APP_KEYS)}")
        name = table.get("name")
        if not isinstance(name, str) or not _APP_NAME_RE.match(name):
            raise ConfigError(f"apps[{i}].name", name, "a name of letters, digits, '.', '_' or '-' (up to 63)")
        if any(a.name == name for a in out):
            raise ConfigError(f"apps[{i}].name", name, "a name no other [[apps]] entry has")
        domains = _strlist(f"apps[{i}].domains", table.get("domains", []))
        if not domains:
            raise ConfigError(f"apps[{i}].domains", list(domains), "at least one domain name")
        _check_domain_patterns(f"apps[{i}].domains", domains)
        users = _strlist(f"apps[{i}].users", table.get("users", []))
        tags = _strlist(f"apps[{i}].tags", table.get("tags", []))
        sources = _strlist(f"apps[{i}].sources", table.get("sources", []))
        for t in tags:
            if not t.startswith("tag:"):
                raise ConfigError(f"apps[{i}].tags", t, 'tailscale tags such as "tag:ci"')
        for p in sources:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ConfigError(f"apps[{i}].sources", p, 'IP prefixes such as "10.1.0.0/16"') from None
        if standalone and (users or tags):
            raise ConfigError(f"apps[{i}].{'users' if users else 'tags'}", list(users or tags),
                              "empty in standalone mode (no whois to learn them): use apps.sources")
        if not standalone and sources:
            raise ConfigError(f"apps[{i}].sources", list(sources),
                              "empty in tailscale mode (a node is known by whois): use users, tags or grants")
        out.append(AppConfig(name, domains, users, tags, sources))
    return tuple(out)


def _validate(cfg: Config) -> Config:
    if cfg.tailnet.mode not in ("tailscale", "standalone"):
        raise ConfigError("tailnet.mode", cfg.tailnet.mode, '"tailscale" or "standalone"')
    for v in cfg.dns.listen:
        parse_hostport("dns.listen", v)
    for v in cfg.dns.upstream:
        parse_hostport("dns.upstream", v, default_port=53)
    if not 0 <= cfg.dns.ttl <= 86400:
        raise ConfigError("dns.ttl", cfg.dns.ttl, "a duration from 0s to 24h")
    _check_domain_patterns("dns.domains", cfg.dns.domains)
    if not cfg.tailnet.capability or any(c.isspace() for c in cfg.tailnet.capability):
        raise ConfigError("tailnet.capability", cfg.tailnet.capability,
                          'a capability name without spaces, such as "example.com/cap/apps"')
    if not 1 <= cfg.tailnet.access_recheck <= 3600:
        raise ConfigError("tailnet.access_recheck", cfg.tailnet.access_recheck, "a duration from 1s to 1h")
    nets = pool_networks(cfg.pool.prefixes)
    if not nets:
        raise ConfigError("pool.prefixes", list(cfg.pool.prefixes), "at least one IPv4 prefix")
    if sum(n.num_addresses for n in nets) < 2:
        raise ConfigError("pool.prefixes", list(cfg.pool.prefixes), "at least two addresses (one is reserved for DNS)")
    if not cfg.pool.reuse_after >= MIN_REUSE_AFTER:
        raise ConfigError("pool.reuse_after", cfg.pool.reuse_after,
                          f'a duration of at least "{MIN_REUSE_AFTER:g}s" (the pool clock ticks at reuse_after/80, '
                          "at least 50 ms apart: shorter deadlines would reuse by a clock coarser than the "
                          "last-used refresh)")
    if not 0.05 <= cfg.pool.checkout_timeout <= 60:
        raise ConfigError("pool.checkout_timeout", cfg.pool.checkout_timeout,
                          'a duration from "50ms" to "60s" (DNS clients give up after a few seconds)')
    for p in cfg.pool.ignore_destinations:
        try:
            ipaddress.ip_network(p, strict=False)
        except ValueError:
            raise ConfigError("pool.ignore_destinations", p, 'IP prefixes such as "10.0.0.0/8"') from None
    _check_address_sets(cfg, nets)
    _check_pool6(cfg, sum(n.num_addresses for n in nets))
    for v in cfg.cluster.peers:
        parse_hostport("cluster.peers", v)
    if cfg.cluster.self:
        parse_hostport("cluster.self", cfg.cluster.self)
    if not cfg.cluster.state_dir:
        raise ConfigError("cluster.state_dir", cfg.cluster.state_dir, "a directory path")
    if cfg.tailnet.mode == "tailscale" and cfg.cluster.peers:
        raise ConfigError("cluster.peers", list(cfg.cluster.peers),
                          'empty in tailscale mode (peers are found by cluster.tag); set tailnet.mode = "standalone"')
    if cfg.cluster.peers and not cfg.cluster.secret_file:
        raise ConfigError("cluster.secret_file", "", "a secret file (required with more than one member)")
    if cfg.cluster.tag and not cfg.cluster.tag.startswith("tag:"):
        raise ConfigError("cluster.tag", cfg.cluster.tag, 'a tailscale tag such as "tag:appconnector"')
    if cfg.cluster.tag and not cfg.cluster.secret_file:
        raise ConfigError("cluster.secret_file", "", "a secret file: required when cluster.tag forms a cluster")
    _validate_http(cfg)
    return cfg


def _validate_http(cfg: Config) -> None:
    """The admin listener: never where the read-only one is (operators expose that one to Prometheus),
    and only where the token it carries in clear text cannot be read on the way: loopback, or in
    tailscale mode a tailnet address (inside WireGuard)."""
    host, port = parse_hostport("http.listen", cfg.http.listen)
    admin_host, admin_port = parse_hostport("http.admin_listen", cfg.http.admin_listen)
    if port == admin_port and (host == admin_host or ipaddress.ip_address(host).is_unspecified
                               or ipaddress.ip_address(admin_host).is_unspecified):
        raise ConfigError("http.admin_listen", cfg.http.admin_listen,
                          f"an address:port of its own, not http.listen's ({cfg.http.listen}): the read-only "
                          "listener is the one Prometheus may reach, admin needs the token on another")
    check_admin_address("http.admin_listen", cfg.http.admin_listen, cfg.standalone)


def check_admin_address(key: str, value: str, standalone: bool) -> None:
    """Where the admin token may be sent over plain HTTP: loopback, or (tailscale mode) a tailnet address."""
    ip = ipaddress.ip_address(parse_hostport(key, value)[0])
    if not (ip.is_loopback or (not standalone and any(ip in n for n in TAILNET_NETWORKS))):
        raise ConfigError(key, value, 'a loopback address such as "127.0.0.1:8894" (in tailscale mode also a '
                                      "tailnet address): the admin token would cross the network in clear text")


# section → key → converter(dotted key, raw value)
_CONVERTERS: dict[str, dict[str, Any]] = {
    "tailnet": {"mode": _str, "localapi_socket": _str, "interface": _str, "advertise_routes": _bool,
                "api_key_file": _str, "oauth_client_id": _str, "oauth_secret_file": _str,
                "route_approval_grace": parse_duration, "capability": _str, "access_recheck": parse_duration},
    "dns": {
        "listen": _strlist, "upstream": _strlist, "verify_upstream": _bool,
        "ttl": parse_duration, "domains": _strlist,
    },
    "pool": {"prefixes": _strlist, "reuse_after": parse_duration, "ignore_destinations": _strlist,
             "checkout_timeout": parse_duration, "max_queued_checkouts": lambda k, v: _int(k, v, 1, 1 << 20),
             "prefixes6": _strlist},
    "cluster": {
        "state_dir": _str, "raft_port": lambda k, v: _int(k, v, 1, 65535), "tag": _str,
        "peers": _strlist, "self": _str, "secret_file": _str, "follow_only": _bool,
        "fsync": _bool,
    },
    "nat": {"enabled": _bool, "max_mappings": lambda k, v: _int(k, v, 1024, 1 << 26)},
    "http": {"listen": _str, "admin_listen": _str, "admin_token_file": _str},
}


def _build(raw: Mapping[str, Any], source: str) -> Config:
    cfg = Config(source=source)
    apps = raw.get("apps", [])
    for section, values in raw.items():
        if section == "apps":
            continue
        if section not in _CONVERTERS:
            raise ConfigError(section, values, f"a known section: {', '.join(_CONVERTERS)}, apps")
        if not isinstance(values, Mapping):
            raise ConfigError(section, values, "a table ([section])")
        converters = _CONVERTERS[section]
        changes = {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in converters:
                raise ConfigError(dotted, value, f"a known key of [{section}]: {', '.join(converters)}")
            changes[key] = converters[key](dotted, value)
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **changes)})
    # after the sections: which static rules an app may have depends on tailnet.mode
    return _validate(replace(cfg, apps=_apps(apps, cfg.standalone)))


def _env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in COMMAND_VARIABLES or name in TOOL_VARIABLES:
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        if section in _CONVERTERS and key in _CONVERTERS[section]:
            out.setdefault(section, {})[key] = value
        else:
            raise ConfigError(name, value, "an APPCONNECTOR_<SECTION>_<KEY> variable naming a known key")
    return out


def load(path: str | Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (TOML) with environment overrides; raises ConfigError naming the bad key."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = tomllib.loads(Path(path).read_bytes().decode("utf-8"))  # TOML is UTF-8 whatever the locale
        except OSError as e:
            raise ConfigError("--config", str(path), f"a readable TOML file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError("--config", str(path), f"a UTF-8 TOML file ({e.reason} at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", str(path), f"valid TOML ({e})") from None
    for section, values in _env_overrides(env).items():
        merged = dict(raw.get(section, {}))
        merged.update(values)
        raw[section] = merged
    return _build(raw, source)


def demo(state_dir: str | Path, env: Mapping[str, str] | None = None, *, nat: bool = False) -> Config:
    """The embedded single-node default used when ``run`` has no config file (docs/design.md §7).

    ``nat``: the host can steer (the caller checks it), so the demo turns NAT on; NAT it did not ask
    for must never make the demo unready. ``APPCONNECTOR_NAT_ENABLED`` still decides when set."""
    base: dict[str, dict[str, object]] = {
        "tailnet": {"mode": "standalone"},
        "dns": {"verify_upstream": False},
        "cluster": {"state_dir": str(state_dir)},
        "nat": {"enabled": nat},
    }
    env = os.environ if env is None else env
    for section, values in _env_overrides(env).items():
        base.setdefault(section, {}).update(values)
    return _build(base, "<embedded demo>")


def config_keys() -> dict[str, list[str]]:
    """Every section and key, for docs and tests that the sample config covers all of them
    (``[[apps]]``, empty by default, has its keys in ``APP_KEYS``)."""
    return {f.name: [g.name for g in fields(getattr(Config(), f.name))]
            for f in fields(Config) if f.name not in ("source", "apps")}
