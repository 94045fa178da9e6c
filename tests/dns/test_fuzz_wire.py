"""Bounded fuzzing of the wire parser and fast path (see fuzz_wire.py for the long runs)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dns.fuzz_wire import SEEDS, check, main, make_fast_path

LONG = os.environ.get("APPCONNECTOR_LONG") == "1"
FAST = make_fast_path()
# the long run takes many minutes on a shared machine: lift pytest-timeout's 300 s for it
pytestmark = pytest.mark.timeout(3600 if LONG else 300)


@settings(max_examples=200_000 if LONG else 1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=80))
def test_random_bytes_never_crash_and_fast_path_agrees(data: bytes) -> None:
    check(data, FAST)


@settings(max_examples=200_000 if LONG else 2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
       st.integers(0, 200))
def test_mutated_queries_never_crash_and_fast_path_agrees(seed: bytes, edits: list[tuple[int, int]],
                                                         cut: int) -> None:
    b = bytearray(seed)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    check(bytes(b[:max(cut, 12)] if cut < len(b) else b), FAST)


def test_mutation_fuzzer_runs() -> None:
    assert main(["--iterations", str(2_000_000 if LONG else 30_000), "--seed", "1"]) == 0
