"""The floor benchmark's stand-ins (benchmarks/bench_ingest_floor.py) stay true to the key store.

The benchmark replaces the key store's bulk call to measure what the rest of a governed ingest
costs. If that call's signature moved on, every stand-in run would fail or measure something
else; if a stand-in's tokens or keys stopped being ones the ingest accepts, its rows would be
quarantined and its time would not be an ingest's. Both are checked here on a small file.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pytest

from governance.keys import generate_kek_b64, native
from lakehouse.synth import generate

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(native.backend() != "native", reason="the floor is measured on the native core")


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_ingest_floor", REPO / "benchmarks" / "bench_ingest_floor.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_the_stand_in_takes_what_the_key_store_passes_to_its_bulk_call():
    bench = _bench()
    ns: dict = {}
    argv, real = sys.argv, native.resolve_subjects
    sys.argv = ["-c", "", "", "governed"]  # the side that defines the stand-ins and replaces nothing
    try:
        exec(bench.STAND_IN, ns)  # noqa: S102 - the benchmark's own code, as its subprocess runs it
    finally:
        sys.argv, native.resolve_subjects = argv, real
    assert ns["native"].resolve_subjects is real
    assert inspect.signature(ns["stand_in"]).parameters.keys() == inspect.signature(real).parameters.keys()


@pytest.mark.parametrize("side", ["crypto", "layout", "none"])
def test_every_row_of_a_stand_in_run_is_accepted(tmp_path, side):
    bench = _bench()
    generate(tmp_path / "landing", people=2_000, transactions_per_person=1, seed=3)
    env = {**os.environ, "LAKEWARDEN_KEK": generate_kek_b64()}
    out = bench._side(side, tmp_path / "landing" / "customers.csv", env)
    assert out["rows"] == out["accepted"] == 2_000
    assert out["seconds"] > 0 and out["cpu_seconds"] > 0
    if side == "layout":  # every new subject went into the layout's key blocks
        assert out["layout_subjects"] == 2_000
