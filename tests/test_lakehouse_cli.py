"""The lakehouse commands as a user runs them: generate → ingest → silver → tables → sql."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_helpers import lw_in

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lake")
    shutil.copytree(REPO / "policies", d / "policies")
    assert lw_in(d, "init", ".").returncode == 0
    g = lw_in(d, "generate", "--out", "landing", "--people", "400", "--transactions-per-person", "3",
              "--bad-rows", "0.05", "--seed", "3")
    assert g.returncode == 0, g.stderr
    for ds in ("customers", "transactions"):
        p = lw_in(d, "ingest", ds, f"landing/{ds}.csv", "--json", user="dana")
        assert p.returncode == 0, p.stderr
        rep = json.loads(p.stdout)
        assert rep["rows_read"] == rep["rows_accepted"] + rep["rows_quarantined"]
        assert lw_in(d, "silver", ds, user="dana").returncode == 0
    return d


def test_ingest_report_counts_the_injected_bad_rows(lake: Path):
    p = lw_in(lake, "sql", "SELECT count(*) AS n FROM quarantine.customers", "--format", "json", user="dana")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)[0]["n"] >= 15  # 5% of 400 bad rows, each quarantined


def test_tables_commands(lake: Path):
    out = lw_in(lake, "tables", "list").stdout
    for t in ("bronze.customers", "silver.customers", "vault.customers", "quarantine.customers", "bronze.transactions"):
        assert t in out
    d = lw_in(lake, "tables", "describe", "bronze.customers").stdout
    assert "direct_identifier" not in d and "quasi_identifier" in d and "generalize" in d
    h = lw_in(lake, "tables", "history", "bronze.customers").stdout
    assert "WRITE" in h and "Append" in h
    assert lw_in(lake, "tables", "optimize", "bronze.customers", user="ana").returncode == 3
    assert lw_in(lake, "tables", "optimize", "bronze.customers", user="dana").returncode == 0
    v = lw_in(lake, "tables", "vacuum", "bronze.customers", user="dana")
    assert v.returncode == 0 and "would delete" in v.stdout
    bad = lw_in(lake, "tables", "describe", "../etc")
    assert bad.returncode == 2 and "invalid table name '../etc'" in bad.stderr


def test_sql_as_analyst_csv_and_parquet(lake: Path, tmp_path: Path):
    p = lw_in(lake, "sql", "SELECT region, count(*) AS n FROM customers GROUP BY region ORDER BY region",
              "--format", "csv", user="ana")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert rows and "restricted" not in {r["region"] for r in rows}  # the row filter
    out = tmp_path / "r.parquet"
    p = lw_in(lake, "sql", "SELECT * FROM customers", "--format", "parquet", "--out", str(out), user="ana")
    assert p.returncode == 0, p.stderr
    t = pq.read_table(out)
    assert "sex" not in t.column_names and "email" not in t.column_names
    assert all(len(h) == 32 for h in t["customer_id"].to_pylist())  # keyed hashes of the tokens (128 bits, hex)
    assert all(i % 10000 == 0 for i in t["income"].to_pylist() if i is not None)  # bucketed


def test_sql_refusals_are_one_line(lake: Path):
    p = lw_in(lake, "sql", "SELECT * FROM read_csv('/etc/passwd')", user="ana")
    assert p.returncode == 2 and p.stderr.startswith("error:")
    p = lw_in(lake, "sql", "SELECT 1", "--role", "compliance_officer", user="ana")
    assert p.returncode == 3 and "builtin/role-not-held" in p.stderr
    p = lw_in(lake, "sql", "SELECT * FROM customers", "--format", "parquet", user="ana")
    assert p.returncode == 2 and "--out" in p.stderr


def test_sql_time_travel(lake: Path):
    now = lw_in(lake, "sql", "SELECT count(*) AS n FROM bronze.customers", "--format", "json", user="dana")
    v0 = lw_in(lake, "sql", "SELECT count(*) AS n FROM bronze.customers", "--format", "json", "--version", "0",
               user="dana")
    assert now.returncode == 0 and v0.returncode == 0, v0.stderr
    assert json.loads(v0.stdout)[0]["n"] == json.loads(now.stdout)[0]["n"]  # one ingest, one version of rows
    p = lw_in(lake, "sql", "SELECT 1 FROM bronze.customers", "--version", "999", user="dana")
    assert p.returncode == 2 and "999" in p.stderr


@pytest.mark.slow  # Feast apply, materialize, training set and online, ~11 s on 2 cores
def test_features_commands(lake: Path, tmp_path: Path):
    assert lw_in(lake, "features", "apply", user="ana").returncode == 3  # analysts do not run the feature store
    p = lw_in(lake, "features", "apply", user="dana")
    assert p.returncode == 0 and "customer_profile" in p.stdout, p.stderr
    assert lw_in(lake, "features", "materialize", user="dana").returncode == 0
    out = tmp_path / "ts.parquet"
    p = lw_in(lake, "features", "training-set", "--purpose", "credit_scoring", "--label", "defaulted",
              "--features", "customer_profile:income,customer_profile:region", "--out", str(out), user="sam")
    assert p.returncode == 0, p.stderr
    t = pq.read_table(out)
    assert t.num_rows == 400 and {"customer_id", "income", "region", "defaulted"} <= set(t.column_names)
    token = t["customer_id"][0].as_py()
    p = lw_in(lake, "features", "online", "--purpose", "credit_scoring", "--features", "customer_profile:income",
              "--tokens", token, user="mel")
    assert p.returncode == 0 and token in p.stdout
    p = lw_in(lake, "features", "training-set", "--purpose", "credit_scoring", "--features", "customer_sensitive:sex",
              user="sam")
    assert p.returncode == 3 and "customers/purposes/credit_scoring/sensitive" in p.stderr
    p = lw_in(lake, "features", "online", "--purpose", "credit_scoring", "--features", "customer_profile:income",
              "--tokens", "C-000000001", user="mel")
    assert p.returncode == 2 and "not subject tokens" in p.stderr
