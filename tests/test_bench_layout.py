"""The key store layout experiment (benchmarks/bench_keystore_layout.py) merges what it claims to.

Its figure is only worth something if the tiered merges it times are the ones it describes: with
a fan-out of 2, four batches become two runs of the first level, then one of the second, and each
merged subject is counted once per merge it goes through.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_keystore_layout", REPO / "benchmarks" / "bench_keystore_layout.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_four_batches_at_fan_out_two_end_as_one_run_of_the_second_level(tmp_path):
    r = _bench().run(20_000, 5_000, 2, tmp_path)
    assert r["runs_by_level"] == [(2, 1)]
    assert r["merged_entries"] == 10_000 + 10_000 + 20_000
    assert r["store_mb"] > 20_000 * (60 + 40) / 1e6  # every subject's wrapped key and index entry are stored
    assert not list(tmp_path.iterdir())  # the experiment's file is removed


def test_the_experiment_checks_its_runs_hold_every_subject_in_order(tmp_path, monkeypatch):
    bench = _bench()
    r = bench.run(12_000, 3_000, 4, tmp_path)  # checks itself (untimed) before it reports
    assert r["runs_by_level"] == [(1, 1)]
    # a sort that does not sort must be caught by that check (monkeypatch puts argsort back)
    monkeypatch.setattr(bench.np, "argsort", lambda a, kind=None: bench.np.arange(len(a)))
    with pytest.raises(SystemExit, match="not in blind-index order"):
        bench.run(12_000, 3_000, 4, tmp_path)
