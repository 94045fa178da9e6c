"""The ``appconnector`` command.

Exit codes (docs/design.md §7, appconnector/fatal.py), for scripts:
  run            0 after SIGTERM/SIGINT, 2 bad config, 1 runtime failure, 3 untrusted state (see `state reset`)
  state reset    0 done, 1 refused (the connector is running, or the state is trusted and no --force), 2 bad config
  check-config   0 valid, 2 invalid (the message names the key)
  status         0 healthy (ready), 1 unhealthy or unreachable, 2 bad usage
  pool, cluster  0 done, 1 not found / refused / unreachable, 2 bad usage (or no admin token to read)
  routes         0 done or nothing to do, 1 tailscaled unreachable/refused, 2 bad config
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import ipaddress
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from appconnector import config, logs
from appconnector.config import Config, ConfigError
from appconnector.fatal import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from appconnector.secrets_file import read_secret_file

log = logging.getLogger("appconnector")

EXIT_FAIL, EXIT_USAGE = EXIT_FAILURE, EXIT_CONFIG
DEMO_STATE_DIR = "./state"
# upstream natc's ULA: fd7a:115c:a1e0:a99c::/64 with the site ID in bytes 8-9, a /80 per site
ULA_BASE = ipaddress.IPv6Address("fd7a:115c:a1e0:a99c::")


def ula(site_id: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network((int(ULA_BASE) | (site_id << 48), 80))


# ---- configuration --------------------------------------------------------------------------------


def config_path(arg: str | None) -> str | None:
    return arg or os.environ.get("APPCONNECTOR_CONFIG") or None


def load_config(arg: str | None) -> Config:
    return config.load(config_path(arg))


def validate_for_run(cfg: Config) -> None:
    """Checks beyond parsing that need the filesystem: secret file, control-API credentials, DNS loops."""
    from appconnector.dns.loops import check_upstreams
    from appconnector.tailnet.routes import control_credentials
    from appconnector.tailnet.settings import TailnetSettings

    cfg.read_secret()
    if cfg.admin_token_path().exists():  # made at first start; one others can read is refused
        read_secret_file("http.admin_token_file", cfg.admin_token_path())
    if not cfg.standalone:
        control_credentials(TailnetSettings.from_config(cfg))
        check_upstreams(cfg)


def demo_config() -> tuple[Config, str]:
    """The demo's config and a phrase saying whether NAT is on and why. The demo steers only when this
    host can (root, IPv4 forwarding on), so it is ready either way; ``APPCONNECTOR_NAT_ENABLED`` asks
    explicitly (and then NAT that cannot run is a failing readiness check, as with a config file)."""
    from appconnector.nat.links import missing_prerequisite

    env_key = "APPCONNECTOR_NAT_ENABLED"
    missing = missing_prerequisite()
    cfg = config.demo(state_dir=DEMO_STATE_DIR, nat=missing is None)
    if env_key in os.environ:
        return cfg, f"NAT {'on' if cfg.nat.enabled else 'off'} ({env_key})"
    if missing is not None:
        return cfg, f"NAT off, DNS only: {missing}"
    return cfg, "NAT on (pool addresses are steered by nftables)"


def _config_error(e: ConfigError) -> int:
    print(f"appconnector: bad config: {e}", file=sys.stderr)
    return EXIT_USAGE


# ---- run ------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    try:
        logs.setup(args.log_level, args.log_format)
    except ValueError as e:
        print(f"appconnector: {e}", file=sys.stderr)
        return EXIT_USAGE
    path = config_path(args.config)
    nat_note = ""
    try:
        if path is None:
            cfg, nat_note = demo_config()
        else:
            cfg = config.load(path)
        validate_for_run(cfg)
    except ConfigError as e:
        log.error("bad config: %s", e, extra={"key": e.key})
        return EXIT_USAGE
    if path is None:
        host, port = cfg.dns_listen()[0]
        log.info("no config file (--config or APPCONNECTOR_CONFIG): starting the standalone single-node demo, "
                 "state in %s, DNS on %s:%d, upstream verification off, %s. Try: dig @%s -p %d example.com "
                 "(or kdig @%s -p %d example.com)", DEMO_STATE_DIR, host, port, nat_note, host, port, host, port)
    try:
        app = importlib.import_module("appconnector.app")
    except ImportError as e:
        log.error("appconnector.app is not available: %s", e)
        return EXIT_FAIL
    try:
        code = asyncio.run(app.serve(cfg))
    except ConfigError as e:
        log.error("bad config: %s", e, extra={"key": e.key})
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("appconnector failed")
        return EXIT_FAIL
    return int(code) if isinstance(code, int) else EXIT_OK


# ---- check-config ---------------------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    try:
        cfg = config.load(path)
        validate_for_run(cfg)
    except ConfigError as e:
        return _config_error(e)
    nets = config.pool_networks(cfg.pool.prefixes)
    size = sum(n.num_addresses for n in nets) - 1
    print(f"ok: {cfg.source}: mode {cfg.tailnet.mode}, pool {', '.join(cfg.pool.prefixes)} ({size} addresses "
          f"for nodes), DNS on {', '.join(f'{h}:{p}' for h, p in cfg.dns_listen())}, "
          f"upstream {', '.join(cfg.dns.upstream) or 'from /etc/resolv.conf'}, "
          f"NAT {'on' if cfg.nat.enabled else 'off'}, status on http://{cfg.http.listen}/, "
          f"admin on http://{cfg.http.admin_listen}/ (token {cfg.admin_token_path()})")
    if not cfg.standalone:
        dns_host = cfg.dns_listen()[0][0]
        print(f"split DNS: point the app domains at {dns_host}"
              f"{' (the reserved first pool address)' if not cfg.dns.listen else ''}; "
              f"clients need the route(s) {', '.join(str(n) for n in nets)} (Linux: tailscale set --accept-routes)")
    if not cfg.standalone and (inside := config.pool_in_node_range(cfg.pool.prefixes)):
        print(f"note: pool {inside} lies inside {config.TAILSCALE_NODE_RANGE}, where Tailscale assigns node "
              "addresses: addresses nodes hold are skipped, with a warning (a range of its own is cleaner: "
              "docs/deploy.md, Choose the pool)")
    if not cfg.standalone and not Path(cfg.tailnet.localapi_socket).exists():
        print(f"note: {cfg.tailnet.localapi_socket} does not exist yet: `run` needs tailscaled running "
              "(tailnet.localapi_socket)")
    if path is None:
        print("note: no config file given (--config or APPCONNECTOR_CONFIG): checked the defaults "
              "and APPCONNECTOR_* variables")
    return EXIT_OK


# ---- state reset -----------------------------------------------------------------------------------


def cmd_state_reset(args: argparse.Namespace) -> int:
    from appconnector.pool.storage import StateInUse, member_dirs, reset, untrusted_reason

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _config_error(e)
    state_dir = Path(cfg.cluster.state_dir)
    dirs = member_dirs(state_dir)
    if not dirs:
        print(f"appconnector: no member state in {state_dir} (cluster.state_dir): nothing to reset")
        return EXIT_OK
    trusted = [d for d in dirs if untrusted_reason(d) is None]
    if trusted and not args.force:
        print(f"appconnector: the state in {', '.join(map(str, trusted))} is not marked untrusted; refusing to "
              "wipe it without --force (in a one-member cluster it is the only copy of the pool)", file=sys.stderr)
        return EXIT_FAIL
    code = EXIT_OK
    for d in dirs:
        reason = untrusted_reason(d)
        try:
            removed = reset(d)
        except StateInUse as e:
            print(f"appconnector: {e}: stop it first (systemctl stop appconnector)", file=sys.stderr)
            code = EXIT_FAIL
            continue
        print(f"reset {d}: removed {', '.join(removed) or 'nothing'}"
              + (f" (it was untrusted: {reason})" if reason else ""))
    if code == EXIT_OK:
        print("start the connector: it begins with an empty pool copy and, in a multi-member cluster, receives "
              "a snapshot from the leader")
    return code


# ---- print-ula ------------------------------------------------------------------------------------


def cmd_print_ula(args: argparse.Namespace) -> int:
    if not 0 <= args.site_id <= 0xFFFF:
        print("appconnector: --site-id must be 0..65535", file=sys.stderr)
        return EXIT_USAGE
    print(ula(args.site_id))
    return EXIT_OK


# ---- talking to a running instance ----------------------------------------------------------------


class Unreachable(Exception):
    pass


class TokenRefused(Exception):
    pass


def _base_url(args: argparse.Namespace, admin: bool) -> str:
    if admin:
        cfg = load_config(args.config)
        listen = args.admin or cfg.http.admin_listen
        config.check_admin_address("--admin" if args.admin else "http.admin_listen", listen, cfg.standalone)
    else:
        listen = args.http or load_config(args.config).http.listen
        config.parse_hostport("--http" if args.http else "http.listen", listen)
    return f"http://{listen}"


def admin_token(args: argparse.Namespace) -> str:
    """The instance's admin token, from ``http.admin_token_file`` (default: in ``cluster.state_dir``)."""
    path = load_config(args.config).admin_token_path()
    try:
        return read_secret_file("http.admin_token_file", path)
    except ConfigError as e:
        hint = ("; `run` makes it at first start: is the instance running with this config? (for the demo "
                f"run without one: APPCONNECTOR_CLUSTER_STATE_DIR={DEMO_STATE_DIR})") if not path.exists() else ""
        raise ConfigError(e.key, e.value, e.allowed + hint) from None


