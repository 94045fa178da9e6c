"""A tailscale-mode connector whose state is marked untrusted withdraws its pool route (CLARIFICATIONS
"Fail-stop that stays stopped": a member with the marker answers REFUSED, is unready, routes withdrawn).

One connector with its tailscaled stand-in in a namespace of its own. The first run leaves Raft state and
advertises the pool route, then crashes (kill -9: the route stays advertised); the marker is what a run
that found its state diverged leaves behind (``pool/storage.py``). Started again, the connector takes the
pool route out of tailscaled's prefs (keeping the operator's), answers REFUSED and reports unready.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appconnector.pool.storage import StatePaths, mark_untrusted
from tests.localapi_standin import get_state
from tests.ops.helpers import wait_until
from tests.tailnet.test_tailscale_mode import _ask, _cli, _Fleet, _query, netns  # noqa: F401 (fixture)

ONE = {"nConnA": "127.0.0.1"}


@pytest.mark.root
@pytest.mark.cluster
@pytest.mark.usefixtures("netns")
def test_a_member_marked_untrusted_withdraws_its_route_refuses_and_is_unready(tmp_path: Path) -> None:
    fleet = _Fleet(tmp_path)
    sid, ip = "nConnA", ONE["nConnA"]
    try:
        fleet.standin(sid, ip, ONE)
        fleet.start(sid)
        wait_until(lambda: fleet.ready(sid), 60, "the connector ready")
        assert _query(ip, 5353)
        # a crash (a clean stop withdraws the route itself): the pool route stays advertised
        fleet.procs[sid].kill()
        fleet.procs[sid].wait(timeout=10)
        routes = get_state(fleet.socks[sid])["prefs"]["AdvertiseRoutes"]
        assert routes == ["192.168.50.0/24", "100.64.1.0/24"], routes

        mark_untrusted(StatePaths.for_member(tmp_path / sid, f"{ip}:6270").dir, "journal conflict (test)")
        fleet.start(sid)
        wait_until(lambda: "untrusted state" in fleet.log(sid), 30, "the connector to say why it serves nothing")
        wait_until(lambda: get_state(fleet.socks[sid])["prefs"]["AdvertiseRoutes"] == ["192.168.50.0/24"], 20,
              "the pool route withdrawn, the operator's kept")
        assert _ask(ip, 5353)[0] == 5, "REFUSED"
        res = _cli("status", "--http", f"{ip}:8893")
        assert res.returncode == 1 and "untrusted state (journal conflict (test))" in res.stdout, res
    finally:
        codes = fleet.stop()
    assert codes == {sid: 0}
