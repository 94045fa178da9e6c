"""A connector takes back the pool routes it added on every stop, crash included (issue 15).

Real processes: `appconnector run` in tailscale mode beside a tailscaled stand-in process (on loopback:
the stand-in says this node's tailnet IPv4 is 127.0.0.1). A SIGTERM or a fatal start-up error withdraws
the routes in the process; after a kill -9 the routes stay until `appconnector routes withdraw` (the
systemd unit's ExecStopPost) takes them back. Only routes the connector added are withdrawn, never
with `tailnet.advertise_routes = false`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.localapi_standin import get_state
from tests.ops.helpers import REPO, cli, free_port, wait_until

OTHER = "192.168.50.0/24"  # advertised by the operator before the connector came
POOL = "100.64.1.0/24"



def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("APPCONNECTOR_", "NOTIFY_SOCKET", "WATCHDOG_"))}


class Host:
    """One host: a tailscaled stand-in process and the connector's config."""

    def __init__(self, tmp: Path, routes: list[str], advertise: bool = True, raft_port: int = 0) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "ts.sock")
        state = {"style": "delta", "prefs": {"AdvertiseRoutes": routes},
                 "self": {"stable_id": "nConn", "name": "conn", "addresses": ["127.0.0.1"]},
                 "peers": [{"stable_id": "nClient", "name": "client", "addresses": ["127.0.0.9"]}]}
        (tmp / "state.json").write_text(json.dumps(state))
        self.standin = subprocess.Popen([sys.executable, str(REPO / "tests" / "localapi_standin.py"),
                                         "--socket", self.sock, "--state", str(tmp / "state.json")],
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        out = self.standin.stdout
        assert out is not None and "listening" in out.readline()
        self.http = free_port()
        self.dns = free_port()
        self.config = tmp / "c.toml"
        self.config.write_text(f"""
[tailnet]
mode = "tailscale"
localapi_socket = "{self.sock}"
advertise_routes = {"true" if advertise else "false"}
[dns]
listen = ["127.0.0.1:{self.dns}"]
upstream = ["192.0.2.1:53"]
verify_upstream = false
[pool]
prefixes = ["{POOL}"]
[cluster]
state_dir = "{tmp / 'state'}"
raft_port = {raft_port or free_port()}
[nat]
enabled = false
[http]
listen = "127.0.0.1:{self.http}"
""")
        self.proc: subprocess.Popen[str] | None = None

    def routes(self) -> list[str]:
        return list(get_state(self.sock)["prefs"]["AdvertiseRoutes"] or [])

    def run(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        with open(self.tmp / "run.log", "w") as log:  # a file, not a pipe: a full pipe would block it
            self.proc = subprocess.Popen([sys.executable, "-m", "appconnector.cli", "run", "--config",
                                          str(self.config)], cwd=REPO, env={**_env(), **(extra_env or {})},
                                         stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return self.proc

    def output(self) -> str:
        return (self.tmp / "run.log").read_text()

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"run exited: {self.output()[-3000:]}"
        return cli("status", "--http", f"127.0.0.1:{self.http}", "--timeout", "2").returncode == 0

    def stop(self) -> None:
        for p in (self.proc, self.standin):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def host_factory(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    made: list[Host] = []

    def make(routes: list[str], **kw: object) -> Host:
        h = Host(tmp_path, routes, **kw)  # type: ignore[arg-type]
        made.append(h)
        return h
    yield make
    for h in made:
        h.stop()


def test_sigterm_withdraws_only_the_routes_the_connector_added(host_factory: Callable[..., Host]) -> None:
    h = host_factory([OTHER])
    proc = h.run()
    wait_until(h.ready, 60, "the connector to be ready")
    assert h.routes() == [OTHER, POOL]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert h.routes() == [OTHER], "the pool route is withdrawn, the operator's route stays"
    assert "withdrew routes 100.64.1.0/24" in h.output()


def test_withdraw_command_after_kill9_takes_back_the_crashed_connectors_routes(
        host_factory: Callable[..., Host]) -> None:
    h = host_factory([OTHER])
    proc = h.run()
    wait_until(h.ready, 60, "the connector to be ready")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert h.routes() == [OTHER, POOL], "a crashed connector cannot withdraw: tailscaled keeps the route"
    env = {"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}  # as ExecStopPost gets them
    res = cli("routes", "withdraw", "--config", str(h.config), env=env)
    assert res.returncode == 0, res.stderr
    assert h.routes() == [OTHER]
    assert "withdrew 100.64.1.0/24" in res.stdout and "SERVICE_RESULT=signal" in res.stdout
    again = cli("routes", "withdraw", "--config", str(h.config))
    assert again.returncode == 0 and "nothing to withdraw" in again.stdout
    assert h.routes() == [OTHER]


def test_a_pool_route_advertised_before_the_connector_stays(host_factory: Callable[..., Host]) -> None:
    h = host_factory([POOL, OTHER])
    proc = h.run()
    wait_until(h.ready, 60, "the connector to be ready")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    res = cli("routes", "withdraw", "--config", str(h.config))
    assert res.returncode == 0 and "nothing to withdraw" in res.stdout, res.stdout + res.stderr
    assert h.routes() == [POOL, OTHER], "not ours: the operator advertised it"


def test_withdraw_never_touches_routes_when_advertise_routes_is_off(host_factory: Callable[..., Host]) -> None:
    h = host_factory([OTHER, POOL], advertise=False)
    # a record left from when the connector managed the routes does not make them ours again
    (h.tmp / "state").mkdir()
    (h.tmp / "state" / "advertised-routes.json").write_text(json.dumps({"routes": [POOL]}))
    proc = h.run()
    wait_until(h.ready, 60, "the connector to be ready")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert h.routes() == [OTHER, POOL]
    res = cli("routes", "withdraw", "--config", str(h.config))
    assert res.returncode == 0 and "advertise_routes = false" in res.stdout
    assert h.routes() == [OTHER, POOL]


def test_a_fatal_start_up_error_after_advertising_withdraws(host_factory: Callable[..., Host]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        h = host_factory([OTHER], raft_port=taken.getsockname()[1])
        proc = h.run()
        assert proc.wait(timeout=60) == 1, h.output()[-3000:]
    assert "cannot start" in h.output()
    assert h.routes() == [OTHER], "the route advertised before the failure is withdrawn"


def test_withdraw_command_reports_an_unreachable_tailscaled(host_factory: Callable[..., Host]) -> None:
    h = host_factory([OTHER])
    proc = h.run()
    wait_until(h.ready, 60, "the connector to be ready")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    os.killpg(h.standin.pid, signal.SIGKILL)
    h.standin.wait()
    res = cli("routes", "withdraw", "--config", str(h.config))
    assert res.returncode == 1 and "routes withdraw" in res.stderr and h.sock in res.stderr
    assert (h.tmp / "state" / "advertised-routes.json").exists(), "the record stays for the next try"
