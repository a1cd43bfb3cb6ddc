"""Benchmark ``privacy risk`` (k-anonymity / l-diversity, issue #20) against a plain GROUP BY (run by hand).

The demo's customers (``lakehouse.synth.generate``, default 1M people, seed 0) are ingested and built
into silver for real (tokens, sealed sensitive columns, generalized birth year and 3-digit ZIP).
Then, in the same run, each timed ``--repeats`` times after a warm-up (medians reported):

* plain: a fresh DuckDB connection over silver's pyarrow dataset,
  ``SELECT birth_date, zip_code, count(*) FROM silver GROUP BY ALL`` fetched;
* risk k: ``privacy_risk`` as dana (data engineer: may see the quasi-identifiers, may not open the
  sensitive columns) — the gate decision, reading the two columns, the class table, the size
  distribution, the smallest classes, the audit record;
* risk k+l: ``privacy_risk`` as sam (data scientist: the gate lets him open ``sex`` and ``ethnicity``
  for fairness evaluation) — also opens 2 × N sealed values, each under its subject's key.

Results go to benchmarks/results/anonymity.json and are printed as a table.
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
from datetime import date
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from governance.keys import generate_kek_b64  # noqa: E402
from governance.workspace import Workspace  # noqa: E402
from lakehouse.anonymity import privacy_risk  # noqa: E402
from lakehouse.catalog import Catalog, TableRef  # noqa: E402
from lakehouse.ingest import ingest  # noqa: E402
from lakehouse.silver import build_silver  # noqa: E402
from lakehouse.synth import generate  # noqa: E402

from bench_sql import CONFIG  # noqa: E402  (the benchmarks' project: the same file bench_private_sql writes)

console = Console()


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out = fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anonymity.json")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-anon-"))
    try:
        shutil.copytree(REPO / "policies", tmp / "policies")
        (tmp / "lakewarden.yaml").write_text(CONFIG)
        os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
        ws = Workspace.open(tmp / "lakewarden.yaml")
        t0 = time.perf_counter()
        res = generate(tmp / "landing", people=args.people, transactions_per_person=0, seed=0, bad_rows=0)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        t_ingest = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_silver(ws, ws.actor("dana"), "customers")
        t_silver = time.perf_counter() - t0
        dt = Catalog(ws.config).open(TableRef("silver", "customers"))

        def plain():
            con = duckdb.connect(":memory:")
            con.register("silver", dt.to_pyarrow_dataset())
            t = con.sql("SELECT birth_date, zip_code, count(*) AS n FROM silver GROUP BY ALL").to_arrow_table()
            con.close()
            return t

        p_med, p_runs, classes = _timed(plain, args.repeats)
        k_med, k_runs, rep_k = _timed(lambda: privacy_risk(ws, ws.actor("dana"), "customers", k_min=5), args.repeats)
        l_med, l_runs, rep_l = _timed(lambda: privacy_risk(ws, ws.actor("sam"), "customers", k_min=5),
                                      max(1, args.repeats // 2))
        ws.close()
        assert rep_k.measure.classes == classes.num_rows  # the same classes as the plain GROUP BY
        m = rep_l.measure
        result = {
            "issue": 20,
            "date": date.today().isoformat(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "duckdb": duckdb.__version__,
            "people": args.people,
            "data": "demo customers (lakehouse.synth.generate, seed 0), ingested and built into silver for real",
            "setup_s": {"generate": round(t_gen, 2), "ingest": round(t_ingest, 2), "silver": round(t_silver, 2)},
            "measure": {"rows": m.rows, "classes": m.classes, "k": m.k, "classes_below_5": m.classes_below,
                        "rows_below_5": m.rows_below, "l": dict(m.l)},
            "median_s": {"plain_group_by": round(p_med, 4), "risk_k": round(k_med, 4), "risk_k_l": round(l_med, 4)},
            "runs_s": {"plain_group_by": [round(x, 4) for x in p_runs], "risk_k": [round(x, 4) for x in k_runs],
                       "risk_k_l": [round(x, 4) for x in l_runs]},
            "note": "risk_k_l opens 2 x N sealed values; at 200k people a profile puts ~76% of it in the key store's DEK lookup (KeyRing.open_arrow looks the subjects' DEKs up once per column), the rest in AES-GCM opening",
            "ratio": {"risk_k_over_plain": round(k_med / p_med, 2), "risk_k_l_over_plain": round(l_med / p_med, 2)},
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    t = Table(title=f"privacy risk over {args.people:,} customers (medians of {args.repeats})")
    for c in ("what", "seconds", "× plain"):
        t.add_column(c, justify="left" if c == "what" else "right")
    t.add_row("plain GROUP BY birth_date, zip_code", f"{p_med:.3f}", "1.00")
    t.add_row("privacy risk: k (dana)", f"{k_med:.3f}", f"{k_med / p_med:.2f}")
    t.add_row("privacy risk: k + l(sex, ethnicity) (sam)", f"{l_med:.3f}", f"{l_med / p_med:.2f}")
    console.print(t)
    console.print(f"setup: generate {t_gen:.1f} s, ingest {t_ingest:.1f} s, silver {t_silver:.1f} s; "
                  f"k={m.k}, classes={m.classes:,}, l={dict(m.l)}; wrote {args.out}")


if __name__ == "__main__":
    main()