def http_call(args: argparse.Namespace, path: str, body: dict[str, Any] | None = None, *,
              admin: bool = False) -> tuple[int, Any]:
    """(HTTP status, decoded JSON) from the running instance; raises Unreachable, or TokenRefused
    when the admin listener does not take our token. Admin calls carry the token; a body is JSON."""
    headers = {"Authorization": f"Bearer {admin_token(args)}"} if admin else {}
    url = _base_url(args, admin) + path
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        if admin and e.code == 401:
            raise TokenRefused(f"{url}: the admin token was refused (is http.admin_token_file, "
                               f"{load_config(args.config).admin_token_path()}, the running instance's?)") from None
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(f"cannot reach appconnector at {url}: {reason}") from None


def _client(fn: Any) -> Any:
    """Wrap a client command: config errors → 2, unreachable → 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except ConfigError as e:
            return _config_error(e)
        except Unreachable as e:
            key = "http.admin_listen" if hasattr(args, "admin") else "http.listen"
            print(f"appconnector: {e} (is it running? is {key} the same?)", file=sys.stderr)
            return EXIT_FAIL
        except TokenRefused as e:
            print(f"appconnector: {e}", file=sys.stderr)
            return EXIT_FAIL
    return run


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def _get_object(args: argparse.Namespace, path: str, *, admin: bool = False) -> dict[str, Any] | None:
    """GET ``path``: the JSON object of a 200 answer, else None after saying on stderr what came back."""
    code, doc = http_call(args, path, admin=admin)
    if code == 200 and isinstance(doc, dict):
        return doc
    print(f"appconnector: {path.split('?')[0]} answered HTTP {code}: {doc}", file=sys.stderr)
    return None


@_client
def cmd_status(args: argparse.Namespace) -> int:
    doc = _get_object(args, "/status")
    if doc is None:
        return EXIT_FAIL
    if args.json:
        _print(doc)
    else:
        raft = doc.get("raft") or {}
        pool = doc.get("pool") or {}
        print(f"{'ready' if doc.get('ready') else 'NOT READY'}  mode={doc.get('mode')}  role={raft.get('role')}  "
              f"leader={raft.get('leader')}  term={raft.get('term')}  members={len(raft.get('members') or [])}  "
              f"mappings={pool.get('mappings')}")
        for name, check in (doc.get("checks") or {}).items():
            print(f"  {'ok  ' if check.get('ok') else 'FAIL'} {name}: {check.get('detail')}")
    return EXIT_OK if doc.get("ready") else EXIT_FAIL


def last_used_text(last_used: float, now: float) -> str:
    """A last-used time for people: UTC ISO time and age, e.g. ``2026-12-01T11:20:03Z (7m12s ago)``."""
    stamp = datetime.datetime.fromtimestamp(last_used, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    age = max(0, int(now - last_used))
    days, rest = divmod(age, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        ago = f"{days}d{hours:02d}h"
    elif hours:
        ago = f"{hours}h{minutes:02d}m"
    elif minutes:
        ago = f"{minutes}m{seconds:02d}s"
    else:
        ago = f"{seconds}s"
    return f"{stamp} ({ago} ago)"


def non_negative(text: str) -> int:
    """argparse type: a whole number ≥ 0 (argparse turns the error into exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 or more")
    return value


@_client
def cmd_pool_show(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    if args.node:
        query["node"] = args.node
    doc = _get_object(args, "/pool?" + urllib.parse.urlencode(query), admin=True)
    if doc is None:
        return EXIT_FAIL
    if args.json:
        _print(doc)
        return EXIT_OK
    pool_time = doc.get("pool_time")
    now = float(pool_time) if isinstance(pool_time, int | float) else time.time()
    for m in doc.get("mappings", []):
        print(f"{m['node']}\t{m['domain']}\t{m['address']}\t{last_used_text(m['last_used'], now)}")
    print(f"# {doc.get('shown')} of {doc.get('total')} mapping(s)", file=sys.stderr)
    return EXIT_OK


@_client
def cmd_pool_lookup(args: argparse.Namespace) -> int:
    code, doc = http_call(args, "/pool/lookup?" + urllib.parse.urlencode({"node": args.node, "domain": args.domain}),
                          admin=True)
    if code == 200 and isinstance(doc, dict):
        print(doc["address"] if not args.json else json.dumps(doc, indent=2))
        return EXIT_OK
    msg = doc.get("error") if isinstance(doc, dict) else doc
    print(f"appconnector: {args.node} {args.domain}: {msg}", file=sys.stderr)
    return EXIT_USAGE if code == 400 else EXIT_FAIL


@_client
def cmd_cluster_members(args: argparse.Namespace) -> int:
    doc = _get_object(args, "/cluster/members")
    if doc is None:
        return EXIT_FAIL
    if args.json:
        _print(doc)
        return EXIT_OK
    leader = doc.get("leader")
    connected = doc.get("connected")
    for m in doc.get("members") or []:
        marks = [w for w, on in (("leader", m == leader), ("self", m == doc.get("self")),
                                 ("unreachable", isinstance(connected, list) and bool(doc.get("self"))
                                  and m not in connected and m != doc.get("self")),
                                 # this member's own view: not added yet, or removed with `cluster remove`
                                 ("joining", m == doc.get("self") and doc.get("membership") == "joining"),
                                 ("removed", m == doc.get("self") and doc.get("membership") == "removed")) if on]
        print(m + (f"  ({', '.join(marks)})" if marks else ""))
    return EXIT_OK


@_client
def cmd_cluster_remove(args: argparse.Namespace) -> int:
    code, doc = http_call(args, "/cluster/remove", {"member": args.member}, admin=True)
    if code == 200:
        print(f"removed {args.member}")
        return EXIT_OK
    msg = doc.get("error") if isinstance(doc, dict) else doc
    print(f"appconnector: cannot remove {args.member}: {msg}", file=sys.stderr)
    return EXIT_USAGE if code == 400 else EXIT_FAIL


def cmd_routes_withdraw(args: argparse.Namespace) -> int:
    from appconnector.tailnet.api import TailnetUnavailable
    from appconnector.tailnet.localapi import LocalAPIError
    from appconnector.tailnet.routes import withdraw_recorded
    from appconnector.tailnet.settings import TailnetSettings

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        return _config_error(e)
    # under systemd's ExecStopPost: say after what (a crash, a kill, a clean stop)
    after = " ".join(f"{k}={os.environ[k]}" for k in ("SERVICE_RESULT", "EXIT_CODE", "EXIT_STATUS") if k in os.environ)
    try:
        done = ("standalone mode: no routes are advertised; nothing withdrawn" if cfg.standalone
                else asyncio.run(withdraw_recorded(TailnetSettings.from_config(cfg))))
    except (TailnetUnavailable, LocalAPIError, RuntimeError) as e:
        print(f"appconnector: routes withdraw: {e} (socket {cfg.tailnet.localapi_socket})", file=sys.stderr)
        return EXIT_FAIL
    print(f"routes withdraw: {done}" + (f" (after the service stopped: {after})" if after else ""))
    return EXIT_OK


# ---- argument parsing -----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="appconnector",
        description="A Tailscale app connector: answers DNS for app domains with addresses from a "
                    "Raft-replicated pool and steers their traffic to the real services with nftables.",
        epilog="Exit codes: 0 ok; 1 runtime failure, unhealthy or unreachable; 2 bad config or usage; 3 (run) "
               "this member's state is untrusted (it diverged from the cluster or a snapshot would not install): "
               "it serves nothing until `appconnector state reset`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="PATH",
                       help="TOML config file (default: $APPCONNECTOR_CONFIG; APPCONNECTOR_<SECTION>_<KEY> "
                            "variables override its keys)")

    def with_client(p: argparse.ArgumentParser, admin: bool = False) -> None:
        with_config(p)
        if admin:
            p.add_argument("--admin", metavar="IP:PORT",
                           help="the instance's http.admin_listen (default: from the config); the token is read "
                                "from http.admin_token_file (default: admin.token in cluster.state_dir)")
        else:
            p.add_argument("--http", metavar="IP:PORT", help="the instance's http.listen (default: from the config)")
        p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
        p.add_argument("--json", action="store_true", help="print the raw JSON answer")

    p = sub.add_parser("run", help="run the connector (DNS, pool replica, NAT, status HTTP) until SIGTERM",
                       description="Run the connector in the foreground until SIGTERM/SIGINT. Without a config "
                                   "file it starts the standalone single-node demo (DNS on 127.0.0.1:5353, "
                                   "state in ./state). Exit 0 after a signal, 2 for a bad config, 1 on a runtime "
                                   "failure (the log line `fatal:` says why), 3 when this member's state can no "
                                   "longer be trusted (journal divergence, a snapshot that would not install): it "
                                   "then serves nothing, even after a restart, until `appconnector state reset`.")
    with_config(p)
    p.add_argument("--log-level", default=os.environ.get("APPCONNECTOR_LOG_LEVEL", "info"), choices=logs.LEVELS)
    p.add_argument("--log-format", default=os.environ.get("APPCONNECTOR_LOG_FORMAT", "kv"), choices=logs.FORMATS,
                   help="kv: key=value lines (default); json: one JSON object per line")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file (0 valid, 2 invalid)",
                       description="Load and validate the config as `run` would (including the secret file and, "
                                   "in tailscale mode, DNS loops through MagicDNS). Exit 0 when valid, 2 with a "
                                   "message naming the key when not.")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("status", help="health of the running instance (0 ready, 1 not ready or unreachable)",
                       description="Ask the running instance (http.listen) for its status: readiness checks, "
                                   "Raft role and leader, pool use. Exit 0 when ready, 1 when not or unreachable.")
    with_client(p)
    p.set_defaults(func=cmd_status)

    state = sub.add_parser("state", help="this connector's state directory (cluster.state_dir)",
                           description="Work on the state directory of a stopped connector.")
    state_sub = state.add_subparsers(dest="state_command", required=True, metavar="SUBCOMMAND")
    p = state_sub.add_parser(
        "reset", help="wipe the Raft data and the untrusted-state marker (connector stopped)",
        description="Remove the Raft journal, its meta file and the full dump of each member directory in "
                    "cluster.state_dir, and the untrusted-state marker that keeps a member that exited with code 3 "
                    "from serving. The membership record stays, so in a multi-member cluster the member starts "
                    "empty and the leader sends it a fresh snapshot (reseed); a single member starts with an empty "
                    "pool. Refuses while the connector runs, and without --force when no state is marked untrusted. "
                    "Exit 0 done, 1 refused, 2 bad config.")
    with_config(p)
    p.add_argument("--force", action="store_true", help="wipe even state that is not marked untrusted")
    p.set_defaults(func=cmd_state_reset)

    p = sub.add_parser("print-ula", help="print upstream natc's IPv6 ULA prefix for a site ID",
                       description="Print the ULA prefix upstream natc uses for --site-id (fd7a:115c:a1e0:a99c::/64 "
                                   "with the site ID in bytes 8-9). appconnector itself answers AAAA with NODATA "
                                   "(netfilter cannot NAT IPv6 to IPv4), so this is for migrating from natc.")
    p.add_argument("--site-id", type=int, default=1, help="0..65535 (natc's default is 1)")
    p.set_defaults(func=cmd_print_ula)

    pool = sub.add_parser("pool", help="inspect the address pool of the running instance",
                          description="Inspect the replicated pool through the running instance's admin "
                                      "listener (http.admin_listen, with the token in http.admin_token_file).")
    pool_sub = pool.add_subparsers(dest="pool_command", required=True, metavar="SUBCOMMAND")
    p = pool_sub.add_parser("show", help="list mappings: node, domain, address, last used (UTC time and age; "
                                         "--json: unix time)")
    with_client(p, admin=True)
    p.add_argument("--node", help="only this node (StableID in tailscale mode, client IP in standalone mode)")
    p.add_argument("--limit", type=non_negative, default=1000, help="at most this many rows (default 1000)")
    p.set_defaults(func=cmd_pool_show)
    p = pool_sub.add_parser("lookup", help="the address a node was given for a domain (1 when unmapped)")
    with_client(p, admin=True)
    p.add_argument("node")
    p.add_argument("domain")
    p.set_defaults(func=cmd_pool_lookup)

    cluster = sub.add_parser("cluster", help="Raft cluster membership of the running instance",
                             description="Show or change the Raft cluster through the running instance.")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    p = cluster_sub.add_parser("members", help="list members, marking the leader and this member")
    with_client(p)
    p.set_defaults(func=cmd_cluster_members)
    p = cluster_sub.add_parser("remove", help="remove a member (ip:port) from the cluster; it stops serving",
                               description="Remove a member from the cluster through Raft (asked of any member, "
                                           "done by the leader; the leader itself cannot be removed: stop it "
                                           "first). The removed member logs why, answers every DNS query REFUSED, "
                                           "withdraws the pool routes and reports not ready; it stays out, even "
                                           "after a restart, until its state directory is emptied. A member that "
                                           "is only down rejoins by itself.")
    with_client(p, admin=True)
    p.add_argument("member", metavar="IP:PORT")
    p.set_defaults(func=cmd_cluster_remove)

    routes = sub.add_parser("routes", help="the pool routes advertised through tailscaled",
                            description="Manage the subnet routes this product advertises through tailscaled.")
    routes_sub = routes.add_subparsers(dest="routes_command", required=True, metavar="SUBCOMMAND")
    p = routes_sub.add_parser("withdraw", help="withdraw the routes a stopped or crashed connector added",
                              description="Withdraw the pool routes that `run` recorded as added by it (in "
                                          "cluster.state_dir), leaving every other advertised route, and a pool "
                                          "route that was advertised before it came, in place. For use after the "
                                          "connector stopped (the systemd unit runs it in ExecStopPost, after a "
                                          "crash too): a running connector advertises them again. Does nothing "
                                          "when tailnet.advertise_routes = false. Exit 0 done or nothing to do, "
                                          "1 tailscaled unreachable or refused, 2 bad config.")
    with_config(p)
    p.set_defaults(func=cmd_routes_withdraw)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

