"""Benchmark erasure against plain deltalake delete + vacuum of the same rows (run by hand).

A governed table set is built once per size with the real pipeline (``generate`` →
``ingest`` of customers and transactions: bronze, vault, restricted), then copied:

* ``plain``          on a copy: for each table, ``DeltaTable.delete("customer_id = '<token>'")``
                     and ``vacuum(retention_hours=0, full=True)`` — the same rows, no governance;
* ``governed_one``   on a copy: the erasure's work for one subject — ``_delete_subject_rows``
                     (the files of the subjects' buckets that hold them, rewritten), ``_purge_history(0)``
                     and the key shred;
* ``plain_batch``    on a copy: plain delete (``customer_id IN (...)``) + vacuum of 1,000 subjects;
* ``governed_batch`` on a copy: the governed work for the same 1,000 subjects in one batch;
* ``verify_one``     the scanner over the whole workspace after ``governed_one`` (reported, not a goal).

Bytes rewritten = bytes of the files the delete commits added; compared with the bytes of
the tables' current files before the erasure.

Goals (issue #8): one subject ≤ 2× plain; 1,000 subjects ≤ 3× one; bytes rewritten ≤ 1/8 of the table.

    PYTHONPATH=. python benchmarks/bench_erasure.py --people 1000000 --tx 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
console = Console()

# Relative paths: a copied folder is a separate table set.
CONFIG = """\
version: 1
name: bench
storage: {{root: tables}}
workspace: ws
keys:
  store: keys/keystore.db
  kek: {{provider: env, var: LAKEWARDEN_KEK}}
