"""``lakewarden privacy status``: differential-privacy budgets per dataset (the privacy ledger)."""

from typing import Annotated, Optional

import typer
from rich.table import Table

from lakewarden.commands import console, state

privacy_app = typer.Typer(help="Differential-privacy budgets per dataset (the privacy ledger).", no_args_is_help=True)


@privacy_app.command("status")
def privacy_status(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Argument(help="Dataset (default: every dataset with a budget).")] = None,
) -> None:
    """ε spent, reserved and left per dataset, composed over every private run."""
    from governance.ledger import PrivacyLedger

    ws = state(ctx).workspace()
    led = PrivacyLedger(ws)
    names = [dataset] if dataset else sorted(n for n, p in ws.policies.datasets.items() if p.privacy)
    t = Table(title="privacy budgets (basic composition)")
    for c in ("dataset", "ε total", "ε spent", "ε reserved", "ε left", "δ spent (sum)", "δ per run ≤", "runs"):
        t.add_column(c, justify="left" if c == "dataset" else "right")
    for n in names:
        s_ = led.status(n)
        t.add_row(n, f"{s_.epsilon_total:g}", f"{s_.epsilon_spent:.3g}", f"{s_.epsilon_reserved:.3g}",
                  f"{s_.epsilon_left:.3g}", f"{s_.delta_spent:.2g}", f"{s_.delta_max:.2g}", str(s_.runs))
    console.print(t)


