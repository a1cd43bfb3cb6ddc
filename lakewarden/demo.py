"""``make demo``: the main job on embedded defaults — the reference pipeline under ``dvc repro``.

Against the repository's own lakewarden.yaml, params.yaml and dvc.yaml (state under
.lakewarden/, ignored by git): initialise the workspace, ``dvc repro register`` (sources —
the synthetic generator, as params.yaml says — ingest, silver, features, DP training, fairness
evaluation, registration — each stage gated), the compliance officer's approval (the pipeline
identity is refused: separation of duties), ``dvc repro`` again for the deploy stage (render the
InferenceService, local smoke test), a few analyst queries, an erasure request (rows, online features, logs, the subject's key
destroyed, then a scan of every file; the history waits for the policy's window), and a summary with
the audit chain verified. The demo is one configuration of the pipeline: docs/your-own-data.md
runs the same stages on a user's own files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from lakewarden.cli import main as cli

console = Console()


def run(*args: str, expect: int = 0) -> None:
    console.print(f"[bold cyan]$ lakewarden {' '.join(args)}[/]")
    try:
        cli(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    if code != expect:
        console.print(f"[red]unexpected exit {code} (expected {expect})[/]")
        sys.exit(1)
    if expect:
        console.print(f"[dim](exit {code}, as expected)[/]")


def a_customer_id(root: Path) -> str:
    """The id of the synthetic generator's first customer for params.yaml's seed (the same seed makes
    the same people), as a data subject would give it in an erasure request."""
    import tempfile

    import pyarrow.csv as pacsv
    import yaml

    from lakehouse.synth import generate

    seed = int((yaml.safe_load((root / "params.yaml").read_text()).get("synthetic") or {}).get("seed", 0))
    with tempfile.TemporaryDirectory() as tmp:
        res = generate(tmp, people=1, transactions_per_person=0, seed=seed)
        return str(pacsv.read_csv(res.files["customers"]).column("customer_id")[0].as_py())


def dvc(outcomes: Path, *args: str) -> dict | None:
    """Run DVC (from this venv), streaming its output; return the outcome of the stage that stopped it
    (``lakewarden.pipeline.step_outcome``), or None when every stage it ran succeeded.

    A stage that failed rather than being refused by the gate ends the demo: one line naming the
    stage and why, exit 1.
    """
    exe = Path(sys.executable).parent / "dvc"
    console.print(f"[bold cyan]$ dvc {' '.join(args)}[/]")
    shutil.rmtree(outcomes, ignore_errors=True)  # only this run's stages report below
    env = {**os.environ, "PATH": f"{exe.parent}:{os.environ.get('PATH', '')}", "PYTHONWARNINGS": "ignore"}
    code = subprocess.run([str(exe), *args], env=env).returncode
    ended = [json.loads(p.read_text()) for p in sorted(outcomes.glob("*.json"))]
    stopped = next((o for o in ended if o["status"] != "ok"), None)
    if code == 0 and stopped is None:
        return None
    if stopped is None:
        fail(f"dvc repro failed (exit {code}) before a stage could report; see DVC's message above")
    if stopped["status"] != "denied":
        fail(f"stage {stopped['stage']} {stopped['status']}: {stopped['message']}")
    return stopped


def fail(line: str) -> None:
    console.print(f"[bold red]demo failed[/]: {line}", soft_wrap=True)
    sys.exit(1)


def main() -> None:
    root = Path.cwd()
    config = root / "lakewarden.yaml"
    console.print(Rule("Lakewarden demo: the reference pipeline under dvc repro"))
    # A new workspace makes every manifest DVC may still hold stale (they point into it): rebuild all.
    fresh = not (root / ".lakewarden").exists()
    run("init", str(root))
    from governance.config import load_config
    from lakewarden.pipeline import OUT, deploy_status

    outcomes = load_config(config).workspace_dir / "pipeline" / "outcomes"
    console.print(Rule("sources (generate) → ingest → silver → features → train (DP) → evaluate (fairness) → register"))
    stopped = dvc(outcomes, "repro", "register", *(["--force"] if fresh else []))
    if stopped is not None:
        fail(f"stage {stopped['stage']} refused by the gate: {stopped['message']}")

    reg = json.loads((root / OUT / "register.json").read_text())
    run("models", "show", reg["ref"])
    console.print(Rule("Separation of duties: the compliance officer approves, the pipeline deploys"))
    run("--as", "pipeline", "models", "approve", reg["ref"], expect=3)
    if reg["fairness_passed"]:
        run("--as", "carla", "models", "approve", reg["ref"])
    else:
        console.print("[yellow]the fairness verdict failed: compliance does not approve; the deploy gate will refuse[/]")
    stopped = dvc(outcomes, "repro")
    if stopped is not None:
        if stopped["stage"] != "deploy":
            fail(f"stage {stopped['stage']} refused by the gate: {stopped['message']}")
        deployed = deploy_status(None, stopped)
        console.print(f"[yellow]{deployed}[/]; the rest of the pipeline stands", soft_wrap=True)
    else:
        deployed = "deployed " + json.loads((root / OUT / "deploy.json").read_text())["ref"]
    console.print(Rule("Analyst SQL on the same tables: masks and row filters from policy"))
    run("--as", "ana", "sql", "SELECT region, count(*) AS customers, round(avg(CAST(defaulted AS INT)), 3) AS default_rate "
        "FROM customers GROUP BY region ORDER BY region")
    run("--as", "ana", "sql", "SELECT sex FROM customers", expect=2)
    run("--as", "ana", "sql", "SELECT count(*) FROM bronze.customers", expect=3)
    console.print(Rule("The right to erasure: one request reaches every copy, then a scan proves it"))
    subject = a_customer_id(root)
    run("--as", "ana", "requests", "erase", "--subject", subject, expect=3)
    run("--as", "carla", "requests", "erase", "--subject", subject)
    console.print(Rule("Summary"))
    run("--as", "carla", "pipeline", "summary")
    run("--as", "carla", "pipeline", "trace")
    console.print(f"[bold green]demo finished[/] ({deployed}): state is under .lakewarden/ (make clean-demo removes it); "
                  "`dvc repro` again runs only its sources stage until a param, policy or landing file changes")


if __name__ == "__main__":
    from lakewarden.process import run_and_exit

    run_and_exit(main)