policies: [{repo}/policies/*.yaml]
"""
TABLES = (("bronze", "customers"), ("vault", "customers"), ("restricted", "customers"), ("bronze", "transactions"))


def _open(root: Path):  # noqa: ANN202
    from governance.workspace import Workspace

    return Workspace.open(root / "lakewarden.yaml")


def build(root: Path, people: int, tx: float, progress: Progress) -> dict:
    from lakehouse.ingest import ingest
    from lakehouse.synth import generate

    root.mkdir(parents=True, exist_ok=True)
    (root / "lakewarden.yaml").write_text(CONFIG.format(repo=REPO))
    tasks: dict[str, object] = {}

    def gen_cb(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = progress.add_task(f"generate {what}", total=total)
        progress.update(tasks[what], completed=done)  # type: ignore[arg-type]

    t0 = time.perf_counter()
    res = generate(root / "landing", people=people, transactions_per_person=tx, seed=7, progress=gen_cb)
    t_gen = time.perf_counter() - t0
    ws = _open(root)
    t0 = time.perf_counter()
    for ds in ("customers", "transactions"):
        task = progress.add_task(f"ingest {ds}", total=None)
        ingest(ws, ws.actor("dana"), ds, [res.files[ds]],
               progress=lambda _src, rows, task=task: progress.update(task, completed=rows))
    t_ing = time.perf_counter() - t0
    ws.close()
    return {"generate_s": t_gen, "ingest_s": t_ing}


def _tables(root: Path) -> list[Path]:
    return [root / "tables" / layer / ds for layer, ds in TABLES if (root / "tables" / layer / ds / "_delta_log").is_dir()]


def _files(table: Path) -> dict[str, int]:
    from deltalake import DeltaTable

    out = {}
    for uri in DeltaTable(str(table)).file_uris():
        p = Path(uri.removeprefix("file://"))
        out[str(p)] = p.stat().st_size
    return out


def _sizes(root: Path) -> dict[str, dict[str, int]]:
    return {str(t): _files(t) for t in _tables(root)}


def _rewritten(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> int:
    return sum(sz for t, files in after.items() for f, sz in files.items() if f not in before.get(t, {}))


def _tokens(root: Path, n: int) -> list[str]:
    from deltalake import DeltaTable

    keys = DeltaTable(str(root / "tables" / "bronze" / "customers")).to_pyarrow_table(columns=["customer_id"])
    step = max(keys.num_rows // n, 1)
    return [keys["customer_id"][i * step].as_py() for i in range(n)]


def plain(root: Path, tokens: list[str]) -> dict:
    from deltalake import DeltaTable

    before = _sizes(root)
    pred = f"customer_id = '{tokens[0]}'" if len(tokens) == 1 else \
        "customer_id IN (" + ", ".join(f"'{t}'" for t in tokens) + ")"
    t0 = time.perf_counter()
    rows = 0
    for t in _tables(root):
        dt = DeltaTable(str(t))
        rows += int(dt.delete(pred).get("num_deleted_rows", 0))
        dt.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False, full=True)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "rows": rows, "bytes_rewritten": _rewritten(before, _sizes(root))}


def governed(root: Path, tokens: list[str]) -> dict:
    from lakehouse.erasure import _delete_subject_rows, _purge_history

    ws = _open(root)
    ws.keyring.store.subject_state(tokens[0])  # open the key store outside the timing, as a running service has
    before = _sizes(root)
    t0 = time.perf_counter()
    deleted = _delete_subject_rows(ws, tokens)
    t_del = time.perf_counter() - t0
    _purge_history(ws, 0)
    t_purge = time.perf_counter() - t0 - t_del
    shredded = ws.keyring.shred_many(tokens)
    secs = time.perf_counter() - t0
    ws.close()
    return {"seconds": secs, "delete_seconds": t_del, "vacuum_seconds": t_purge,
            "shred_seconds": secs - t_del - t_purge, "rows": sum(deleted.values()), "keys_shredded": shredded,
            "keystore_bytes": (root / "keys" / "keystore.db").stat().st_size,
            "bytes_rewritten": _rewritten(before, _sizes(root))}


def verify(root: Path, token: str) -> dict:
    from governance.erasure import ErasureContext, scan

    ws = _open(root)
    t0 = time.perf_counter()
    rep = scan(ws, ErasureContext("bench", [token], {}, {token: "S1"}))
    secs = time.perf_counter() - t0
    ws.close()
    return {"seconds": secs, **{k: v for k, v in rep.summary().items() if k in ("files_scanned", "bytes_scanned",
                                                                               "parquet_values", "findings")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=1_000_000)
    ap.add_argument("--tx", type=float, default=10.0, help="mean transactions per person")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "erasure.json")
    ap.add_argument("--keep", type=Path, default=None, help="build (or reuse) the table set here")
    args = ap.parse_args()
    from governance.keys import generate_kek_b64

    tmp = Path(tempfile.mkdtemp(prefix="bench-erasure-"))
    base = args.keep or tmp / "base"
    if args.keep:  # a kept table set is reused by later runs: so is its (synthetic data's) KEK
        kek_file = args.keep / "bench-kek.b64"
        args.keep.mkdir(parents=True, exist_ok=True)
        if not kek_file.exists():
            kek_file.write_text(generate_kek_b64())
        os.environ["LAKEWARDEN_KEK"] = kek_file.read_text().strip()
    os.environ.setdefault("LAKEWARDEN_KEK", generate_kek_b64())
    result: dict = {"cpus": os.cpu_count(), "people": args.people, "transactions_per_person": args.tx}
    with Progress(console=console, transient=True) as progress:
        if not (base / "tables").exists():
            shutil.rmtree(base / "landing", ignore_errors=True)
            result["build"] = build(base, args.people, args.tx, progress)
    from deltalake import DeltaTable

    result["rows"] = {str(t.relative_to(base / "tables")): DeltaTable(str(t)).count() for t in _tables(base)}
    table_bytes = sum(sum(f.values()) for f in _sizes(base).values())
    result["table_bytes"] = table_bytes
    tokens = _tokens(base, args.batch)
    one = tokens[len(tokens) // 2]
    runs = {}
    for name, fn in (("plain", lambda r: plain(r, [one])), ("governed_one", lambda r: governed(r, [one])),
                     ("plain_batch", lambda r: plain(r, tokens)), ("governed_batch", lambda r: governed(r, tokens))):
        work = tmp / name
        shutil.copytree(base, work)
        console.print(f"[dim]running {name}…[/]")
        runs[name] = fn(work)
        if name == "governed_one":
            runs["verify_one"] = verify(work, one)
        shutil.rmtree(work)
    result.update(runs)
    result["batch_subjects"] = len(tokens)
    g1, gb, p = runs["governed_one"]["seconds"], runs["governed_batch"]["seconds"], runs["plain"]["seconds"]
    g1_rows = g1 - runs["governed_one"]["shred_seconds"]
    result["goals"] = {
        "one_vs_plain": {"ratio": g1 / p, "goal": 2.0, "met": g1 / p <= 2.0},
        "one_without_shred_vs_plain": {"ratio": g1_rows / p, "goal": 2.0, "met": g1_rows / p <= 2.0},
        "batch_vs_one": {"ratio": gb / g1, "goal": 3.0, "met": gb / g1 <= 3.0},
        "one_bytes_rewritten_share": {"ratio": runs["governed_one"]["bytes_rewritten"] / table_bytes, "goal": 0.125,
                                      "met": runs["governed_one"]["bytes_rewritten"] / table_bytes <= 0.125},
        "batch_bytes_rewritten_share": {"ratio": runs["governed_batch"]["bytes_rewritten"] / table_bytes},
        "batch_vs_plain_batch": {"ratio": gb / runs["plain_batch"]["seconds"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(json.dumps(result))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
