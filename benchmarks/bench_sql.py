"""Benchmark the embedded SQL engine (run by hand; not a timed test).

The same aggregate query over a silver customers table of N rows (default 1M):

* governed: ``run_query`` as the analyst ana — parse and checks, the gate decision
  (and its audit record), opening the Delta table, the masked view (customer_id
  hashed, income bucketed) with the row filter, the query, the sql.query audit record;
* plain: DuckDB directly over the same pyarrow dataset — a fresh connection, the
  dataset registered, the same query, no views, no masks, no filter.

Each is timed 5 times after a warm-up; the medians and their ratio are reported
(goal: governed ≤ 1.2 × plain). A second query that touches the hashed subject key
(count distinct customer_id) is reported too, because hashing is the one mask that
costs real CPU per row.

Results go to benchmarks/results/sql.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from deltalake import write_deltalake
from rich.console import Console
from rich.table import Table

from governance.keys import generate_kek_b64
from governance.workspace import Workspace
from governance.keys.native import keyed_hashes
from lakehouse.catalog import Catalog, TableRef, table_configuration
from lakehouse.masks import hash_column
from lakehouse.silver import MASK_HASH_KEY, hashed_columns
from lakehouse.sql import run_query

REPO = Path(__file__).resolve().parents[1]
console = Console()

CONFIG = """\
version: 1
name: bench
storage: {root: .lakewarden/tables}
keys:
  store: .lakewarden/keys/keystore.db
  kek: {provider: env, var: LAKEWARDEN_KEK}
audit: {checkpoint_every: 1000}
policies: [policies/*.yaml]
"""
QUERIES = {
    "aggregate": (
        "SELECT region, count(*) AS n, avg(income) AS avg_income, "
        "avg(CASE WHEN defaulted THEN 1.0 ELSE 0.0 END) AS default_rate, min(birth_date) AS oldest "
        "FROM customers GROUP BY region ORDER BY region"
    ),
    "distinct subjects (hash)": "SELECT region, count(DISTINCT customer_id) AS subjects FROM customers GROUP BY region ORDER BY region",
}
_B32 = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz234567", dtype=np.uint8)


def silver_customers(n: int, seed: int = 7) -> pa.Table:
    """A synthetic silver customers table with the silver schema (tokens, generalized QIs, ciphertexts)."""
    rng = np.random.default_rng(seed)
    tok = _B32[rng.integers(0, 32, size=(n, 26))]
    tokens = np.char.add("sub_", tok.view("S26").ravel().astype("U26"))
    ct = rng.integers(0, 256, size=(n, 2, 40), dtype=np.uint8)
    regions = np.array(["north", "south", "east", "west", "restricted"])
    return pa.table(
        {
            "customer_id": pa.array(tokens.tolist(), pa.string()),
            "birth_date": pa.array(rng.integers(1940, 2006, n).astype(np.int32)),
            "zip_code": pa.array(np.char.zfill(rng.integers(0, 1000, n).astype(str), 3).tolist(), pa.string()),
            "sex": pa.array([r.tobytes() for r in ct[:, 0]], pa.binary()),
            "ethnicity": pa.array([r.tobytes() for r in ct[:, 1]], pa.binary()),
            "income": pa.array(np.round(rng.lognormal(10.5, 0.6, n), 2)),
            "region": pa.array(regions[rng.integers(0, 5, n)].tolist(), pa.string()),
            "defaulted": pa.array(rng.random(n) < 0.12),
        }
    )


def timed(fn, repeat: int) -> tuple[float, list[float]]:
    fn()  # warm-up (page cache, imports, first-call costs)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sql.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-sql-"))
    os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
    results: dict[str, dict] = {}
    try:
        shutil.copytree(REPO / "policies", tmp / "policies")
        (tmp / "lakewarden.yaml").write_text(CONFIG)
        ws = Workspace.open(tmp / "lakewarden.yaml")
        ref = TableRef("silver", "customers")
        with console.status(f"writing {args.rows:,} silver rows"):
            table = silver_customers(args.rows)
            # as build_silver writes it: the keyed hash of each column a role sees through `hash`
            key = ws.keyring.system_key(MASK_HASH_KEY)
            for c in hashed_columns(ws.policies, "customers"):
                table = table.append_column(hash_column(c), keyed_hashes(key, table[c]))
            write_deltalake(Catalog(ws.config).uri(ref), table,
                            configuration=table_configuration(table.column_names, "customer_id"))
        dataset = Catalog(ws.config).open(ref).to_pyarrow_dataset()
        actor = ws.actor("ana")

        for label, q in QUERIES.items():

            def plain(q: str = q) -> pa.Table:
                con = duckdb.connect(":memory:")
                try:
                    con.register("customers", dataset)
                    return con.sql(q).to_arrow_table()
                finally:
                    con.close()

            def governed(q: str = q) -> pa.Table:
                return run_query(ws, actor, q).table

            with console.status(f"{label}: plain DuckDB"):
                plain_s, plain_all = timed(plain, args.repeat)
            with console.status(f"{label}: governed run_query"):
                gov_s, gov_all = timed(governed, args.repeat)
            results[label] = {
                "sql": q,
                "plain_median_s": plain_s,
                "governed_median_s": gov_s,
                "ratio": gov_s / plain_s,
                "plain_samples_s": plain_all,
                "governed_samples_s": gov_all,
                "governed_rows": governed().num_rows,
            }
            check = run_query(ws, actor, q)
            if check.warnings:  # a mask that fell back to NULL would make the governed side look cheap
                raise SystemExit(f"{label}: the governed query fell back: {check.warnings}")
        ws.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "duckdb": duckdb.__version__},
        "rows": args.rows,
        "repeat": args.repeat,
        "goal_ratio": 1.2,
        "queries": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    t = Table(title=f"embedded SQL, {args.rows:,} silver rows, median of {args.repeat} ({os.cpu_count()} cores)")
    for c in ("query", "plain DuckDB", "governed (ana)", "ratio", "goal"):
        t.add_column(c)
    for label, r in results.items():
        t.add_row(label, f"{r['plain_median_s'] * 1e3:.1f} ms", f"{r['governed_median_s'] * 1e3:.1f} ms",
                  f"{r['ratio']:.2f}×", "≤ 1.2×" if label == "aggregate" else "(reported)")
    console.print(t)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
