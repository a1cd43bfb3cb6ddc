"""Benchmark point-in-time training sets: Feast's offline store in one process against the join on Ray (run by hand).

Issue #17. A history table of ``--meters`` households × ``--per`` readings each (the policy of
tests/fixtures/readings.yaml: many rows per subject over time, a 2-day TTL on one view), ingested
and built into silver once (not timed). Then one entity row per household at each of ``--times``
times, and the same training set three ways, each in a process of its own (its own peak memory):

* ``local``        ``Features.training_set(engine="local")``: Feast's offline store (DuckDB via ibis);
* ``ray, N nodes`` ``engine="ray"`` on a local Ray cluster of N nodes × 1 CPU (``ray start``, token
                   auth), for N = 1 and 2: the join per subject bucket on the workers.

Reports seconds, the driver's peak RSS, the workers' peak RSS (sampled every 0.2 s) and whether
the tables are equal (a SHA-256 of the result's values, row for row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.csv as pacsv
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import DATA, REPO, run_py  # noqa: E402

console = Console(width=140)

CONFIG = """\
version: 1
name: bench-pit
storage: {{root: {tables}}}
workspace: {root}/ws
keys:
  store: {root}/keys/keystore.db
  kek: {{provider: file, path: {kek}}}
policies: [{root}/policies/*.yaml]
"""

SETUP = r"""
import json, sys
from datetime import timedelta
import pyarrow as pa, pyarrow.parquet as pq
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import build_silver
from features.store import Features
cfg, src, ents, times = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ws = Workspace.open(cfg)
rep = ingest(ws, ws.actor("pipeline"), "readings", [src])
build_silver(ws, ws.actor("pipeline"), "readings")
Features(ws).apply(ws.actor("pipeline"))
hist = Catalog(ws.config).open(TableRef("silver", "readings")).to_pyarrow_table(columns=["meter_ref", "read_at"])
toks = pa.compute.unique(hist["meter_ref"])
lo, hi = pa.compute.min_max(hist["read_at"]).values()
span = (hi.as_py() - lo.as_py()) / max(times - 1, 1)
at = [lo.as_py() + span * i + timedelta(hours=7) for i in range(times)]
pq.write_table(pa.table({"meter_ref": pa.concat_arrays([toks] * times),
                         "event_timestamp": pa.array([t for t in at for _ in range(len(toks))], pa.timestamp("us", tz="UTC"))}), ents)
print(json.dumps({"rows": hist.num_rows, "subjects": len(toks), "accepted": rep.rows_accepted}))
ws.close()
"""

JOIN = r"""
import hashlib, json, resource, sys, time
import pyarrow.parquet as pq
from governance.workspace import Workspace
from features.store import Features
cfg, ents, engine = sys.argv[1], sys.argv[2], sys.argv[3]
ws = Workspace.open(cfg)
entities = pq.read_table(ents)
t0 = time.perf_counter()
ts = Features(ws).training_set(ws.actor("sam"), purpose="forecasting", entities=entities, engine=engine,
                               features=["usage:kwh", "usage:tariff", "household:occupants"])
secs = time.perf_counter() - t0
t = ts.table.select(sorted(ts.table.column_names))
import pandas as pd  # a hash of the values, row for row (not of the Arrow chunk layout)
h = hashlib.sha256(pd.util.hash_pandas_object(t.to_pandas(), index=False).to_numpy().tobytes())
print(json.dumps({"seconds": secs, "rows": t.num_rows, "nulls": t["kwh"].null_count, "sha256": h.hexdigest()[:16],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
ws.close()
"""


def readings(meters: int, per: int) -> Path:
    """The landing CSV (cached): ``meters`` households × ``per`` readings on distinct hours of 60 days."""
    f = DATA / f"readings_m{meters}_r{per}.csv"
    if f.exists():
        return f
    f.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    t0 = np.datetime64("2026-01-01T00:00:00", "us")
    with console.status(f"generating {meters:,} × {per} readings"):
        with pacsv.CSVWriter(str(f) + ".tmp", pa.schema([("meter_ref", pa.string()), ("holder_name", pa.string()),
                                                          ("read_at", pa.string()), ("kwh", pa.float64()),
                                                          ("tariff", pa.string()), ("occupants", pa.int64())])) as w:
            slot = 1440 // per  # reading j of a household falls in hours [j·slot, (j+1)·slot): distinct times
            for lo in range(0, meters, 50_000):
                ids = np.arange(lo, min(lo + 50_000, meters))
                m = np.repeat(ids, per)
                hours = (np.tile(np.arange(per) * slot, len(ids)) + rng.integers(0, slot, len(m)))
                at = pa.array(t0 + hours.astype("timedelta64[h]"), pa.timestamp("us", tz="UTC"))
                w.write_table(pa.table({
                    "meter_ref": pa.array(np.char.add("MTR", np.char.zfill(m.astype(str), 7))),
                    "holder_name": pa.array(np.char.add("Holder ", m.astype(str))),
                    "read_at": pa.compute.strftime(at, format="%Y-%m-%dT%H:%M:%SZ"),
                    "kwh": pa.array(np.round(rng.uniform(0, 40, len(m)), 3)),
                    "tariff": pa.array(np.array(["day", "night", "flat"])[hours % 3]),
                    "occupants": pa.array((hours % 6).astype(np.int64)),
                }))
    os.replace(str(f) + ".tmp", f)
    return f


class _Sampler:
    """Peak RSS of the Ray worker processes running the join's tasks, sampled in this process."""

    def __init__(self) -> None:
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::_join_chunk") and p.info["memory_info"]:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.info["memory_info"].rss / 2**20)

    def __enter__(self) -> "_Sampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=200_000)
    ap.add_argument("--per", type=int, default=10, help="readings per household")
    ap.add_argument("--times", type=int, default=3, help="entity rows per household")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pit.json")
    args = ap.parse_args()
    from governance.cluster import LocalRayCluster
    from governance.keys import generate_kek_b64

    src = readings(args.meters, args.per)
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-pit-"))
    try:
        shutil.copytree(REPO / "policies", tmp / "policies")
        shutil.copy(REPO / "tests" / "fixtures" / "readings.yaml", tmp / "policies" / "readings.yaml")
        kek = tmp / "kek.key"
        kek.write_text(generate_kek_b64() + "\n")
        kek.chmod(0o600)
        cfg = tmp / "lakewarden.yaml"
        cfg.write_text(CONFIG.format(root=tmp, tables=tmp / "tables", kek=kek))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        ents = tmp / "entities.parquet"
        with console.status("ingest and silver (not timed)"):
            setup = run_py(SETUP, str(cfg), str(src), str(ents), str(args.times), env=env)
        results = [{"run": "local (Feast's offline store)", **run_py(JOIN, str(cfg), str(ents), "local", env=env),
                    "workers_mb": []}]
        for nodes in (1, 2):
            cluster = LocalRayCluster(tmp / f"ray{nodes}", nodes=nodes, cpus_per_node=1, env=env)
            with console.status(f"starting Ray: {nodes} node(s) × 1 CPU"):
                cluster.start()
            try:
                with console.status(f"join on Ray, {nodes} node(s)"), _Sampler() as s:
                    r = run_py(JOIN, str(cfg), str(ents), "ray", env={**env, **cluster.client_env()})
                results.append({"run": f"ray, {nodes} node(s) × 1 CPU", **r, "workers_mb": sorted(s.peak.values())})
            finally:
                cluster.stop()
            time.sleep(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t = Table(title=f"point-in-time training set: {setup['rows']:,} silver rows, {setup['subjects']:,} subjects, "
                    f"{results[0]['rows']:,} entity rows (same run)")
    for c in ("run", "seconds", "× local", "driver MB", "worker MB", "rows", "NULL kwh", "sha256"):
        t.add_column(c, justify="left" if c in ("run", "sha256") else "right")
    for r in results:
        t.add_row(r["run"], f"{r['seconds']:.1f}", f"{results[0]['seconds'] / r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}",
                  ", ".join(f"{m:.0f}" for m in r["workers_mb"]), f"{r['rows']:,}", f"{r['nulls']:,}", r["sha256"])
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "setup": setup, "meters": args.meters, "per": args.per,
                                    "times": args.times, "results": results}, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
