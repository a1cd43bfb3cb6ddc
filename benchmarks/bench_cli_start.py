"""Benchmark how fast the command line starts (run by hand; not a timed test).

Three commands, each run N times (default 11) as a user runs them, in a fresh process:

* ``python -c pass``: the interpreter alone, the floor;
* ``lakewarden --help``: the command tree, no workspace;
* ``lakewarden models list``: a workspace with three registered model versions — the
  configuration, the registry's Delta table (read with deltalake's own engine, no pyarrow),
  each card checked against its registry row, and the table printed.

For each, the median wall time and the median CPU time (user + system of the child, from
``getrusage``) are reported. On a busy machine wall time includes waiting for a core; CPU time
is what the command itself costs. Goal: both commands under 0.5 s wall on an idle machine.
Python's bytecode cache is on (in a temporary folder) even where the environment sets
PYTHONDONTWRITEBYTECODE, as for an installed package: compiling Lakewarden's own modules from
source on every start would add about 0.07 s.

Results go to benchmarks/results/cli_start.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console()

CONFIG = """\
version: 1
name: bench
storage: {root: .lakewarden/tables}
keys:
  store: .lakewarden/keys/keystore.db
  kek: {provider: env, var: LAKEWARDEN_KEK}
policies: [policies/*.yaml]
"""


def _workspace(root: Path, env: dict[str, str]) -> Path:
    """A workspace with three registered versions of a model (cards only; no training needed)."""
    d = root / "ws"
    d.mkdir()
    shutil.copytree(REPO / "policies", d / "policies")
    (d / "lakewarden.yaml").write_text(CONFIG)
    script = f"""
from governance.workspace import Workspace
from training.registry import Registry
ws = Workspace.open({str(d / "lakewarden.yaml")!r})
reg = Registry(ws)
fields = {{"purpose": "credit_scoring", "features": ["customer_profile:income"], "label": "defaulted",
          "privacy": {{"epsilon": 3.0, "delta": 1e-5, "accountant": "prv"}}, "utility": {{"auc": 0.8}}}}
for i in range(3):
    reg.register(ws.actor("sam"), name="credit", dataset="customers", files={{"model.pt": b"w%d" % i}}, card_fields=fields)
ws.close()
"""
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=d)
    return d


def _time(cmd: list[str], cwd: Path, env: dict[str, str], runs: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    return {"wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
            "cpu_median_s": statistics.median(cpus), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cli_start.json")
    args = ap.parse_args()
    from governance.keys import generate_kek_b64

    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["LAKEWARDEN_KEK"] = generate_kek_b64()
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="lw-bench-cli-") as tmp:
        # Bytecode as an installed package has it (compiled once), kept out of the source tree.
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        ws = _workspace(Path(tmp), env)
        cases = {
            "python -c pass (baseline)": [py, "-c", "pass"],
            "lakewarden --help": [py, "-m", "lakewarden", "--help"],
            "lakewarden models list": [py, "-m", "lakewarden", "models", "list"],
        }
        for cmd in cases.values():  # warm the file cache (and .pyc files) once
            subprocess.run(cmd, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        load_before = os.getloadavg()[0]
        results = {name: _time(cmd, ws, env, args.runs) for name, cmd in cases.items()}
        load_after = os.getloadavg()[0]
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": [round(load_before, 2), round(load_after, 2)]},
        "goal_s": 0.5,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    t = Table(title=f"CLI start, median of {args.runs} runs (load average {load_before:.1f} → {load_after:.1f})")
    for c in ("command", "wall median s", "wall min s", "CPU median s"):
        t.add_column(c, justify="left" if c == "command" else "right")
    for name, r in results.items():
        t.add_row(name, f"{r['wall_median_s']:.3f}", f"{r['wall_min_s']:.3f}", f"{r['cpu_median_s']:.3f}")
    console.print(t)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
