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
    st = state(ctx)
    me = st.actor()
    roles = me.roles or ws.policies.roles_of(me.name)
    mine = [n for n in names if any(ws.policies.datasets[n].query_mode(r) == "private"
                                    for r in roles if r in ws.policies.datasets[n].access)]
    if mine:  # the caller's own private queries: what is left to them
        a = Table(title=f"{me.name}'s private queries")
        for c in ("dataset", "queries", "ε spent", "ε left (yours)", "δ spent", "δ left (yours)"):
            a.add_column(c, justify="left" if c == "dataset" else "right")
        for n in mine:
            s_ = led.analyst_status(n, me.name)
            a.add_row(n, str(s_.queries), f"{s_.epsilon_spent:.3g}", f"{s_.epsilon_left:.3g}", f"{s_.delta_spent:.2g}",
                      f"{s_.delta_left:.2g}")
        console.print(a)




@privacy_app.command("risk")
def privacy_risk(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset whose table to measure.")],
    layer: Annotated[str, typer.Option(help="Layer: silver (default) or bronze.")] = "silver",
    k_min: Annotated[Optional[int], typer.Option("--k-min", help="Threshold k (default: the policy's anonymity.k_min).")] = None,
    l_min: Annotated[Optional[int], typer.Option("--l-min", help="Threshold l (default: the policy's anonymity.l_min).")] = None,
    purpose: Annotated[Optional[str], typer.Option(help="Purpose stated to open sensitive columns for l.")] = None,
    smallest: Annotated[int, typer.Option(help="How many of the smallest classes to list.", min=0)] = 5,
    query: Annotated[Optional[str], typer.Option(
        "--query", help="Measure what this SQL query would export (as `lakewarden sql` runs it), not the table.",
    )] = None,
) -> None:
    """k-anonymity and l-diversity over the policy's quasi-identifiers: sizes and ranks, never values."""
    from lakehouse.anonymity import privacy_risk as verb

    st = state(ctx)
    rep = verb(st.workspace(), st.actor(), dataset, layer=layer, k_min=k_min, l_min=l_min, purpose=purpose,
               smallest=smallest, query=query)
    m = rep.measure
    what = "the query's result" if rep.query else f"{rep.layer}.{rep.dataset}@{rep.version}"
    over = ", ".join(m.quasi_identifiers) or "no quasi-identifier column: one class"
    t = Table(title=f"{what}: k-anonymity over ({over})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("rows", f"{m.rows:,}")
    t.add_row("equivalence classes", f"{m.classes:,}")
    t.add_row("k (smallest class)", "-" if m.k is None else str(m.k))
    if m.k_min is not None:
        t.add_row("k_min", str(m.k_min))
        t.add_row("classes below k_min", f"{m.classes_below:,}")
        t.add_row("rows in them", f"{m.rows_below:,}")
        t.add_row("k met", "yes" if m.k_ok else "[red]no[/]")
    for s, v in m.l.items():
        t.add_row(f"l({s})", "-" if v is None else str(v))
    if m.l_min is not None:
        t.add_row("l_min", str(m.l_min))
        if m.l:
            t.add_row("l met", "yes" if m.l_ok else "[red]no[/]")
    for s, why in rep.sensitive_unmeasured.items():
        t.add_row(f"l({s})", why)
    if rep.row_filter:
        t.add_row("rows measured", "only those your role's row filter shows")
    if rep.applied and rep.applied.get("levels"):
        t.add_row("levels (silver build)", ", ".join(f"{c}: {lv}" for c, lv in rep.applied["levels"].items()))
    console.print(t)
    d = Table(title="class sizes")
    d.add_column("size", justify="right")
    d.add_column("classes", justify="right")
    for size, n in m.sizes[:10]:
        d.add_row(str(size), f"{n:,}")
    if len(m.sizes) > 10:
        d.add_row("…", f"{sum(n for _, n in m.sizes[10:]):,} more")
    console.print(d)
    if m.smallest:
        c = Table(title="smallest classes (by rank; values are not shown)")
        c.add_column("class")
        c.add_column("size", justify="right")
        for s in m.l:
            c.add_column(f"l({s})", justify="right")
        for ci in m.smallest:
            c.add_row(ci.id, str(ci.size), *(str(ci.l.get(s, "-")) for s in m.l))
        console.print(c)
