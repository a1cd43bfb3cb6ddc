"""``make demo``: the main job on embedded defaults, as far as the system is built.

Runs the real CLI against the repository's own lakewarden.yaml (state under
.lakewarden/, ignored by git): initialise the workspace, validate policies,
generate synthetic landing data (with some bad rows), ingest it into protected
Delta tables (bad rows to quarantine, with reasons), build silver, query it as
an analyst (masked, filtered) and be refused what the role may not see, ask the
gate about later stages, show crypto-shredding, then verify the audit log.
"""

from __future__ import annotations

import os
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


def shredding_demo(config: Path) -> None:
    """Seal synthetic identifiers under per-subject keys, shred one subject, show what remains readable."""
    from governance.errors import SubjectShredded
    from governance.workspace import Workspace

    people = ["ada.l@example.org", "grace.h@example.org", "alan.t@example.org"]
    with Workspace.open(config) as ws:
        ring = ws.keyring
        tokens = ring.tokens_for(people)
        sealed = ring.seal_many(people, tokens, dataset="demo_vault", column="email")
        victim = tokens[1]
        ring.shred(victim)
        ws.audit.record("keys.shred", actor="carla", outcome="ok", resource="system:keys", subject_token=victim)
        for tok, blob in zip(tokens, sealed):
            try:
                ring.open(blob, token=tok, dataset="demo_vault", column="email")
                state = "[green]readable by its key holder[/]"
            except SubjectShredded:
                state = "[red]key destroyed: unreadable everywhere, for good[/]"
            console.print(f"  {tok}  {len(blob)}-byte ciphertext  {state}")


def main() -> None:
    root = Path.cwd()
    config = root / "lakewarden.yaml"
    landing = root / ".lakewarden" / "landing"
    people = os.environ.get("LAKEWARDEN_DEMO_PEOPLE", "20000")
    console.print(Rule("Lakewarden demo"))
    run("init", str(root))
    run("policy", "check")
    console.print(Rule("Synthetic landing data (fictional people, 1% bad rows)"))
    run("generate", "--out", str(landing), "--people", people, "--transactions-per-person", "5",
        "--bad-rows", "0.01", "--bias", "0.5", "--seed", "7", "--overwrite")
    console.print(Rule("Governed ingest: validate, protect, quarantine, Delta"))
    run("--as", "pipeline", "ingest", "customers", str(landing / "customers.csv"))
    run("--as", "pipeline", "ingest", "transactions", str(landing / "transactions.csv"))
    run("--as", "pipeline", "silver", "customers")
    run("--as", "pipeline", "silver", "transactions")
    run("tables", "list")
    console.print(Rule("Analyst SQL: masks and row filters from policy"))
    run("--as", "ana", "sql", "SELECT region, count(*) AS customers, round(avg(CAST(defaulted AS INT)), 3) AS default_rate "
        "FROM customers GROUP BY region ORDER BY region")
    run("--as", "ana", "sql", "SELECT * FROM customers LIMIT 3")
    run("--as", "ana", "sql", "SELECT sex FROM customers", expect=2)
    run("--as", "ana", "sql", "SELECT count(*) FROM bronze.customers", expect=3)
    run("--as", "pipeline", "sql", "SELECT reason, count(*) AS n FROM quarantine.customers GROUP BY reason ORDER BY n DESC")
    console.print(Rule("Feature store: Feast over silver, purpose-gated"))
    run("--as", "pipeline", "features", "apply")
    run("--as", "pipeline", "features", "materialize")
    run("--as", "sam", "features", "training-set", "--purpose", "credit_scoring", "--label", "defaulted",
        "--features", "customer_profile:income,customer_profile:income_z,customer_profile:region",
        "--out", str(root / ".lakewarden" / "training_set.parquet"))
    run("--as", "sam", "features", "training-set", "--purpose", "credit_scoring",
        "--features", "customer_profile:income,customer_sensitive:sex", expect=3)
    console.print(Rule("Private training: DP-SGD, privacy ledger, fairness, model card"))
    run("--as", "sam", "train", "--name", "credit", "--purpose", "credit_scoring", "--label", "defaulted",
        "--features", "customer_profile:income,customer_profile:income_log,customer_profile:birth_date,customer_profile:region",
        "--epsilon", "3", "--epochs", "3")
    run("models", "list")
    run("privacy", "status", "customers")
    console.print(Rule("Deployment is gated: approval, ε cap, fairness"))
    run("--as", "mel", "deploy", "credit@1", "--target", "k8s", expect=3)
    console.print(Rule("The gate decides each later stage"))
    run("--as", "pipeline", "gate", "check", "ingest", "--dataset", "customers")
    run("--as", "ana", "gate", "check", "query", "--dataset", "customers", "--layer", "silver")
    run("--as", "ana", "gate", "check", "query", "--dataset", "customers", "--layer", "bronze", expect=3)
    run("--as", "sam", "gate", "check", "features", "--dataset", "customers", "--purpose", "credit_scoring",
        "--columns", "income,region")
    run("--as", "sam", "gate", "check", "features", "--dataset", "customers", "--purpose", "credit_scoring",
        "--columns", "income,sex", expect=3)
    run("--as", "sam", "gate", "check", "train", "--dataset", "customers", "--purpose", "credit_scoring",
        "--epsilon", "3")
    run("--as", "sam", "gate", "check", "train", "--dataset", "customers", "--purpose", "credit_scoring",
        "--epsilon", "3", "--epsilon-spent", "18.5", expect=3)
    console.print(Rule("Crypto-shredding"))
    shredding_demo(config)
    console.print(Rule("Audit"))
    run("--as", "carla", "audit", "verify")
    run("--as", "carla", "audit", "query", "--limit", "8")
    console.print("[bold green]demo finished[/]: state is under .lakewarden/ (make clean-demo removes it)")


if __name__ == "__main__":
    main()
