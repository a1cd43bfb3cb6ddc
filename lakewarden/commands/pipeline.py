"""``lakewarden pipeline …``: the reference pipeline's stages (run by ``dvc repro``), its summary,
its lineage trace and the checkout of pinned table versions."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from lakewarden.commands import console, err, state

pipeline_app = typer.Typer(help="The reference pipeline (dvc.yaml): stages, summary, trace, checkout.",
                           no_args_is_help=True)


@pipeline_app.command("stage")
def pipeline_stage(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="sources, ingest, silver, features, train, evaluate, register or deploy")],
    params: Annotated[Path, typer.Option(help="The pipeline's params file.")] = Path("params.yaml"),
) -> None:
    """Run one stage of the reference pipeline (dvc.yaml calls this); the gate decides first."""
    import warnings

    from lakewarden.pipeline import run_step

    warnings.filterwarnings("ignore")  # library deprecations and Opacus hook notes: not the user's concern
    st = state(ctx)
    with err.status(f"pipeline stage {name}"):
        out = run_step(st.workspace(), st.actor(), name, params)
    console.print(f"[green]{name} done[/]")
    console.print_json(json.dumps(out, default=str))


@pipeline_app.command("render")
def pipeline_render(
    ctx: typer.Context,
    params: Annotated[Path, typer.Option(help="The pipeline's params file (dvc.yaml is written beside it).")] = Path("params.yaml"),
    check: Annotated[bool, typer.Option("--check", help="Only say whether dvc.yaml is current (exit 2 if not).")] = False,
) -> None:
    """Write dvc.yaml from params.yaml and the policies: the datasets, their policy keys, the model's dataset."""
    from lakewarden.pipeline.dvcyaml import render, stale
    from lakewarden.pipeline import PipelineError, load_params

    ws = state(ctx).workspace()
    p = load_params(params, ws)
    if check:
        diff = stale(ws, p)
        if diff:
            raise PipelineError(f"dvc.yaml is stale (stage {', '.join(diff)})", hint="run `lakewarden pipeline render`")
        console.print("dvc.yaml is current")
        return
    path, written = render(ws, p)
    console.print(f"[green]wrote {path.name}[/] for datasets {', '.join(p.datasets)}" if written
                  else f"{path.name} is current (datasets {', '.join(p.datasets)})")


@pipeline_app.command("summary")
def pipeline_summary(ctx: typer.Context) -> None:
    """What the last dvc repro produced, and the audit chain verified."""
    from lakewarden.pipeline import summary

    st = state(ctx)
    s = summary(st.workspace(), st.actor())
    t = Table(title="reference pipeline", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for ds, n in s["rows"].items():
        t.add_row(f"rows {ds}", f"{n:,} accepted, {s['quarantined'][ds]:,} quarantined" if n is not None else "—")
    b = s["budget"]
    t.add_row("ε this run", f"{s['epsilon_run']:.3f}" if s["epsilon_run"] is not None else "—")
    if b is not None:
        t.add_row(f"ε budget ({s['budget_dataset']})",
                  f"{b['epsilon_spent']:.2f} spent of {b['epsilon_total']:g} over {b['runs']} run(s)")
    t.add_row("utility (holdout)", ", ".join(f"{k} {v:.3f}" for k, v in (s["utility"] or {}).items()) or "—")
    f = s["fairness"] or {}
    verdict = "—" if not f else ("passed" if f.get("passed") else "failed: " + "; ".join(f.get("failures", [])))
    if f.get("pass_rate") is not None:
        from training.fairness import pass_rate_note

        verdict += f" ({pass_rate_note(f['pass_rate'])})"
    t.add_row("fairness", verdict)
    fl = f.get("favourable_label")
    if fl:  # what "selected" means in the metrics: the policy's declared favourable outcome
        t.add_row("  favourable outcome", f"{fl['column']} = {json.dumps(fl['favourable'])}")
    for k in sorted(k for k in f if "." in k):
        t.add_row(f"  {k}", _metric(f[k]))
    t.add_row("registered", s["registered"] or "—")
    t.add_row("deployed", s["deploy_status"])
    t.add_row("audit verify", ("[green]OK[/]" if s["audit_ok"] else "[red]FAILED[/]") + f" ({s['audit_events']:,} events)")
    console.print(t)
    if not s["audit_ok"]:
        raise typer.Exit(4)


def _metric(v: object) -> str:
    """A fairness figure as the summary shows it: a rate to 3 places, a count, group sizes, or why not."""
    if v is None:
        return "not measured"
    if isinstance(v, dict):  # group sizes (with fairness.min_group_size): {metric: {group: rows}}
        sep = "; " if any(isinstance(n, dict) for n in v.values()) else ", "
        return sep.join(f"{k}: {_metric(n)}" if isinstance(n, dict) else f"{k} {_metric(n)}" for k, n in v.items())
    if isinstance(v, bool) or isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


@pipeline_app.command("trace")
def pipeline_trace(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Tie each DVC stage's dvc.lock hash to its lineage run, git commit and pinned versions."""
    from lakewarden.pipeline import trace

    rows = trace(state(ctx).workspace())
    if as_json:
        console.print_json(json.dumps(rows))
        return
    t = Table(title="dvc.lock ↔ lineage")
    for c in ("stage", "dvc.lock md5", "matches", "lineage run", "git commit", "pinned versions"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["stage"], (r["lock_md5"] or "")[:12], "yes" if r["matches"] else "[red]no[/]", (r["run_id"] or "—")[:13],
                  (r["git_commit"] or "—")[:10], ", ".join(f"{k}@{v}" for k, v in r["pinned"].items()) or "—")
    console.print(t)


@pipeline_app.command("checkout")
def pipeline_checkout(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for the restored tables.")],
    manifest: Annotated[Path, typer.Option(help="A stage manifest that pins table versions.")] = Path("pipeline/silver.json"),
    fmt: Annotated[str, typer.Option("--format", help="parquet or csv")] = "parquet",
) -> None:
    """Read the tables a manifest pins (e.g. after git checkout + dvc checkout), minus erased subjects."""
    from lakewarden.pipeline import PipelineError, checkout

    if fmt not in ("parquet", "csv"):
        raise PipelineError(f"--format must be parquet or csv, not {fmt!r}")
    st = state(ctx)
    done = checkout(st.workspace(), st.actor(), out, manifest=manifest, fmt=fmt)  # type: ignore[arg-type]
    t = Table(title=f"restored from {manifest}")
    for c in ("table", "version", "rows", "erased rows dropped", "file"):
        t.add_column(c)
    for name, d in done.items():
        t.add_row(name, str(d["version"]), f"{d['rows']:,}", str(d["erased_rows_dropped"]), d["file"])
    console.print(t)
