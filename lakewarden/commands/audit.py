"""``lakewarden audit …``: verify, report on and query the tamper-evident audit log (compliance officers)."""

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from lakewarden.commands import console, parse_time, state

audit_app = typer.Typer(help="Verify and query the tamper-evident audit log.", no_args_is_help=True)


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    witness: Annotated[bool, typer.Option(
        "--witness", help="Also compare the log with the heads its witness holds (audit.witness): finds a rollback "
                          "of the table and the head, and a log re-signed with a stolen key.")] = False,
) -> None:
    """Recompute the hash chain and check every signed checkpoint; exit 4 and name the first bad event."""
    from governance.audit_ops import verify_audit

    st = state(ctx)
    rep = verify_audit(st.workspace(), st.actor(), witness=witness)
    if as_json:
        console.print_json(json.dumps(rep.to_dict(), default=str))
    elif rep.ok:
        console.print(
            f"[green]audit OK[/]: {rep.events} events, {rep.checkpoints} signed checkpoints, "
            f"head at seq={rep.head_seq}, verified in {rep.seconds:.2f}s"
        )
    if rep.witness is not None and not as_json:
        for line in rep.witness.get("checked", []):
            console.print(f"checked: {line}" + (f", {rep.witness['lock']}" if rep.witness.get("lock") else ""))
        for line in rep.witness.get("not_checked", []):
            console.print(f"[yellow]not checked[/]: {line}")
    if not rep.ok:
        rep.raise_if_bad()


@audit_app.command("report")
def audit_report(
    ctx: typer.Context,
    html_out: Annotated[Path, typer.Option("--html", help="Write the report to this HTML file.")],
    recent_denies: Annotated[int, typer.Option(min=1, help="How many of the latest denies to list.")] = 20,
) -> None:
    """One self-contained HTML compliance report: requests, decisions, budgets, models, lineage, integrity."""
    from governance.report import build_report, write_report
    from training.compliance import model_summaries

    st = state(ctx)
    rep = build_report(st.workspace(), st.actor(), models=model_summaries, recent_denies=recent_denies)
    path = write_report(rep, html_out)
    c = rep.counts
    console.print(f"[green]wrote[/] {path}: {c['decisions']:,} decisions ({c['denies']:,} denies), {c['requests']} requests, "
                  f"{c['budgets']} budgets, {c['models']} models, {c['lineage_nodes']} lineage nodes")
    if rep.integrity.ok:
        console.print(f"audit chain verified: {rep.integrity.events:,} events, head at seq={rep.integrity.head_seq}")
    else:
        rep.integrity.raise_if_bad()


class _Fmt(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@audit_app.command("query")
def audit_query(
    ctx: typer.Context,
    actor: Annotated[Optional[str], typer.Option(help="Only events by this actor.")] = None,
    action: Annotated[Optional[str], typer.Option(help="Only this action, e.g. gate.decide.")] = None,
    resource: Annotated[Optional[str], typer.Option(help="Resource prefix, e.g. dataset:customers.")] = None,
    subject: Annotated[Optional[str], typer.Option(help="Subject token (sub_...).")] = None,
    outcome: Annotated[Optional[str], typer.Option(help="allow, deny, ok, error...")] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO time, inclusive.")] = None,
    until: Annotated[Optional[str], typer.Option(help="ISO time, exclusive.")] = None,
    limit: Annotated[int, typer.Option(help="Show the last N matches.")] = 50,
    fmt: Annotated[_Fmt, typer.Option("--format", help="Output format.")] = _Fmt.table,
) -> None:
    """Filter audit events (compliance_officer only)."""
    from governance.audit_ops import query_audit

    st = state(ctx)
    tbl = query_audit(
        st.workspace(), st.actor(),
        actor=actor, action=action, resource=resource, subject_token=subject, outcome=outcome,
        since=parse_time(since, "--since"), until=parse_time(until, "--until"), limit=limit,
    )
    rows = tbl.to_pylist()
    cols = ["seq", "ts", "actor", "action", "stage", "resource", "outcome", "rule_ids", "subject_token", "details"]
    if fmt is _Fmt.json:
        sys.stdout.write(json.dumps([{c: r[c] for c in cols} for r in rows], default=str, indent=1) + "\n")
        return
    if fmt is _Fmt.csv:
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        for r in rows:
            w.writerow([r[c] for c in cols])
        return
    t = Table(title=f"audit events ({len(rows)} shown)", show_lines=False)
    for c, kw in (("seq", {"justify": "right"}), ("time (UTC)", {"no_wrap": True}), ("actor", {}), ("action", {}),
                  ("stage", {}), ("resource", {}), ("outcome", {}), ("rules", {"overflow": "fold"}), ("subject", {})):
        t.add_column(c, **kw)
    style = {"deny": "red", "failed": "red", "allow": "green", "ok": "green"}
    for r in rows:
        tok = r["subject_token"]
        t.add_row(
            str(r["seq"]), r["ts"].strftime("%m-%d %H:%M:%S"), r["actor"], r["action"], r["stage"] or "",
            r["resource"] or "", Text(r["outcome"], style=style.get(r["outcome"], "")),
            (r["rule_ids"] or "").replace(",", "\n"), (tok[:12] + "…") if tok else "",
        )
    console.print(t)


