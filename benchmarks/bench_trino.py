"""Benchmark analyst SQL: Trino against the embedded engine, each with and without the role's
masks and filters, same data, same run (run by hand; not a test).

Data: synthetic customers and transactions (default 1M people × 10 → ~10M transaction rows),
ingested through the governed path and built into silver. Ten analyst queries
(aggregations, joins, selective filters) run as the analyst ``ana`` (masked, filtered) and
unmasked: on Trino as Lakewarden's admin user (no masks, no filters), on the embedded side
as plain DuckDB over the same Delta versions. Median of ``--repeat`` runs after one warm-up of each,
the plain and governed runs alternating which goes first (an engine warms across runs).
Also reports Trino's start time and resident memory.

Goal (issues #9, #16): policy overhead ≤ 1.2× in both engines (geometric mean of the ten ratios);
each run's ratios are kept, so the spread over runs is reported beside the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console()

QUERIES = {
    "q01 agg customers": "SELECT region, count(*) AS n, avg(income) AS avg_income FROM customers GROUP BY region",
    "q02 agg channel": "SELECT channel, count(*) AS n, sum(amount) AS total FROM transactions GROUP BY channel",
    "q03 agg category": "SELECT merchant_category, avg(amount) AS a, max(amount) AS m FROM transactions GROUP BY merchant_category",
    "q04 join region": "SELECT c.region, count(*) AS n, sum(t.amount) AS total FROM customers c "
                       "JOIN transactions t ON c.customer_id = t.customer_id GROUP BY c.region",
    "q05 selective": "SELECT count(*) AS n FROM transactions WHERE amount > 5000",
    "q06 top spenders": "SELECT customer_id, sum(amount) AS s FROM transactions GROUP BY customer_id ORDER BY s DESC LIMIT 10",
    "q07 default by year": "SELECT birth_date, count(*) AS n, avg(CASE WHEN defaulted THEN 1.0 ELSE 0.0 END) AS rate "
                           "FROM customers GROUP BY birth_date",
    "q08 distinct online": "SELECT count(DISTINCT customer_id) AS n FROM transactions WHERE channel = 'online'",
    "q09 rich zips": "SELECT zip_code, count(*) AS n FROM customers WHERE income > 200000 GROUP BY zip_code "
                     "ORDER BY n DESC LIMIT 20",
    "q10 monthly": "SELECT date_trunc('month', ts) AS m, count(*) AS n FROM transactions GROUP BY 1",
}


SAMPLES: dict[str, list[float]] = {}


def paired(plain, governed, repeat: int, label: str) -> tuple[float, float]:
    """Medians of ``repeat`` runs of each, after a warm-up of each, alternating which goes first
    (an engine that warms across runs favours whichever runs second); the samples are kept."""
    plain()
    governed()
    ps, gs = [], []
    for i in range(repeat):
        order = ((plain, ps), (governed, gs)) if i % 2 == 0 else ((governed, gs), (plain, ps))
        for fn, out in order:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    SAMPLES[label + "p"], SAMPLES[label + "g"] = ps, gs
    return statistics.median(ps), statistics.median(gs)


def trino_rss_mb(srv) -> float | None:
    pid_file = srv.data / "var" / "run" / "launcher.pid"
    try:
        pid = pid_file.read_text().strip()
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=1_000_000)
    ap.add_argument("--tpp", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "trino.json")
    args = ap.parse_args()

    from governance.gate import Actor
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.sql import run_query as run_embedded
    from lakehouse.synth import generate
    from lakehouse.trino import ADMIN_USER, TrinoServer, default_home, install
    from lakehouse.trino import run_query as run_trino

    data = REPO / "benchmarks" / ".data" / f"p{args.people}_t{args.tpp:g}"
    if not (data / "transactions.csv").exists():
        with console.status("generating data"):
            generate(data, people=args.people, transactions_per_person=args.tpp, seed=1, overwrite=True)
    root = Path(tempfile.mkdtemp(prefix="lw-bench-trino-"))
    os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
    (root / "lakewarden.yaml").write_text(
        f"version: 1\nname: bench\nstorage: {{root: {root}/tables}}\nworkspace: {root}/ws\n"
        f"keys: {{store: {root}/keys/ks.db, kek: {{provider: env, var: LAKEWARDEN_KEK}}}}\n"
        f"trino: {{port: 8093}}\npolicies: [{REPO}/policies/*.yaml]\n"
    )
    ws = Workspace.open(root / "lakewarden.yaml")
    dana = ws.actor("dana")
    srv = None
    try:
        for ds in ("customers", "transactions"):
            landing = root / "landing" / f"{ds}.csv"
            landing.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data / f"{ds}.csv", landing)
            with console.status(f"ingesting {ds}"):
                ingest(ws, dana, ds, [landing])
            with console.status(f"building silver.{ds}"):
                build_silver(ws, dana, ds)
        home = default_home() if (default_home() / "bin" / "launcher").exists() else install()
        srv = TrinoServer(ws, home=home)
        start_s = srv.start()
        srv.sync(dana)
        rows = {ds: Catalog(ws.config).open(TableRef("silver", ds)).count() for ds in ("customers", "transactions")}

        plain = duckdb.connect()
        plain.execute("SET TimeZone='UTC'")
        for ds in ("customers", "transactions"):
            plain.register(ds, Catalog(ws.config).open(TableRef("silver", ds)).to_pyarrow_dataset())
        ana, admin = ws.actor("ana"), Actor(ADMIN_USER)
        results = []
        for name, sql in QUERIES.items():
            fallback = run_embedded(ws, ana, sql).warnings
            if fallback:  # a mask that fell back to NULL would make the governed side look cheap
                raise SystemExit(f"{name}: the governed query fell back: {fallback}")
            with console.status(name):
                tp, tg = paired(lambda: run_trino(ws, admin, sql), lambda: run_trino(ws, ana, sql), args.repeat, "t")
                ep, eg = paired(lambda: plain.sql(sql).to_arrow_table(), lambda: run_embedded(ws, ana, sql),
                                args.repeat, "e")
                r = {"query": name, "sql": sql, "trino_plain_s": tp, "trino_governed_s": tg,
                     "embedded_plain_s": ep, "embedded_governed_s": eg}
            r["trino_ratio"] = r["trino_governed_s"] / r["trino_plain_s"]
            r["embedded_ratio"] = r["embedded_governed_s"] / r["embedded_plain_s"]
            # the spread: each run's ratio (run i governed / run i plain)
            for eng, (g, p) in {"trino": ("tg", "tp"), "embedded": ("eg", "ep")}.items():
                r[f"{eng}_ratio_runs"] = [a / b for a, b in zip(SAMPLES[g], SAMPLES[p])]
                r[f"{eng}_samples_s"] = {"governed": SAMPLES[g], "plain": SAMPLES[p]}
            results.append(r)
        rss = trino_rss_mb(srv)
    finally:
        if srv is not None:
            srv.stop()
        ws.close()
        shutil.rmtree(root, ignore_errors=True)

    t = Table(title=f"analyst SQL over silver ({rows['customers']:,} customers, {rows['transactions']:,} transactions), "
                    f"median of {args.repeat}")
    for c in ("query", "Trino plain s", "Trino as analyst s", "ratio", "embedded plain s", "embedded as analyst s", "ratio "):
        t.add_column(c, justify="left" if c == "query" else "right")
    for r in results:
        t.add_row(r["query"], f"{r['trino_plain_s']:.3f}", f"{r['trino_governed_s']:.3f}", f"{r['trino_ratio']:.2f}",
                  f"{r['embedded_plain_s']:.3f}", f"{r['embedded_governed_s']:.3f}", f"{r['embedded_ratio']:.2f}")
    gm = lambda k: statistics.geometric_mean(r[k] for r in results)  # noqa: E731
    t.add_row("geometric mean", "", "", f"{gm('trino_ratio'):.2f}", "", "", f"{gm('embedded_ratio'):.2f}")
    console.print(t)
    console.print(f"Trino start: {start_s:.1f}s to answer queries; resident memory after the run: {rss or 0:.0f} MB")
    # the geometric mean per run index, so the spread over runs is reported, not only the medians'
    spread = {eng: [statistics.geometric_mean(r[f"{eng}_ratio_runs"][i] for r in results) for i in range(args.repeat)]
              for eng in ("trino", "embedded")}
    console.print(f"geometric mean per run: Trino {', '.join(f'{v:.2f}' for v in spread['trino'])}; "
                  f"embedded {', '.join(f'{v:.2f}' for v in spread['embedded'])}")
    out = {"cpus": os.cpu_count(), "issue": 16, "rows": rows, "trino_start_s": start_s, "trino_rss_mb": rss,
           "repeat": args.repeat, "geomean_trino_ratio": gm("trino_ratio"), "geomean_embedded_ratio": gm("embedded_ratio"),
           "geomean_per_run": spread, "queries": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
