"""Issue 9 item 5 through real `appconnector run` connectors: a wall clock days fast, on a follower or on
the leader, never lets an address used seconds ago go to another domain.

The issue's scenario: reuse_after = 1h, one connector 3 days fast (libfaketime, monotonic untouched),
a node whose pool is full asks more new names through the fast connector. Old main handed an address
used seconds ago to another domain on about the 15th such name (each command moved the pool's
high-water mark five minutes on); with the replicated pool clock every one of them is refused.
"""

from __future__ import annotations

from pathlib import Path

import dns.rcode
import pytest

from tests.faults.connector import ConnectorCluster
from tests.faults.dnsclient import can_bind
from tests.faults.nemesis import NemesisUnavailable, skew_env

pytestmark = [pytest.mark.cluster]

DAYS_FAST = 3 * 86400.0
NODE = "127.0.0.77"
POOL = "100.64.5.0/28"  # 15 usable addresses (the lowest is DNS's)


def _a(m: object) -> list[str]:
    return [str(rd) for rrset in m.answer for rd in rrset]  # type: ignore[attr-defined]


@pytest.mark.parametrize("skewed", ["follower", "leader"])
def test_a_days_fast_connector_never_reclaims_an_address_used_seconds_ago(tmp_path: Path, skewed: str) -> None:
    try:
        fast_env = skew_env(DAYS_FAST)
    except NemesisUnavailable as e:
        pytest.fail(str(e))  # libfaketime is a test dependency here: never skip silently
    if not can_bind(NODE):
        pytest.fail(f"cannot bind {NODE} on loopback")
    c = ConnectorCluster(tmp_path / "skew", 27700 if skewed == "follower" else 27760, prefixes=(POOL,),
                         reuse_after=3600.0)
    m1, m2, m3 = c.members["c1"], c.members["c2"], c.members["c3"]
    # the first two members elect the leader among themselves; the third joins as a follower
    if skewed == "leader":
        m1.env, m2.env = dict(fast_env), dict(fast_env)
        fast, honest = None, m3
    else:
        m3.env = dict(fast_env)
        fast, honest = m3, None
    try:
        for m in (m1, m2):
            m.start()
        for m in (m1, m2):
            m.wait_ready()
        leader = c.leader(timeout=20)
        m3.start()
        m3.wait_ready()
        if fast is None:
            fast = leader
        else:
            assert c.leader(timeout=20) is not m3, "the skewed member was meant to follow"
        honest = honest or m1
        # the node fills its pool through an honest member: every address used seconds ago
        used: dict[str, str] = {}
        for i in range(15):
            r = honest.dns.query(NODE, f"used{i}.example", 5.0)
            assert r.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(r.rcode())
            [used[f"used{i}.example"]] = _a(r)
        assert len(set(used.values())) == 15
        # then asks 20 new names through the fast connector: the pool is full and nothing is idle for
        # an hour on any clock that matters, so each is refused
        for i in range(20):
            r = fast.dns.query(NODE, f"new{i}.example", 5.0)
            got = _a(r)
            assert not set(got) & set(used.values()), (
                f"new{i}.example got {got}, an address used seconds ago (answered by {fast.name}, "
                f"{'leader' if fast is leader else 'follower'} 3 days fast)")
            assert r.rcode() == dns.rcode.SERVFAIL, f"new{i}.example: {dns.rcode.to_text(r.rcode())} {got}"
        # and every old name still means its address, on every member
        for m in (m1, m2, m3):
            for name, address in used.items():
                assert _a(m.dns.query(NODE, name, 5.0)) == [address], (m.name, name)
    finally:
        c.stop()
