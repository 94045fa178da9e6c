"""Bounded fuzzing of the SVCB/HTTPS RDATA codec (see fuzz_svcb.py for the long runs)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dns.fuzz_svcb import SEEDS, check, main

LONG = os.environ.get("APPCONNECTOR_LONG") == "1"
pytestmark = pytest.mark.timeout(3600 if LONG else 300)


def test_seeds_are_accepted() -> None:
    from appconnector.dns import svcb

    for seed in SEEDS:
        svcb.parse(seed)  # the mutations start from valid records
        check(seed)


@settings(max_examples=200_000 if LONG else 1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=60))
def test_random_bytes_never_crash(data: bytes) -> None:
    check(data)


@settings(max_examples=200_000 if LONG else 2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
       st.integers(0, 200))
def test_mutated_records_never_crash(seed: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    b = bytearray(seed)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    check(bytes(b[:cut] if cut < len(b) else b))


def test_mutation_fuzzer_runs() -> None:
    assert main(["--iterations", str(1_000_000 if LONG else 30_000), "--seed", "1"]) == 0
