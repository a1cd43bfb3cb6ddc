"""Benchmark differentially private SQL (run by hand; not a timed test).

On a silver customers table of N rows (default 1M; built as benchmarks/bench_sql.py builds it,
by importing its generator) the analyst role's queries are private (``query: private``):

* utility: the relative error of DP ``COUNT(*)`` and ``AVG(income)``, overall and by region, against
  the exact answer over the same rows (the analyst's view: row filter, income bucketed), at ε 0.1,
  1 and 10 per query — the median over ``--trials`` releases, and the 95% interval's half-width as
  OpenDP states it. ``AVG(income)`` is clamped to the policy's range: as shipped (0–100,000,000)
  and tightened (0–500,000), to show what the range costs.
* overhead: ``run_query`` of the same aggregate as the private analyst and as an exact twin role
  (same columns, masks and row filter, ``query: exact``), in the same run: medians of ``--repeat``
  after a warm-up, and the first private query's time (it builds the OpenDP measurement, then
  cached per process).

Results go to benchmarks/results/private_sql.json and are printed as tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_sql import CONFIG, silver_customers, timed  # noqa: E402
from deltalake import write_deltalake  # noqa: E402

from governance.gate import Resource  # noqa: E402
from governance.keys import generate_kek_b64  # noqa: E402
from governance.keys.native import keyed_hashes  # noqa: E402
from governance.policy import Stage  # noqa: E402
from governance.workspace import Workspace  # noqa: E402
from lakehouse.catalog import Catalog, TableRef, table_configuration  # noqa: E402
from lakehouse.masks import hash_column  # noqa: E402
from lakehouse.private_sql import compile_plan  # noqa: E402
from lakehouse.silver import MASK_HASH_KEY, hashed_columns  # noqa: E402
from lakehouse.sql import _checked, _execute, run_query  # noqa: E402

console = Console()
EPSILONS = (0.1, 1.0, 10.0)
QUERIES = {
    "count": "SELECT COUNT(*) AS v FROM customers",
    "count by region": "SELECT region, COUNT(*) AS v FROM customers GROUP BY region",
    "mean income": "SELECT AVG(income) AS v FROM customers",
    "mean income by region": "SELECT region, AVG(income) AS v FROM customers GROUP BY region",
}
OVERHEAD_SQL = "SELECT region, COUNT(*) AS n, AVG(income) AS mean_income FROM customers GROUP BY region"


def _project(tmp: Path, income_max: float) -> Path:
    """A project whose analyst is private and whose twin role ``exact_analyst`` (user exa) is exact."""
    shutil.copytree(REPO / "policies", tmp / "policies")
    (tmp / "lakewarden.yaml").write_text(CONFIG)
    path = tmp / "policies" / "customers.yaml"
    pol = yaml.safe_load(path.read_text())
    pol["access"]["exact_analyst"] = dict(pol["access"]["analyst"])
    pol["access"]["analyst"]["query"] = "private"
    pol["columns"]["income"]["max"] = income_max
    pol["privacy"]["epsilon_total"] = 1000.0
    pol["private_queries"] = {"epsilon_per_query": 10.0, "delta_per_query": 1e-6}
    path.write_text(yaml.safe_dump(pol, sort_keys=False))
    roles = tmp / "policies" / "roles.yaml"
    cat = yaml.safe_load(roles.read_text())
    cat["roles"]["exact_analyst"] = {"description": "the analyst, answered exactly (benchmark twin)",
                                     "stages": ["query"]}
    cat["principals"]["exa"] = ["exact_analyst"]
    roles.write_text(yaml.safe_dump(cat, sort_keys=False))
    return tmp / "lakewarden.yaml"


def _exact(rows: pa.Table, group: bool, kind: str) -> dict[str, float]:
    """The exact answer over the rows the mechanism reads."""
    val = [c for c in rows.column_names if c.startswith("__lw_dp_v_")]
    if group:
        keys = rows["region"].unique().to_pylist()
        out = {}
        for k in keys:
            sub = rows.filter(pc.equal(rows["region"], k))
            out[k] = float(sub.num_rows) if kind == "count" else pc.mean(sub[val[0]]).as_py()
        return out
    return {"": float(rows.num_rows) if kind == "count" else pc.mean(rows[val[0]]).as_py()}


KEYED_SQL = "SELECT zip_code, COUNT(*) AS v FROM customers GROUP BY zip_code"


def keyed(ws: Workspace, trials: int) -> dict[str, dict]:
    """GROUP BY a column without public keys (zip_code): OpenDP's thresholded key release at δ = 1e-6.
    Which keys come back, what the suppressed ones held, and the released counts' error."""
    ana = ws.actor("ana")
    decision = ws.gate.enforce(Stage.QUERY, ana, Resource.table("customers"), {"layer": "silver"})
    out: dict[str, dict] = {}
    for eps in (0.1, 1.0):
        plan = compile_plan(KEYED_SQL, ws, TableRef("silver", "customers"), decision, epsilon=eps)
        fetch = plan.fetch_sql()
        rows = _execute(ws, ana, fetch, _checked(fetch, ws), version=None, as_of=None, max_rows=None).table
        counts = rows.group_by("zip_code").aggregate([("zip_code", "count")])
        exact = dict(zip(counts["zip_code"].to_pylist(), counts["zip_code_count"].to_pylist()))
        threshold = plan.threshold(rows.schema)
        released, errs = [], []
        for _ in range(trials):
            t, _ = plan.release(rows)
            got = dict(zip(t["zip_code"].to_pylist(), t["v"].to_pylist()))
            released.append(len(got))
            errs += [abs(v - exact[k]) / exact[k] for k, v in got.items()]
        small = [n for n in exact.values() if n < (threshold or 0)]
        out[str(eps)] = {"keys_in_data": len(exact), "keys_released_median": statistics.median(released),
                         "threshold": threshold, "keys_below_threshold": len(small), "rows_in_them": sum(small),
                         "smallest_group": min(exact.values()),
                         "median_relative_error": statistics.median(errs) if errs else None}
    return out


