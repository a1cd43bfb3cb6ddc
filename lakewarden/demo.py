"""``make demo``: the main job on embedded defaults, as far as the system is built.

Runs the real CLI against the repository's own lakewarden.yaml (state under
.lakewarden/, ignored by git): initialise the workspace, validate policies, ask
the gate what each pipeline stage may do (some answers are denies, on purpose),
show crypto-shredding on synthetic identifiers, then verify the audit log.
"""

from __future__ import annotations

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
    console.print(Rule("Lakewarden demo: governance kernel"))
    run("init", str(root))
    run("policy", "check")
    console.print(Rule("The gate decides each stage"))
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
