"""Retention as a user runs it: old rows go, new rows stay, counts add up, history is vacuumed."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from cli_helpers import lw_in
from deltalake import DeltaTable

REPO = Path(__file__).resolve().parents[1]
OLD = "'2022-01-01T00:00:00Z'"  # three years and more before any run of these tests
TOKEN = re.compile(r"sub_[a-z2-7]{26}")




def table(d: Path, name: str) -> DeltaTable:
    return DeltaTable(str(d / ".lakewarden/tables" / name.replace(".", "/")))


def on_disk(d: Path, name: str) -> set[str]:
    root = d / ".lakewarden/tables" / name.replace(".", "/")
    return {str(p.relative_to(root)) for p in root.rglob("*.parquet")}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Customers ingested, then a third of them back-dated to 2022 (bronze, vault, silver, quarantine)."""
    d = tmp_path_factory.mktemp("retention-base")
    shutil.copytree(REPO / "policies", d / "policies")
    for ds in ("customers", "transactions"):
        f = d / "policies" / f"{ds}.yaml"
        text = f.read_text().replace("landing: remove", "landing: keep").replace("history: 7d", "history: 0h")
        f.write_text(text)
    assert lw_in(d, "init", ".").returncode == 0
    assert lw_in(d, "generate", "--out", "landing", "--people", "90", "--transactions-per-person", "2",
                 "--bad-rows", "0.1", "--seed", "11").returncode == 0
    for ds in ("customers", "transactions"):
        p = lw_in(d, "ingest", ds, f"landing/{ds}.csv", user="dana")
        assert p.returncode == 0, p.stderr
        assert lw_in(d, "silver", ds, user="dana").returncode == 0
    bronze = table(d, "bronze.customers")
    old_tokens = [r["customer_id"] for r in bronze.to_pyarrow_table(columns=["customer_id", "_row"]).to_pylist()
                  if r["_row"] <= 30]
    assert 10 < len(old_tokens) < 40
    bronze.update(updates={"_ingested_at": OLD}, predicate="_row <= 30")
    table(d, "vault.customers").update(updates={"_ingested_at": OLD}, predicate="_row <= 30")
    listed = ", ".join(f"'{t}'" for t in old_tokens)
    table(d, "silver.customers").update(updates={"_ingested_at": OLD}, predicate=f"customer_id IN ({listed})")
    table(d, "quarantine.customers").update(updates={"_quarantined_at": OLD}, predicate="row_number <= 45")
    old = time.time() - 10 * 86400  # landed ten days ago: past the 7-day landing window
    os.utime(d / "landing/customers.csv", (old, old))
    (d / "landing/customers_next.csv").write_text("customer_id\n")  # never ingested: must stay
    return d


