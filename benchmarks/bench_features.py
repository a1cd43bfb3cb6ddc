"""Benchmark the governed feature store against plain Feast, same store, same run (by hand).

* online lookups, 1 and 100 entities, SQLite and Redis: p50/p99 of ``Features.online``
  (gate decision, audited as a run of repeated decisions; token checks) vs
  ``FeatureStore.get_online_features``, like for like: the columns as a dict on both sides
  (``as_dict=True`` vs ``to_dict()``), and an Arrow table with the policy's types on both sides
  (``online()`` vs ``to_dict()`` + ``pa.Table.from_pydict``); each over ``--rounds`` rounds;
* a training set of ``--entity-rows`` rows (subjects × timestamps): ``Features.training_set``
  (gate, token checks, row-count guarantee, lineage, audit) vs ``get_historical_features``.

Goals: issue #4 (training set ≤ 1.1×), issue #16 (a 1-entity lookup ≤ 1.2×, each round).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
console = Console()
FEATURES = ["customer_profile:income", "customer_profile:region", "customer_profile:income_z"]


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def lat_pair(a, b, n: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of ``a`` and ``b`` called alternately, so the machine's noise falls on both alike."""
    for _ in range(10):
        a()
        b()
    out_a, out_b = [], []
    for _ in range(n):
        for fn, out in ((a, out_a), (b, out_b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return out_a, out_b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=100_000)
    ap.add_argument("--entity-rows", type=int, default=1_000_000)
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "features.json")
    args = ap.parse_args()

    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from features.store import Features
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    root = Path(tempfile.mkdtemp(prefix="lw-bench-features-"))
    os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rport = s.getsockname()[1]
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    base = (f"version: 1\nname: bench\nstorage: {{root: {root}/tables}}\nworkspace: {root}/ws\n"
            f"keys: {{store: {root}/keys/ks.db, kek: {{provider: env, var: LAKEWARDEN_KEK}}}}\n"
            f"policies: [{REPO}/policies/*.yaml]\n")
    (root / "sqlite.yaml").write_text(base)
    (root / "redis.yaml").write_text(base + f"features: {{registry: {root}/ws/feast/reg-redis.db, "
                                           f"online: {{type: redis, connection_string: '127.0.0.1:{rport}'}}}}\n")
    results: dict = {"online": [], "training_set": {}}
    try:
        res = generate(root / "landing", people=args.people, transactions_per_person=0, seed=3)
        ws = Workspace.open(root / "sqlite.yaml")
        with console.status("ingest + silver"):
            ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
            build_silver(ws, ws.actor("dana"), "customers")
        tokens = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
        ws.close()
        for store_name in ("sqlite", "redis"):
            ws = Workspace.open(root / f"{store_name}.yaml")
            fs = Features(ws)
            with console.status(f"{store_name}: apply + materialize"):
                fs.apply(ws.actor("pipeline"))
                fs.materialize(ws.actor("pipeline"))
            mel = ws.actor("mel")
            pol, cols = fs.resolve(FEATURES)
            schema = pa.schema([("customer_id", pa.string())] + [(c, fs._arrow_type(pol, c)) for c in cols])
            for n in (1, 100):
                ents = tokens[:n]
                rows = [{"customer_id": t} for t in ents]
                for output in ("dict", "arrow"):
                    if output == "dict":
                        plain_fn = lambda: fs.store.get_online_features(features=FEATURES, entity_rows=rows).to_dict()  # noqa: E731
                        gov_fn = lambda: fs.online(mel, purpose="credit_scoring", features=FEATURES, tokens=ents, as_dict=True)  # noqa: E731
                    else:
                        plain_fn = lambda: pa.Table.from_pydict(  # noqa: E731
                            fs.store.get_online_features(features=FEATURES, entity_rows=rows).to_dict(), schema=schema)
                        gov_fn = lambda: fs.online(mel, purpose="credit_scoring", features=FEATURES, tokens=ents)  # noqa: E731
                    rounds = []
                    for _ in range(args.rounds):
                        plain, gov = lat_pair(plain_fn, gov_fn, args.lookups)
                        rounds.append({"plain_p50_ms": pct(plain, .5), "plain_p99_ms": pct(plain, .99),
                                       "governed_p50_ms": pct(gov, .5), "governed_p99_ms": pct(gov, .99),
                                       "ratio_p50": pct(gov, .5) / pct(plain, .5)})
                    mid = sorted(rounds, key=lambda r: r["ratio_p50"])[len(rounds) // 2]
                    results["online"].append({"store": store_name, "entities": n, "output": output, **mid,
                                              "ratio_p50_rounds": [r["ratio_p50"] for r in rounds]})
            if store_name == "sqlite":
                k = max(1, args.entity_rows // len(tokens))
                t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
                ids = [t for t in tokens for _ in range(k)][: args.entity_rows]
                when = [t0 + timedelta(days=i % k) for i in range(len(ids))]
                ents = pa.table({"customer_id": ids, "event_timestamp": pa.array(when, pa.timestamp("us", tz="UTC"))})
                df = ents.to_pandas()
                plain_runs, gov_runs = [], []
                for k in range(3):  # alternate, median of three each
                    with console.status(f"training set, {len(ids):,} entity rows (round {k + 1}/3)"):
                        a = time.perf_counter()
                        fs.store.get_historical_features(entity_df=df, features=FEATURES).to_df()
                        plain_runs.append(time.perf_counter() - a)
                        a = time.perf_counter()
                        ts = fs.training_set(ws.actor("sam"), purpose="credit_scoring", features=FEATURES, entities=ents)
                        gov_runs.append(time.perf_counter() - a)
                plain_s, gov_s = statistics.median(plain_runs), statistics.median(gov_runs)
                results["training_set"] = {"entity_rows": len(ids), "plain_s": plain_s, "governed_s": gov_s,
                                           "ratio": gov_s / plain_s, "rows_out": ts.table.num_rows,
                                           "plain_runs_s": plain_runs, "governed_runs_s": gov_runs}
            ws.close()
    finally:
        redis.terminate()
        shutil.rmtree(root, ignore_errors=True)
    t = Table(title="online lookups: governed vs plain Feast (ms)")
    for c in ("store", "entities", "output", "plain p50", "plain p99", "governed p50", "governed p99",
              "ratio p50 (median round)", "each round"):
        t.add_column(c, justify="right")
    for r in results["online"]:
        t.add_row(r["store"], str(r["entities"]), r["output"], f"{r['plain_p50_ms']:.3f}", f"{r['plain_p99_ms']:.3f}",
                  f"{r['governed_p50_ms']:.3f}", f"{r['governed_p99_ms']:.3f}", f"{r['ratio_p50']:.2f}",
                  ", ".join(f"{x:.2f}" for x in r["ratio_p50_rounds"]))
    console.print(t)
    tr = results["training_set"]
    console.print(f"training set, {tr['entity_rows']:,} entity rows: plain {tr['plain_s']:.2f}s, governed "
                  f"{tr['governed_s']:.2f}s, ratio {tr['ratio']:.2f} (rows out {tr['rows_out']:,})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "issue": 16, "people": args.people, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
