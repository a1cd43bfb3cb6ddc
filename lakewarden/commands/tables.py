"""``lakewarden tables …``: governed Delta tables — list, describe, history, optimize, vacuum, retention."""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from lakewarden.commands import console, human_bytes, state

tables_app = typer.Typer(help="Governed Delta tables: list, describe, history, optimize, vacuum, enforce-retention.", no_args_is_help=True)


def _ref(name: str):  # noqa: ANN202
    from lakehouse.catalog import TableRef

    return TableRef.parse(name)


@tables_app.command("list")
def tables_list(ctx: typer.Context) -> None:
    """Every governed table with its version, rows, files and size."""
    from lakehouse.maintenance import list_tables

    infos = list_tables(state(ctx).workspace())
    t = Table(title=f"governed tables ({len(infos)})")
    for c in ("table", "version", "rows", "files", "size", "partitioned by", "last change (UTC)"):
        t.add_column(c, justify="right" if c in ("version", "rows", "files", "size") else "left")
    for i in infos:
        t.add_row(str(i.ref), str(i.version), f"{i.rows:,}", str(i.files), human_bytes(i.bytes), ", ".join(i.partitions),
                  i.modified.strftime("%Y-%m-%d %H:%M:%S") if i.modified else "")
    console.print(t)


@tables_app.command("describe")
def tables_describe(ctx: typer.Context, table: Annotated[str, typer.Argument(help="layer.dataset, e.g. silver.customers")]) -> None:
    """Columns with their policy class and protection, layout and properties."""
    from lakehouse.maintenance import describe

    d = describe(state(ctx).workspace(), _ref(table))
    console.print(f"[bold]{d['table']}[/] version {d['version']} · {d['rows']:,} rows · {d['files']} files · "
                  f"{human_bytes(d['bytes'])} · partitioned by {', '.join(d['partition_columns']) or 'nothing'}")
    t = Table()
    for c in ("column", "type", "class", "protection"):
        t.add_column(c)
    for c in d["columns"]:
        t.add_row(c["name"], c["type"], c["class"], c["protection"])
    console.print(t)
    if d["properties"]:
        console.print("properties: " + ", ".join(f"{k}={v}" for k, v in d["properties"].items()))


@tables_app.command("history")
def tables_history(
    ctx: typer.Context,
    table: Annotated[str, typer.Argument(help="layer.dataset")],
    limit: Annotated[int, typer.Option(help="How many versions.")] = 20,
) -> None:
    """Versions of a table (for time travel: `lakewarden sql --version N`)."""
    from lakehouse.maintenance import history

    rows = history(state(ctx).workspace(), _ref(table), limit=limit)
    t = Table(title=f"history of {table}")
    for c in ("version", "time (UTC)", "operation", "mode", "rows added", "files +", "files -"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["version"]), r["time"].strftime("%Y-%m-%d %H:%M:%S") if r["time"] else "", str(r["operation"]),
                  str(r["mode"] or ""), str(r["rows_added"] if r["rows_added"] is not None else ""),
                  str(r["files_added"] or ""), str(r["files_removed"] or ""))
    console.print(t)


@tables_app.command("optimize")
def tables_optimize(ctx: typer.Context, table: Annotated[str, typer.Argument(help="layer.dataset")]) -> None:
    """Compact small files into larger ones (a new version; data unchanged)."""
    from lakehouse.maintenance import optimize

    st = state(ctx)
    out = optimize(st.workspace(), st.actor(), _ref(table))
    console.print(f"[green]optimized[/] {table}: {out.files_removed} files → {out.files_added}, now version {out.version}")


@tables_app.command("vacuum")
def tables_vacuum(
    ctx: typer.Context,
    table: Annotated[str, typer.Argument(help="layer.dataset")],
    force: Annotated[bool, typer.Option("--force", help="Really delete (default: dry run).")] = False,
    retention_hours: Annotated[Optional[int], typer.Option(help="Keep this many hours of history (default: policy).")] = None,
    enforce_retention: Annotated[bool, typer.Option(help="Refuse a window shorter than the policy's.")] = True,
) -> None:
    """Delete files that no version inside the retention window needs (dry run unless --force)."""
    from lakehouse.maintenance import vacuum

    st = state(ctx)
    out = vacuum(st.workspace(), st.actor(), _ref(table), dry_run=not force, retention_hours=retention_hours,
                 enforce_retention=enforce_retention)
    verb = "would delete" if out.dry_run else "deleted"
    console.print(f"{verb} {out.files} file(s) from {table} (keeping {out.retention_hours} h of history)")
    for p in out.paths[:20]:
        console.print(f"  {p}")


@tables_app.command("enforce-retention")
def tables_enforce_retention(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; change nothing.")] = False,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Only this dataset (repeatable; default: all).")] = None,
    landing: Annotated[Optional[Path], typer.Option(help="Folder of kept landing files to apply retention.landing to.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Delete rows older than each layer's policy retention, expired landing files, and history past the window."""
    from lakehouse.retention import enforce_retention

    st = state(ctx)
    rep = enforce_retention(st.workspace(), st.actor(), dry_run=dry_run, datasets=dataset or None, landing_dir=landing)
    if as_json:
        sys.stdout.write(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
        return
    verb = "would delete" if rep.dry_run else "deleted"
    t = Table(title=f"retention{' (dry run: nothing changed)' if rep.dry_run else ''} as of {rep.now:%Y-%m-%d %H:%M} UTC")
    for c in ("table", "keep", "rows older than", "rows before", verb, "rows after", "history kept", "files vacuumed", "version"):
        t.add_column(c, justify="left" if c in ("table", "rows older than") else "right")
    for r in rep.tables:
        keep = "forever" if r.keep is None else f"{r.keep.days} d"
        cutoff = r.cutoff.strftime("%Y-%m-%d %H:%M") if r.cutoff else ("—" if r.column else "no timestamp column")
        version = str(r.version_before) if r.version_after == r.version_before else f"{r.version_before} → {r.version_after}"
        t.add_row(r.table, keep, cutoff, f"{r.rows_before:,}", Text(f"{r.rows_deleted:,}", style="red" if r.rows_deleted else ""),
                  f"{r.rows_after:,}", f"{r.history_hours} h", str(r.files_vacuumed), version)
    console.print(t if rep.tables else "no governed tables yet: nothing to apply retention to")
    for x in rep.landing:
        console.print(f"landing {x.dataset}: {'would remove' if rep.dry_run else 'removed'} {x.files_removed} "
                      f"ingested file(s), {x.files_kept} still inside "
                      f"{'forever' if x.keep is None else f'{x.keep.days} d'}")
    if rep.landing_dir is None:
        console.print("[dim]landing files: not checked (name their folder with --landing)[/]")
    elif rep.landing_not_ingested:
        console.print(f"[yellow]{rep.landing_not_ingested} file(s) in {rep.landing_dir} were never ingested: left alone[/]")
    console.print(f"{verb} {rep.rows_deleted:,} row(s) and {rep.files_vacuumed} history file(s)"
                  + (f"; lineage run(s) {', '.join(rep.lineage_runs)}" if rep.lineage_runs else ""))


