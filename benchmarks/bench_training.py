"""Benchmark DP-SGD against non-private training of the same model on the same data (by hand).

The reference model: an MLP (64, 64) on the credit features of synthetic customers
(income, income_z, income_log, birth year, region one-hot), batch 512, Adam. Each
configuration runs in its own process so its peak memory (max RSS) is its own:

* ``plain``  — the same model, batches and optimizer without DP (shuffled fixed batches);
* ``fused``  — Lakewarden's DP-SGD step (training/fused.py: closed-form ghost norms,
  row-wise Poisson sampling), with Opacus's noise calibration and accountant;
* ``ghost``  — Opacus's ghost clipping (``make_private_with_epsilon``);
* ``hooks``  — Opacus's default per-sample gradients.

Every mode is run ``--rounds`` times, interleaved (plain, fused, ghost, hooks, plain, …), so
the machine's noise falls on all of them alike. Reports the median epoch time (epochs after
the first, over all rounds), the ratio to plain, peak memory, and utility (holdout AUC and
accuracy) at ε = 1, 3, 8 with the default (fused) mode.

Goal (issue #5): DP epoch ≤ 1.5× the non-private one on the reference model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console()

WORKER = r"""
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np
from sklearn.metrics import roc_auc_score
from training.trainer import TrainOptions, train, predict_proba
d = np.load(sys.argv[1])
mode, eps, epochs = sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
opts = TrainOptions(epochs=epochs, batch_size=512, target_epsilon=eps, delta=1e-5, accountant="prv",
                    grad_sample_mode="fused" if mode == "plain" else mode, private=(mode != "plain"))
r = train(d["Xtr"], d["ytr"], opts)
p = predict_proba(r, d["Xte"])
print(json.dumps({"epoch_s": r.epoch_seconds, "epsilon": r.epsilon, "auc": float(roc_auc_score(d["yte"], p)),
                  "accuracy": float(((p > 0.5) == (d["yte"] > 0.5)).mean()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "device": r.device}))
"""


def make_data(path: Path, people: int, seed: int) -> dict:
    import numpy as np
    import pyarrow as pa

    from lakehouse.synth import iter_customers
    from training.encode import Encoder

    t = pa.Table.from_batches(list(iter_customers(people=people, seed=seed, bias=0.5)))
    inc = t["income"].to_numpy()
    feats = pa.table({
        "income": inc, "income_log": np.log1p(inc),
        "birth_year": pa.array([d.year for d in t["birth_date"].to_pylist()]),
        "region": t["region"],
    })
    y = np.array(t["defaulted"].to_pylist(), dtype=np.float32)
    enc = Encoder.fit(feats, feats.column_names)
    X = enc.transform(feats)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    cut = int(0.8 * len(y))
    np.savez(path, Xtr=X[idx[:cut]], ytr=y[idx[:cut]], Xte=X[idx[cut:]], yte=y[idx[cut:]])
    return {"rows": int(len(y)), "features": int(X.shape[1]), "positive_rate": float(y.mean())}


def run(path: Path, mode: str, eps: float, epochs: int) -> dict:
    p = subprocess.run([sys.executable, "-c", WORKER, str(path), mode, str(eps), str(epochs)], capture_output=True,
                       text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "training.json")
    args = ap.parse_args()
    path = REPO / "benchmarks" / ".data" / f"train_{args.people}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with console.status("building the data set"):
        info = make_data(path, args.people, seed=1)
    modes = ("plain", "fused", "ghost", "hooks")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for k in range(args.rounds):
        for mode in modes:
            with console.status(f"round {k + 1}/{args.rounds}: {mode}"):
                runs[mode].append(run(path, mode, 3.0, args.epochs))
    speed = {m: {**rs[-1], "epoch_s": [s for r in rs for s in r["epoch_s"][1:]],
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for m, rs in runs.items()}
    utility = {}
    for eps in (1.0, 3.0, 8.0):
        with console.status(f"fused at ε={eps:g}"):
            utility[eps] = run(path, "fused", eps, args.epochs)
    med = {m: statistics.median(r["epoch_s"]) for m, r in speed.items()}
    t = Table(title=f"epoch time, {info['rows']:,} rows × {info['features']} features, batch 512, {os.cpu_count()} CPUs "
                    f"({speed['plain']['device']})")
    for c in ("mode", "epoch s (median)", "× plain (goal ≤ 1.5)", "peak MB", "ε", "AUC"):
        t.add_column(c, justify="left" if c == "mode" else "right")
    for m in modes:
        r = speed[m]
        t.add_row(m, f"{med[m]:.3f}", f"{med[m] / med['plain']:.2f}", f"{r['peak_rss_mb']:.0f}",
                  "—" if r["epsilon"] is None else f"{r['epsilon']:.2f}", f"{r['auc']:.3f}")
    console.print(t)
    u = Table(title="utility at ε (fused DP-SGD, δ = 1e-5)")
    for c in ("target ε", "spent ε", "AUC", "accuracy"):
        u.add_column(c, justify="right")
    u.add_row("∞ (plain)", "—", f"{speed['plain']['auc']:.3f}", f"{speed['plain']['accuracy']:.3f}")
    for eps, r in utility.items():
        u.add_row(f"{eps:g}", f"{r['epsilon']:.2f}", f"{r['auc']:.3f}", f"{r['accuracy']:.3f}")
    console.print(u)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"data": info, "epochs": args.epochs, "rounds": args.rounds, "speed": speed,
                                    "ratios": {m: med[m] / med["plain"] for m in med},
                                    "utility": {str(k): v for k, v in utility.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
