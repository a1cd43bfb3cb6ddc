"""Benchmark the key store a cluster shares (PostgreSQL) against the laptop's (SQLite), same run
(run by hand; issue #17).

Both stores get the same subject ids in the same batches: create them (with data keys, as ingest
of new people does), look them up again (tokens only, and with keys), shred 1,000, rotate the
KEK (retiring its generation). The PostgreSQL server is a throw-away cluster from Debian's
package on loopback (``governance/keys/pgserver.py``), with ``fsync`` on, as a deployment runs.

    .venv/bin/python benchmarks/bench_keystore.py --subjects 1000000

``--growth`` measures instead how creating subjects costs as the SQLite store grows (issue #15):
``--subjects`` new subjects in batches of ``--batch`` (ingest's batch for customers is 166k), the
cost of each batch per subject, written to ``results/keystore-growth.json``. The blind indexes'
split into a recent and a main index (schema 3) is what keeps that cost flat.

    .venv/bin/python benchmarks/bench_keystore.py --growth --subjects 10000000 --batch 166000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from governance.keys import KeyStore, LocalKek, native

REPO = Path(__file__).resolve().parents[1]
console = Console()


def _run(store, batches: list[pa.Array], rotate_to: LocalKek) -> dict[str, float]:
    out: dict[str, float] = {}
    t = time.perf_counter()
    tokens = []
    for ids in batches:
        tokens.append(store.subject_keys(ids, keys=True).tokens)
    out["create"] = time.perf_counter() - t
    t = time.perf_counter()
    for ids in batches:
        store.subject_keys(ids, keys=False)
    out["lookup_tokens"] = time.perf_counter() - t
    t = time.perf_counter()
    for ids in batches:
        store.subject_keys(ids, keys=True)
    out["lookup_keys"] = time.perf_counter() - t
    doomed = tokens[0].to_pylist()[:1000]
    t = time.perf_counter()
    store.shred_many(doomed)
    out["shred_1000"] = time.perf_counter() - t
    t = time.perf_counter()
    store.rotate_kek(rotate_to)
    out["rotate"] = time.perf_counter() - t
    return out


def growth(subjects: int, batch: int, out: Path) -> None:
    """Per batch of new subjects: its creation time per subject, as the store grows."""
    from rich.progress import Progress

    from governance.keys import store as store_mod

    rows = []
    with tempfile.TemporaryDirectory() as d, Progress(console=console, transient=True) as bar:
        task = bar.add_task("creating subjects", total=subjects)
        with KeyStore(Path(d) / "keystore.db", LocalKek(os.urandom(32), source="bench")) as st:
            t0 = time.perf_counter()
            for lo in range(0, subjects, batch):
                ids = pa.array([f"C{i:010d}" for i in range(lo, min(subjects, lo + batch))])
                t = time.perf_counter()
                st.subject_keys(ids, keys=True)
                rows.append({"subjects_after": lo + len(ids), "us_per_subject": 1e6 * (time.perf_counter() - t) / len(ids)})
                bar.advance(task, len(ids))
            total = time.perf_counter() - t0
        filters = native.run_filter_counts()
        size_mb = os.path.getsize(Path(d) / "keystore.db") / 1e6
    t = Table(title=f"creating {subjects:,} subjects in batches of {batch:,}: {total:.1f} s, store {size_mb:,.0f} MB; "
                    f"{filters[0]} runs' filters made by reading, {filters[1]:,} reads spared")
    for c in ("subjects after the batch", "µs per subject"):
        t.add_column(c, justify="right")
    step = max(1, len(rows) // 20)
    for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
        t.add_row(f"{r['subjects_after']:,}", f"{r['us_per_subject']:.2f}")
    console.print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"subjects": subjects, "batch": batch, "cpus": os.cpu_count(), "native": native.backend(),
                               "schema": store_mod.SCHEMA_VERSION, "fanout": store_mod.FANOUT,
                               "seconds": total, "store_mb": size_mb,
                               "run_filters_made": filters[0], "run_reads_spared": filters[1],
                               "batches": rows}, indent=2) + "\n")
    console.print(f"written to {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--growth", action="store_true", help="the SQLite store's creation cost per batch as it grows")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.growth:
        growth(args.subjects, args.batch, args.out or REPO / "benchmarks" / "results" / "keystore-growth.json")
        return
    args.out = args.out or REPO / "benchmarks" / "results" / "keystore.json"
    from governance.keys.pgserver import LocalPostgres
    from governance.keys.pgstore import PgKeyStore

    batches = [pa.array([f"C{i:010d}" for i in range(lo, min(args.subjects, lo + args.batch))])
               for lo in range(0, args.subjects, args.batch)]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        with console.status("SQLite"):
            with KeyStore(Path(d) / "keystore.db", LocalKek(os.urandom(32), source="bench")) as st:
                results["sqlite"] = _run(st, batches, LocalKek(os.urandom(32), source="bench2"))
        pg = LocalPostgres(Path(d) / "pg", durable=True)  # fsync on, as a deployment runs
        try:
            with console.status("starting PostgreSQL"):
                pg.start()
            os.environ.update(pg.env())
            with console.status("PostgreSQL"):
                with PgKeyStore(pg.dsn, LocalKek(os.urandom(32), source="bench")) as st:
                    results["postgresql"] = _run(st, batches, LocalKek(os.urandom(32), source="bench2"))
        finally:
            pg.stop()
            shutil.rmtree(pg.base, ignore_errors=True)
    t = Table(title=f"key stores, {args.subjects:,} new subjects in batches of {args.batch:,} (same run)")
    for c in ("step", "SQLite s", "PostgreSQL s", "PostgreSQL / SQLite"):
        t.add_column(c, justify="right" if c != "step" else "left")
    for step in results["sqlite"]:
        a, b = results["sqlite"][step], results["postgresql"][step]
        t.add_row(step, f"{a:.2f}", f"{b:.2f}", f"{b / a:.1f}×")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"subjects": args.subjects, "batch": args.batch, "cpus": os.cpu_count(),
                                    "native": native.backend(), "results": results}, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
