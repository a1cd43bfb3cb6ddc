"""Benchmark governed ingest on Ray against the embedded engine and plain deltalake (run by hand).

Issue #17. One landing set (``--people`` customers, ``--tpp`` transactions each; default 1M and
10M rows), cached under benchmarks/.data/. Every table goes to the same store: an S3 server on
loopback (versitygw, started here; ``--store local`` for a folder). Each measurement is a process
of its own, so its peak memory is its own:

* ``plain``       pyarrow reads the CSV in batches and ``write_deltalake`` appends each: no governance;
* ``embedded``    ``ingest(engine="local")``: the governed ingest in one process (threads);
* ``ray × N``     ``ingest(engine="ray", workers=N)`` on a local Ray cluster of 2 nodes × 1 CPU
                  (``ray start``, token auth): the same rules, tokens, sealing and tables, the batch
                  work on N workers, the driver committing.

The transactions runs find their customers' tokens in the key store, as in the pipeline: each
run's workspace ingests the customers file first (not timed). Reports rows/s, the ratio to plain,
peak memory of the driver and of each worker, and the time of silver's rebuild on the same engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import CONFIG, PLAIN, REPO, _copy, landing, run_py  # noqa: E402

console = Console(width=150)

GOVERNED = r"""
import json, sys
from governance.workspace import Workspace
from lakehouse.ingest import ingest
cfg, dataset, src, engine, workers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
silver_too = len(sys.argv) > 6 and sys.argv[6] == "silver"
ws = Workspace.open(cfg)
rep = ingest(ws, ws.actor("pipeline"), dataset, [src], engine=engine, workers=workers or None)
import time
from lakehouse.silver import build_silver
t0 = time.perf_counter()
silver = build_silver(ws, ws.actor("pipeline"), dataset, engine=engine) if silver_too else None
silver_s = time.perf_counter() - t0
ws.close()
print(json.dumps({"rows": rep.rows_read, "accepted": rep.rows_accepted, "quarantined": rep.rows_quarantined,
                  "seconds": rep.seconds, "peak_rss_mb": rep.peak_rss_mb, "workers": rep.worker_peak_rss_mb,
                  "driver": rep.driver_seconds, "silver_seconds": silver_s if silver_too else None,
                  "silver_rows": silver.rows if silver else None}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=1_000_000)
    ap.add_argument("--tpp", type=float, default=10.0, help="transactions per person")
    ap.add_argument("--datasets", nargs="+", default=["customers", "transactions"], choices=["customers", "transactions"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray workers per run (the scaling curve)")
    ap.add_argument("--store", choices=["local", "s3"], default="s3")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray.json")
    args = ap.parse_args()
    from governance.keys import generate_kek_b64
    from governance.cluster import LocalRayCluster

    env = {**os.environ, "LAKEWARDEN_KEK": generate_kek_b64()}
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-ray-"))
    store = cluster = None
    try:
        if args.store == "s3":
            from governance.objectstore import LocalObjectStore

            store = LocalObjectStore(tmp / "s3").start()
            store.create_bucket("lakewarden")
            env.update(store.env())
        with console.status("starting a Ray cluster of 2 nodes × 1 CPU"):
            cluster = LocalRayCluster(tmp / "ray", nodes=2, cpus_per_node=1, env=env).start()
        env.update(cluster.client_env())
        results = _run(args, env, tmp)
    finally:
        if cluster is not None:
            cluster.stop()
        if store is not None:
            store.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "store": args.store, "people": args.people, "tpp": args.tpp,
                                    "results": results}, indent=2) + "\n")
    console.print(f"written to {args.out}")


def _run(args: argparse.Namespace, env: dict[str, str], tmp: Path) -> list[dict]:
    files = landing(args.people, args.tpp)
    results = []
    for dataset in args.datasets:
        src = files[dataset]
        runs = [("embedded", "local", 0)] + [(f"ray × {n}", "ray", n) for n in args.workers]
        row: dict = {"dataset": dataset, "size_mb": round(src.stat().st_size / 1e6, 1)}
        base = f"s3://lakewarden/{dataset}" if args.store == "s3" else str(tmp / dataset)
        with console.status(f"plain {dataset}"):
            plain = run_py(PLAIN, str(src), f"{base}/plain", "250000", env=env)
        row.update(rows=plain["rows"], plain_seconds=plain["seconds"], plain_peak_rss_mb=plain["peak_rss_mb"])
        row["runs"] = []
        for label, engine, n in runs:
            root = tmp / f"{dataset}-{engine}-{n}"
            root.mkdir()
            where = f"{base}/{engine}{n}" if args.store == "s3" else str(root)
            cfg = root / "lakewarden.yaml"
            cfg.write_text(CONFIG.format(root=root, tables=f"{where}/tables", keystore=f"{root}/keys/keystore.db",
                                         repo=REPO))
            if dataset == "transactions":
                run_py(GOVERNED, str(cfg), "customers", str(_copy(files["customers"], root)), "local", "0", env=env)
            with console.status(f"{label}: {dataset}"):
                g = run_py(GOVERNED, str(cfg), dataset, str(_copy(src, root)), engine, str(n), "silver", env=env)
            row["runs"].append({"engine": label, "seconds": g["seconds"], "rows_per_s": g["rows"] / g["seconds"],
                                "ratio": plain["seconds"] / g["seconds"], "driver_peak_rss_mb": g["peak_rss_mb"],
                                "worker_peak_rss_mb": g["workers"], "driver_seconds": g["driver"],
                                "silver_seconds": g["silver_seconds"], "silver_rows": g["silver_rows"],
                                "accepted": g["accepted"],
                                "quarantined": g["quarantined"]})
            shutil.rmtree(root, ignore_errors=True)
            _print(results + [row])
        results.append(row)
    return results


def _busy(d: dict) -> tuple[str, str]:
    """The driver's own work (its time less the waits on workers), and the commits' part of it."""
    if not d:
        return "", ""
    return f"{d['total'] - d.get('waiting for workers', 0):.1f}", f"{d.get('committing', 0):.1f}"


def _print(results: list[dict]) -> None:
    t = Table(title="governed ingest: embedded vs Ray workers vs plain write_deltalake (same CSV, same store, same run)")
    for c in ("dataset", "rows", "run", "seconds", "rows/s", "× plain", "driver MB", "worker MB", "driver busy s",
              "of it committing", "silver s"):
        t.add_column(c, justify="left" if c in ("dataset", "run") else "right")
    for r in results:
        t.add_row(r["dataset"], f"{r['rows']:,}", "plain", f"{r['plain_seconds']:.1f}",
                  f"{r['rows'] / r['plain_seconds']:,.0f}", "1.00", f"{r['plain_peak_rss_mb']:.0f}", "", "", "", "")
        for run in r["runs"]:
            t.add_row("", "", run["engine"], f"{run['seconds']:.1f}", f"{run['rows_per_s']:,.0f}", f"{run['ratio']:.2f}",
                      f"{run['driver_peak_rss_mb']:.0f}", ", ".join(f"{m:.0f}" for m in run["worker_peak_rss_mb"]),
                      *_busy(run.get("driver_seconds") or {}),
                      f"{run['silver_seconds']:.1f}" if run.get("silver_seconds") is not None else "")
    console.print(t)


if __name__ == "__main__":
    main()
