"""``lakewarden ingest | generate | sql | silver``: data into the lakehouse, and SQL over it."""

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lakewarden.commands import console, err, parse_time, state

top = typer.Typer()


@top.command()
def ingest(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset name (a policy must govern it).")],
    paths: Annotated[list[str], typer.Argument(help="Files or globs: .csv, .parquet, .jsonl.")],
    batch_rows: Annotated[Optional[int], typer.Option(help="Rows per batch (bounds memory; default depends on the dataset).")] = None,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray cluster at $RAY_ADDRESS, else one started here).")] = "local",
    workers: Annotated[Optional[int], typer.Option(help="Batches worked on at once (default: the cores; with ray, the cluster's CPUs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate, protect and write landing files into bronze (bad rows to quarantine, with reasons)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lakehouse.ingest import ingest as run_ingest

    st = state(ctx)
    ws = st.workspace()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,} rows"),
                  TimeElapsedColumn(), console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"ingest {dataset}", total=None)
        rep = run_ingest(ws, st.actor(), dataset, paths, batch_rows=batch_rows, engine=engine, workers=workers,
                         progress=lambda src, n: bar.update(task, advance=n, description=f"ingest {dataset} ← {src}"))
    if as_json:
        sys.stdout.write(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
        return
    t = Table(title=f"ingest {dataset}: {rep.rows_read:,} rows read in {rep.seconds:.1f}s, peak memory {rep.peak_rss_mb:.0f} MB")
    for c in ("file", "read", "accepted", "quarantined", "already ingested", "landing file"):
        t.add_column(c, justify="right" if c in ("read", "accepted", "quarantined", "already ingested") else "left")
    for f in rep.files:
        t.add_row(f.source, f"{f.rows_read:,}", f"{f.rows_accepted:,}", f"{f.rows_quarantined:,}", f"{f.rows_skipped:,}", f.landing)
    console.print(t)
    if rep.reasons:
        r = Table(title="quarantined rows by reason")
        r.add_column("reason")
        r.add_column("rows", justify="right")
        for reason, n in rep.reasons.most_common(15):
            r.add_row(reason, f"{n:,}")
        console.print(r)
    for f in rep.files:
        if f.dropped_columns:
            console.print(f"[yellow]{f.source}: dropped unclassified column(s) {', '.join(f.dropped_columns)}[/]")
        if f.filled_columns:
            console.print(f"[yellow]{f.source}: optional column(s) {', '.join(f.filled_columns)} absent, stored as NULL[/]")
    console.print(f"rows read {rep.rows_read:,} = accepted {rep.rows_accepted:,} + quarantined {rep.rows_quarantined:,}"
                  f" + already ingested {rep.rows_skipped:,}; versions: "
                  + (", ".join(f"{k}@{v}" for k, v in sorted(rep.versions.items())) or "unchanged"))


@top.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder for customers.* and transactions.*.")] = Path("landing"),
    people: Annotated[int, typer.Option(help="Number of customers.")] = 10_000,
    transactions_per_person: Annotated[float, typer.Option(help="Mean transactions per customer.")] = 10.0,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    bias: Annotated[float, typer.Option(help="0..1: how much the label depends on sex and ethnicity.")] = 0.3,
    bad_rows: Annotated[float, typer.Option(help="0..0.5: extra bad customer rows, as a fraction.")] = 0.0,
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or jsonl.")] = "csv",
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Write deterministic synthetic landing files (all identifiers fictional) for demos and tests."""
    from rich.progress import Progress

    from lakehouse.synth import generate as synth

    try:
        with Progress(console=err, transient=True) as bar:
            task = bar.add_task("generating", total=people)
            res = synth(out, people=people, transactions_per_person=transactions_per_person, seed=seed, bias=bias,
                        bad_rows=bad_rows, fmt=fmt, overwrite=overwrite,  # type: ignore[arg-type]
                        progress=lambda ds, done, total: bar.update(task, completed=done, description=f"generating {ds}"))
    except (ValueError, FileExistsError) as exc:
        raise typer.BadParameter(str(exc).replace("overwrite=True", "--overwrite")) from None
    for name, path in res.files.items():
        console.print(f"[green]wrote[/] {path} ({res.rows[name]:,} rows)")
    if res.bad_rows:
        console.print("bad rows injected: " + ", ".join(f"{k} {v}" for k, v in res.bad_rows.items()))


class _OutFmt(str, Enum):
    table = "table"
    csv = "csv"
    parquet = "parquet"
    json = "json"


@top.command()
def sql(
    ctx: typer.Context,
    query: Annotated[str, typer.Argument(help="One read-only SQL query over governed tables (default layer: silver).")],
    role: Annotated[Optional[str], typer.Option(help="Act in this role only (you must hold it).")] = None,
    engine: Annotated[str, typer.Option(help="embedded (default) or trino.")] = "embedded",
    fmt: Annotated[_OutFmt, typer.Option("--format", help="Output format.")] = _OutFmt.table,
    out: Annotated[Optional[Path], typer.Option(help="Write the result here (required for parquet).")] = None,
    version: Annotated[Optional[int], typer.Option(help="Time travel: read every table as of this version.")] = None,
    as_of: Annotated[Optional[str], typer.Option(help="Time travel: read every table as of this ISO time.")] = None,
    max_rows: Annotated[Optional[int], typer.Option(help="Stop after this many rows.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(
        help="A private role's query: the ε to spend (default and cap: the policy's private_queries.epsilon_per_query).",
    )] = None,
) -> None:
    """Query governed tables with your role's column masks and row filters applied."""
    from lakehouse.sql import run_query
    from lakewarden.commands.sqlout import write_result

    st = state(ctx)
    res = run_query(st.workspace(), st.actor(), query, role=role, engine=engine, version=version,
                    as_of=parse_time(as_of, "--as-of") if as_of else None, max_rows=max_rows,
                    epsilon=epsilon)
    write_result(res, fmt.value, out, console)  # type: ignore[arg-type]
    if res.private is not None:  # a noisy result says so (on stderr when stdout carries csv/json)
        (console if fmt.value == "table" else err).print(f"[yellow]{res.private.describe()}[/]", highlight=False)


@top.command()
def silver(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset to rebuild silver for.")],
    engine: Annotated[str, typer.Option(help="local (this process) or ray (the subject buckets on the Ray cluster at $RAY_ADDRESS).")] = "local",
) -> None:
    """Rebuild silver from bronze: dedupe, impute, standardize, normalize, derive; store the fitted statistics."""
    from lakehouse.silver import build_silver

    st = state(ctx)
    rep = build_silver(st.workspace(), st.actor(), dataset, engine=engine)
    if rep.up_to_date:
        console.print(f"silver.{dataset}@{rep.silver_version} is up to date with bronze@{rep.bronze_version}")
    else:
        console.print(f"[green]built[/] silver.{dataset}@{rep.silver_version} from bronze@{rep.bronze_version}: {rep.rows:,} rows")
    console.print_json(json.dumps(rep.stats, default=str))


