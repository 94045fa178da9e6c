"""``release_batch``: the mappings of revoked access leave the state (and nothing else), deterministically,
and junk never raises nor changes anything."""

from __future__ import annotations

import pytest

from appconnector.pool.state import InvalidCommand, PoolState
from tests.pool.test_state import T0, checkout

PREFIX = "100.64.1.0/29"


def test_release_removes_only_the_named_mappings_and_the_address_comes_back() -> None:
    s = PoolState([PREFIX])
    a = checkout(s, "n1", "a.example")
    b = checkout(s, "n1", "b.example")
    other = checkout(s, "n2", "a.example")
    changes = s.release_batch([("n1", "a.example"), ("n1", "gone.example"), ("nX", "a.example")], T0 + 1)
    assert changes.removed == [("n1", a, "a.example")]
    assert s.lookup("n1", "a.example") is None
    assert s.lookup("n1", "b.example") is not None and s.lookup("n2", "a.example") is not None
    assert checkout(s, "n1", "c.example", T0 + 2) == a  # lowest free again
    assert other == s.lookup("n2", "a.example")[0]  # type: ignore[index]
    assert s.domain_for("n1", b) == "b.example"


def test_releasing_the_last_mapping_drops_targets_and_matches_a_restored_copy() -> None:
    s = PoolState([PREFIX])
    checkout(s, "n1", "a.example", targets=(1,))
    changes = s.release_batch([("n1", "a.example")], T0 + 1)
    assert changes.targets == {"a.example": ()}
    assert s.targets("a.example") == ()
    restored = PoolState.from_bytes(s.to_bytes(), [PREFIX])
    assert restored.digest() == s.digest()
    assert checkout(s, "n1", "b.example", T0 + 2) == checkout(restored, "n1", "b.example", T0 + 2)
    assert restored.digest() == s.digest()


@pytest.mark.parametrize("command", [
    ("release_batch",), ("release_batch", "n1", T0), ("release_batch", (("n1",),), T0),
    ("release_batch", ((1, "a.example"), ("n1", None), "x"), T0), ("release_batch", (), float("nan")),
    ("release_batch", (("n1", "a.example"),), "later"),
])
def test_junk_never_raises_and_changes_nothing(command: tuple[object, ...]) -> None:
    s = PoolState([PREFIX])
    checkout(s, "n1", "a.example")
    before = s.digest()
    result, changes = s.apply(command)
    assert not changes.removed and s.digest() == before
    assert isinstance(result, InvalidCommand) or changes.report.invalid > 0
