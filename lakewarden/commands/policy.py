"""``lakewarden policy …``: validate, show, draft and describe policies (not gated: no governed values)."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from governance.errors import LakewardenError
from lakewarden.commands import console, state

policy_app = typer.Typer(help="Validate and show policies.", no_args_is_help=True)


@policy_app.command("check")
def policy_check(
    ctx: typer.Context,
    json_out: Annotated[Optional[Path], typer.Option(help="Also write a JSON summary here (a DVC metric).")] = None,
) -> None:
    """Validate lakewarden.yaml and every policy file; summarise what they govern."""
    ws = state(ctx).workspace()
    ps = ws.policies
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(ps.summary(), indent=2, sort_keys=True) + "\n")
    t = Table(title=f"policies {ps.digest[:12]} ({len(ps.files)} files)")
    for col in ("dataset", "subject key", "identifiers", "quasi-ids", "sensitive", "roles with access", "purposes"):
        t.add_column(col)
    from governance.policy import ColumnClass as C

    for name, ds in sorted(ps.datasets.items()):
        t.add_row(
            name,
            ds.subject_key,
            ", ".join(ds.columns_of(C.DIRECT_IDENTIFIER)),
            ", ".join(ds.columns_of(C.QUASI_IDENTIFIER)),
            ", ".join(ds.columns_of(C.SENSITIVE)),
            ", ".join(ds.access),
            ", ".join(ds.purposes),
        )
    console.print(t)
    console.print(f"[green]ok[/]: {ws.config.base_dir / 'lakewarden.yaml'} and {len(ps.files)} policy files are valid")
    from lakehouse.maintenance import token_stats_report

    for ts in token_stats_report(ws):  # tables written before token statistics were turned off
        console.print(f"[yellow]warning[/]: {ts.describe()}", soft_wrap=True)


@policy_app.command("show")
def policy_show(ctx: typer.Context, dataset: str) -> None:
    """Columns, protection and per-role access of one dataset."""
    ds = state(ctx).workspace().policies.dataset(dataset)
    t = Table(title=f"{dataset}: columns")
    for col in ("column", "class", "protection", "type"):
        t.add_column(col)
    for name, c in ds.columns.items():
        prot = c.protection.value if c.protection else ""
        if c.generalize:
            prot += f" ({c.generalize})"
        t.add_row(name, c.class_.value, prot, c.type or "")
    console.print(t)
    a = Table(title=f"{dataset}: access")
    for col in ("role", "layers", "columns", "masks", "row filter", "purposes"):
        a.add_column(col)
    for role, acc in ds.access.items():
        a.add_row(
            role,
            ", ".join(acc.layers),
            "*" if acc.columns == "*" else ", ".join(acc.columns),
            ", ".join(f"{k}:{m}" for k, m in acc.masks.items()),
            acc.row_filter or "",
            ", ".join(acc.purposes),
        )
    console.print(a)


@policy_app.command("suggest")
def policy_suggest(
    file: Annotated[Path, typer.Argument(help="A landing file to sample: .csv, .parquet or .jsonl.", show_default=False)],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name (default: the file's name, lower_snake_case).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to write the draft (default: policies/<dataset>.yaml; '-' prints it).")] = None,
    sample: Annotated[int, typer.Option(help="Rows to sample from the start of the file.")] = 1000,
    force: Annotated[bool, typer.Option("--force", help="Replace the file at --out if it exists.")] = False,
) -> None:
    """Draft a dataset policy from a sample of a file: each column classified from its name and content, with evidence."""
    from lakehouse.suggest import suggest_policy, write_draft

    s = suggest_policy(file, dataset=dataset, sample=sample)
    if out is not None and str(out) == "-":
        sys.stdout.write(s.to_yaml())
        return
    target = write_draft(s, out if out is not None else Path("policies") / f"{s.dataset}.yaml", force=force)
    t = Table(title=f"{s.dataset}: {s.rows_sampled:,} rows sampled from {s.source}")
    for col in ("column", "class", "protection", "type", "confidence", "evidence"):
        t.add_column(col, overflow="fold")
    for c in s.columns:
        prot = "" if c.class_.value == "public" else c.protection.value
        if "generalize" in c.spec:
            prot += f" ({c.spec['generalize']})"
        t.add_row(c.name, c.class_.value, prot, c.type, c.confidence, "; ".join(c.evidence))
    console.print(t)
    k = s.subject_key
    console.print(f"subject key: [bold]{k.column}[/] ({k.confidence} confidence)", highlight=False)
    for w in s.warnings:
        console.print(f"[yellow]warning[/]: {w}", soft_wrap=True, highlight=False)
    console.print(f"[green]wrote[/] {target}: a draft; review it, then run `lakewarden policy check`", highlight=False)


@policy_app.command("schema")
def policy_schema(
    out: Annotated[Optional[Path], typer.Option(help="Write the JSON Schema here (default: print it).")] = None,
) -> None:
    """Print or write the JSON Schema of policy files, for editors (see docs/configuration.md)."""
    from governance.policy_schema import render

    text = render()
    if out is None:
        sys.stdout.write(text)
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise LakewardenError(f"{out}: cannot write the schema ({exc.strerror or exc})") from None
    console.print(f"[green]wrote[/] {out}", highlight=False)