@pytest.fixture
def lake(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "lake"
    shutil.copytree(base, d)
    old = time.time() - 10 * 86400
    os.utime(d / "landing/customers.csv", (old, old))  # copytree keeps times; be explicit
    return d


def _old_counts(d: Path) -> dict[str, int]:
    import pyarrow.compute as pc

    out = {}
    for name, col in (("bronze.customers", "_ingested_at"), ("vault.customers", "_ingested_at"),
                      ("silver.customers", "_ingested_at"), ("quarantine.customers", "_quarantined_at")):
        t = table(d, name).to_pyarrow_table(columns=[col])
        out[name] = pc.sum(pc.less(pc.year(t[col]), 2023)).as_py() or 0
    return out


def _state(d: Path) -> dict[str, tuple[int, int, frozenset[str]]]:
    names = ("bronze.customers", "vault.customers", "silver.customers", "quarantine.customers", "bronze.transactions")
    return {n: (table(d, n).version(), table(d, n).count(), frozenset(on_disk(d, n))) for n in names}


@pytest.mark.real_clock  # landing files and vacuumed data files are aged by their modification times
def test_old_rows_go_new_rows_stay_and_counts_add_up(lake: Path):
    old = _old_counts(lake)
    assert all(v > 0 for v in old.values()), old
    rows = {n: table(lake, n).count() for n in old}
    p = lw_in(lake, "tables", "enforce-retention", "--landing", "landing", "--json", user="dana")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    by = {t["table"]: t for t in rep["tables"]}
    for name, n_old in old.items():
        t = by[name]
        assert t["rows_deleted"] == n_old, name
        assert t["rows_before"] == rows[name] == t["rows_deleted"] + t["rows_after"]
        assert table(lake, name).count() == t["rows_after"] == rows[name] - n_old
        assert t["version_after"] > t["version_before"]  # the delete, then VACUUM's own commits
    assert _old_counts(lake) == dict.fromkeys(old, 0)  # nothing old is left
    assert by["bronze.transactions"]["rows_deleted"] == 0  # nothing of transactions is old
    assert rep["rows_deleted"] == sum(old.values())
    # landing: the expired ingested file went; the fresh one and the never-ingested one stay
    assert not (lake / "landing/customers.csv").exists()
    assert (lake / "landing/transactions.csv").exists() and (lake / "landing/customers_next.csv").exists()
    land = {x["dataset"]: x for x in rep["landing"]}
    assert (land["customers"]["files_removed"], land["transactions"]["files_kept"]) == (1, 1)
    assert rep["landing_not_ingested"] == 1


@pytest.mark.real_clock  # landing files and vacuumed data files are aged by their modification times
def test_history_is_vacuumed(lake: Path):
    before = on_disk(lake, "bronze.customers")
    p = lw_in(lake, "tables", "enforce-retention", "--json", user="carla")
    assert p.returncode == 0, p.stderr
    t = {x["table"]: x for x in json.loads(p.stdout)["tables"]}["bronze.customers"]
    assert t["history_hours"] == 0 and t["files_vacuumed"] > 0
    dt = table(lake, "bronze.customers")
    import pyarrow as pa

    live = set(pa.table(dt.get_add_actions(flatten=True))["path"].to_pylist())
    assert on_disk(lake, "bronze.customers") == live  # only the current version's files remain
    assert len(before - live) >= t["files_vacuumed"]
    with pytest.raises(Exception):  # the version with the old rows cannot be read any more
        DeltaTable(str(lake / ".lakewarden/tables/bronze/customers"), version=t["version_before"]).to_pyarrow_table()


def test_dry_run_changes_nothing_and_predicts_the_real_run(lake: Path):
    state = _state(lake)
    p = lw_in(lake, "tables", "enforce-retention", "--dry-run", "--landing", "landing", "--json", user="dana")
    assert p.returncode == 0, p.stderr
    dry = json.loads(p.stdout)
    assert dry["dry_run"] and _state(lake) == state
    assert (lake / "landing/customers.csv").exists()
    assert dry["rows_deleted"] == sum(_old_counts(lake).values()) > 0
    real = json.loads(lw_in(lake, "tables", "enforce-retention", "--json", user="dana").stdout)
    assert [(t["table"], t["rows_deleted"]) for t in dry["tables"]] == [(t["table"], t["rows_deleted"]) for t in real["tables"]]


def test_denied_for_an_analyst_and_nothing_changes(lake: Path):
    state = _state(lake)
    p = lw_in(lake, "tables", "enforce-retention", user="ana")
    assert p.returncode == 3 and "roles/stages/maintain" in p.stderr
    p = lw_in(lake, "tables", "enforce-retention", user="sam")
    assert p.returncode == 3 and "roles/stages/maintain" in p.stderr
    assert _state(lake) == state


def test_audited_per_table_with_counts_and_lineage(lake: Path):
    p = lw_in(lake, "tables", "enforce-retention", "--dataset", "customers", "--json", user="dana")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    q = lw_in(lake, "audit", "query", "--action", "retention.enforce", "--format", "json", user="carla")
    events = json.loads(q.stdout)
    assert sorted(e["resource"] for e in events) == sorted(f"table:{t['table']}" for t in rep["tables"])
    for e in events:
        det = json.loads(e["details"])
        assert det["rows_before"] == det["rows_deleted"] + det["rows_after"]
        assert e["subject_token"] is None and not TOKEN.search(e["details"])
    assert len(rep["lineage_runs"]) == 1
    out = lw_in(lake, "lineage", "show", "bronze.customers", "--direction", "down", user="dana").stdout
    assert "retention.customers" in out


def test_table_output_and_bad_input(lake: Path):
    p = lw_in(lake, "tables", "enforce-retention", "--dry-run", user="dana")
    assert p.returncode == 0 and "dry run: nothing changed" in p.stdout and "would delete" in p.stdout
    assert "bronze.customers" in p.stdout and "not checked" in p.stdout
    p = lw_in(lake, "tables", "enforce-retention", "--dataset", "nope", user="dana")
    assert p.returncode == 2 and "nope" in p.stderr
    p = lw_in(lake, "tables", "enforce-retention", "--landing", "no-such-dir", user="dana")
    assert p.returncode == 2 and "no-such-dir" in p.stderr
