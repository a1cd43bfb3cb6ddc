"""A design experiment for the key store (issue #15): what storing subjects in per-batch blobs costs.

Not the product's key store: the storage alone of the layout that became key store schema 5
(``governance/keys/runs.py``), measured before it was built so that the decision rested on a
figure, and kept as that record. Schema 4 stored a new subject as a row of ``subjects`` plus an
entry of the blind-index index, merged into one main B-tree. Here each batch
is one row of ``keyblocks`` (its wrapped keys, 60 bytes a subject, never rewritten) and one sorted
run of ``bi_runs`` (32-byte blind index and 8-byte id a subject); ``--fanout`` runs of a level are
merged into one run of the next (a tiered LSM). The pragmas are the key store's (rollback journal,
``synchronous=FULL``, ``secure_delete=ON``, 16 KB pages). Blind indexes and wrapped keys are
random bytes: their cryptography is measured apart (``bench_ingest_floor.py``). Lookups, shreds
and rotation are not measured.

    .venv/bin/python benchmarks/bench_keystore_layout.py --subjects 10000000 --fanout 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console()


def _prefix(bis: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each 32-byte blind index in ``bis``, big endian: their order."""
    return bis.reshape(-1).view(">u8").reshape(-1, 4)[:, 0]


def open_layout(path: Path | str) -> sqlite3.Connection:
    """A new layout file at ``path``, with the key store's pragmas."""
    c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in ("page_size=16384", "journal_mode=DELETE", "synchronous=FULL", "secure_delete=ON", "cache_size=-65536"):
        c.execute(f"PRAGMA {pragma}")
    c.execute("CREATE TABLE keyblocks(first_id INTEGER PRIMARY KEY, n INTEGER NOT NULL, kek_id TEXT NOT NULL, "
              "created_at TEXT NOT NULL, wrapped BLOB NOT NULL)")
    c.execute("CREATE TABLE bi_runs(run INTEGER PRIMARY KEY, level INTEGER NOT NULL, n INTEGER NOT NULL, "
              "bis BLOB NOT NULL, ids BLOB NOT NULL)")
    return c


def store_batch(c: sqlite3.Connection, first_id: int, bis: bytes, wrapped: bytes, fanout: int) -> tuple[float, int]:
    """Store one batch of new subjects (ids ``first_id`` on; 32-byte blind indexes, 60-byte wrapped
    keys) in one transaction: its key block, its run, and the tiered merges it completes.
    ``(seconds merging, entries merged)``."""
    n = len(bis) // 32
    b = np.frombuffer(bis, np.uint8).reshape(n, 32)
    order = np.argsort(_prefix(b), kind="stable")
    merge_s, merged = 0.0, 0
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO keyblocks VALUES (?,?,?,?,?)", (first_id, n, "kek-1", "2026-12-06T00:00:00Z", wrapped))
    c.execute("INSERT INTO bi_runs VALUES (?,?,?,?,?)",
              (first_id, 0, n, b[order].tobytes(), (first_id + order).astype("<i8").tobytes()))
    level = 0
    while True:
        runs = c.execute("SELECT run FROM bi_runs WHERE level = ? ORDER BY run", (level,)).fetchall()
        if len(runs) < fanout:
            break
        tm = time.perf_counter()
        parts = [c.execute("SELECT bis, ids FROM bi_runs WHERE run = ?", r).fetchone() for r in runs]
        all_bis = np.concatenate([np.frombuffer(p[0], np.uint8) for p in parts]).reshape(-1, 32)
        all_ids = np.concatenate([np.frombuffer(p[1], "<i8") for p in parts])
        o = np.argsort(_prefix(all_bis), kind="stable")
        c.executemany("DELETE FROM bi_runs WHERE run = ?", runs)
        c.execute("INSERT INTO bi_runs VALUES (?,?,?,?,?)",
                  (runs[0][0], level + 1, len(all_ids), all_bis[o].tobytes(), all_ids[o].tobytes()))
        merge_s += time.perf_counter() - tm
        merged += len(all_ids)
        level += 1
    c.execute("COMMIT")
    return merge_s, merged


def run(subjects: int, batch: int, fanout: int, folder: Path) -> dict:
    path = folder / f"layout-{fanout}.db"
    c = open_layout(path)
    t0, c0 = time.perf_counter(), os.times()
    merge_s, merged, next_id = 0.0, 0, 1
    for start in range(0, subjects, batch):
        n = min(batch, subjects - start)
        ms, m = store_batch(c, next_id, os.urandom(32 * n), os.urandom(60 * n), fanout)
        merge_s, merged = merge_s + ms, merged + m
        next_id += n
    c1 = os.times()
    seconds = time.perf_counter() - t0
    levels = c.execute("SELECT level, count(*) FROM bi_runs GROUP BY level ORDER BY level").fetchall()
    # untimed: every run is in blind-index order, and the runs hold every subject once
    ids = []
    for bis, run_ids in c.execute("SELECT bis, ids FROM bi_runs"):
        keys = _prefix(np.frombuffer(bis, np.uint8))
        if np.any(keys[1:] < keys[:-1]):
            raise SystemExit("a run is not in blind-index order")
        ids.append(np.frombuffer(run_ids, "<i8"))
    if not np.array_equal(np.sort(np.concatenate(ids)), np.arange(1, subjects + 1)):
        raise SystemExit("the runs do not hold every subject once")
    c.close()
    size = path.stat().st_size
    path.unlink()
    return {"fanout": fanout, "subjects": subjects, "batch": batch, "seconds": seconds,
            "us_per_subject": seconds / subjects * 1e6, "user": c1.user - c0.user, "system": c1.system - c0.system,
            "merge_seconds": merge_s, "merged_entries": merged, "store_mb": size / 1e6, "runs_by_level": levels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=10_000_000)
    ap.add_argument("--batch", type=int, default=166_000, help="subjects a batch (ingest's batch for customers)")
    ap.add_argument("--fanout", type=int, nargs="+", default=[4, 8], help="runs of a level merged into one")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "keystore-layout.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lw-bench-layout-") as d:
        results = []
        for f in args.fanout:
            with console.status(f"{args.subjects:,} subjects, fan-out {f}"):
                results.append(run(args.subjects, args.batch, f, Path(d)))
    t = Table(title=f"per-batch blobs and tiered runs: the storage of {args.subjects:,} new subjects")
    for col in ("fan-out", "seconds", "µs a subject", "user s", "system s", "merges s", "entries merged", "MB"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(str(r["fanout"]), f"{r['seconds']:.2f}", f"{r['us_per_subject']:.2f}", f"{r['user']:.1f}",
                  f"{r['system']:.1f}", f"{r['merge_seconds']:.2f}", f"{r['merged_entries']:,}", f"{r['store_mb']:.0f}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
