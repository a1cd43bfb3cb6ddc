"""Benchmark the key store a cluster shares (PostgreSQL) against the laptop's (SQLite), same run
(run by hand; issue #17).

Both stores get the same subject ids in the same batches: create them (with data keys, as ingest
of new people does), look them up again (tokens only, and with keys), shred 1,000, rotate the
KEK (retiring its generation). The PostgreSQL server is a throw-away cluster from Debian's
package on loopback (``governance/keys/pgserver.py``), with ``fsync`` on, as a deployment runs.

    .venv/bin/python benchmarks/bench_keystore.py --subjects 1000000
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "keystore.json")
    args = ap.parse_args()
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