def utility(ws: Workspace, trials: int) -> dict[str, dict]:
    ana = ws.actor("ana")
    decision = ws.gate.enforce(Stage.QUERY, ana, Resource.table("customers"), {"layer": "silver"})
    out: dict[str, dict] = {}
    for label, sql in QUERIES.items():
        group = "GROUP BY" in sql
        kind = "count" if "COUNT" in sql else "mean"
        per_eps = {}
        for eps in EPSILONS:
            plan = compile_plan(sql, ws, TableRef("silver", "customers"), decision, epsilon=eps)
            fetch = plan.fetch_sql()
            rows = _execute(ws, ana, fetch, _checked(fetch, ws), version=None, as_of=None, max_rows=None).table
            exact = _exact(rows, group, kind)
            errs, halves = [], []
            for _ in range(trials):  # the verb's release, ε charged like run_query (here: run_query once, below)
                t, _ = plan.release(rows)
                keys = t["region"].to_pylist() if group else [""]
                for i, k in enumerate(keys):
                    if k not in exact:  # a policy key with no rows in the view (restricted): no exact answer
                        continue
                    v = t["v"][i].as_py()
                    errs.append(abs(v - exact[k]) / exact[k])
                    halves.append((t["v_ci_high"][i].as_py() - t["v_ci_low"][i].as_py()) / 2 / exact[k])
            per_eps[str(eps)] = {"median_relative_error": statistics.median(errs),
                                 "p95_relative_error": sorted(errs)[int(0.95 * (len(errs) - 1))],
                                 "median_ci_halfwidth_relative": statistics.median(halves)}
        # the same query through run_query (gate, ledger, audit) once per ε: what an analyst pays
        for eps in EPSILONS:
            run_query(ws, ana, sql, epsilon=eps)
        out[label] = {"sql": sql, "by_epsilon": per_eps}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "private_sql.json")
    args = ap.parse_args()
    os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
    with console.status(f"generating {args.rows:,} silver rows"):
        table = silver_customers(args.rows)
    results: dict[str, dict] = {}
    overhead: dict[str, float] = {}
    keyed_results: dict[str, dict] = {}
    for range_label, income_max in (("policy range 0-100,000,000", 100_000_000), ("tightened 0-500,000", 500_000)):
        tmp = Path(tempfile.mkdtemp(prefix="lw-bench-dp-"))
        try:
            ws = Workspace.open(_project(tmp, income_max))
            ref = TableRef("silver", "customers")
            t = table
            key = ws.keyring.system_key(MASK_HASH_KEY)
            for c in hashed_columns(ws.policies, "customers"):
                t = t.append_column(hash_column(c), keyed_hashes(key, t[c]))
            write_deltalake(Catalog(ws.config).uri(ref), t,
                            configuration=table_configuration(t.column_names, "customer_id"))
            if not overhead:
                ana, exa = ws.actor("ana"), ws.actor("exa")
                with console.status("overhead: first private query (builds the OpenDP measurement)"):
                    t0 = time.perf_counter()
                    run_query(ws, ana, OVERHEAD_SQL, epsilon=1.0)
                    first = time.perf_counter() - t0
                with console.status("overhead: exact and private, warm"):
                    exact_s, exact_all = timed(lambda: run_query(ws, exa, OVERHEAD_SQL), args.repeat)
                    priv_s, priv_all = timed(lambda: run_query(ws, ana, OVERHEAD_SQL, epsilon=1.0), args.repeat)
                    keyed_exact_s, _ = timed(lambda: run_query(ws, exa, KEYED_SQL), args.repeat)
                    keyed_s, _ = timed(lambda: run_query(ws, ana, KEYED_SQL, epsilon=1.0), args.repeat)
                overhead = {"sql": OVERHEAD_SQL, "exact_median_s": exact_s, "private_median_s": priv_s,
                            "ratio": priv_s / exact_s, "private_first_s": first,
                            "exact_samples_s": exact_all, "private_samples_s": priv_all,
                            "keyed_sql": KEYED_SQL, "keyed_exact_median_s": keyed_exact_s,
                            "keyed_private_median_s": keyed_s, "keyed_ratio": keyed_s / keyed_exact_s}
                with console.status("keys found in the data (thresholded)"):
                    keyed_results = keyed(ws, args.trials)
            with console.status(f"utility, {range_label}"):
                results[range_label] = utility(ws, args.trials)
            ws.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    import opendp

    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "opendp": getattr(opendp, "__version__", "0.16.0")},
        "rows": args.rows, "trials": args.trials, "repeat": args.repeat,
        "note": "relative error = |DP - exact| / exact over the analyst's view (row filter applied, income "
                "bucketed to 10,000); median (and 95th percentile) over trials x groups",
        "utility": results,
        "keys_from_data": {"sql": KEYED_SQL, "delta": 1e-6, "by_epsilon": keyed_results},
        "overhead": overhead,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for range_label, res in results.items():
        tab = Table(title=f"DP utility, {args.rows:,} customers, income {range_label}: median relative error "
                          f"(95% CI half-width)")
        tab.add_column("query")
        for eps in EPSILONS:
            tab.add_column(f"ε={eps:g}")
        for label, r in res.items():
            tab.add_row(label, *(f"{r['by_epsilon'][str(e)]['median_relative_error']:.2e} "
                                 f"({r['by_epsilon'][str(e)]['median_ci_halfwidth_relative']:.1e})" for e in EPSILONS))
        console.print(tab)
    tab = Table(title=f"keys found in the data: {KEYED_SQL} (δ = 1e-6)")
    for col in ("ε", "keys in data", "released (median)", "threshold", "keys below it", "smallest group",
                "median rel. error"):
        tab.add_column(col)
    for eps, r in keyed_results.items():
        tab.add_row(eps, str(r["keys_in_data"]), f"{r['keys_released_median']:g}", str(r["threshold"]),
                    str(r["keys_below_threshold"]), str(r["smallest_group"]),
                    f"{r['median_relative_error']:.2e}" if r["median_relative_error"] is not None else "—")
    console.print(tab)
    console.print(f"thresholded query: exact {overhead['keyed_exact_median_s'] * 1e3:.0f} ms, private "
                  f"{overhead['keyed_private_median_s'] * 1e3:.0f} ms ({overhead['keyed_ratio']:.2f}×)")
    console.print(f"overhead: exact {overhead['exact_median_s'] * 1e3:.0f} ms, private "
                  f"{overhead['private_median_s'] * 1e3:.0f} ms ({overhead['ratio']:.2f}×), first private query "
                  f"{overhead['private_first_s'] * 1e3:.0f} ms")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
