"""The ``lakewarden`` command line: a thin shell over the library.

Each command parses its arguments, calls one library function and prints the
result. Errors a user can cause (LakewardenError) print one line, with a hint
where there is one, and exit non-zero: 2 for bad input or configuration, 3 for
a policy denial, 4 for a failed audit verification, 1 otherwise.
"""

# No `from __future__ import annotations` in the CLI modules: typer resolves every command's
# annotations when it builds the command tree, and evaluating them as strings (~1,000 evals)
# cost each start about 0.04 s.

import csv
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from governance.errors import LakewardenError
from governance.stages import Stage

if TYPE_CHECKING:
    from governance.gate import Actor, Decision

# What a command needs beyond typer and rich is imported inside it: `lakewarden --help` and
# `models list` must not pay for torch, Feast, KServe, pyarrow's datasets or even the policy
# model (pydantic) at start. tests/test_cli_start.py keeps it so.

console = Console()
if not console.is_terminal:  # pipes and CI logs: wide enough for tables to stay readable
    console = Console(width=160)
err = Console(stderr=True)

app = typer.Typer(
    name="lakewarden",
    help="Governance-first lakehouse: policy-gated ingest, features, private training, serving, compliance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
policy_app = typer.Typer(help="Validate and show policies.", no_args_is_help=True)
gate_app = typer.Typer(help="Ask the policy gate for a decision.", no_args_is_help=True)
audit_app = typer.Typer(help="Verify and query the tamper-evident audit log.", no_args_is_help=True)
keys_app = typer.Typer(help="Key-encryption keys, the key store, rotation.", no_args_is_help=True)
lineage_app = typer.Typer(help="OpenLineage run events: upstream and downstream.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
app.add_typer(gate_app, name="gate")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.add_typer(lineage_app, name="lineage")
trino_app = typer.Typer(help="A local Trino server over the governed tables: up, down, status, sync.", no_args_is_help=True)
app.add_typer(trino_app, name="trino")
features_app = typer.Typer(help="Feast over the governed tables: apply, materialize, training-set, online, erase.", no_args_is_help=True)
app.add_typer(features_app, name="features")
privacy_app = typer.Typer(help="Differential-privacy budgets per dataset (the privacy ledger).", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")
models_app = typer.Typer(help="The model registry: list, show, approve.", no_args_is_help=True)
app.add_typer(models_app, name="models")
tables_app = typer.Typer(help="Governed Delta tables: list, describe, history, optimize, vacuum, enforce-retention.", no_args_is_help=True)
app.add_typer(tables_app, name="tables")
deployments_app = typer.Typer(help="Local predictors this workspace started: list, stop.", no_args_is_help=True)
app.add_typer(deployments_app, name="deployments")
from lakewarden.cli_requests import requests_app  # noqa: E402 - a sub-app in its own module

app.add_typer(requests_app, name="requests")


@dataclass
class _State:
    config: Optional[Path]
    user: Optional[str]
    _ws: Any = None

    def workspace(self):  # noqa: ANN201 - lazily imported to keep `--help` fast
        if self._ws is None:
            from governance.workspace import Workspace

            self._ws = Workspace.open(self.config)
        return self._ws

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()

    def actor(self) -> "Actor":
        return self.workspace().actor(self.user)


def _state(ctx: typer.Context) -> _State:
    return ctx.find_root().obj


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="lakewarden.yaml to use.", envvar="LAKEWARDEN_CONFIG")] = None,
    user: Annotated[Optional[str], typer.Option("--as", help="Act as this user (roles come from policy).", envvar="LAKEWARDEN_USER")] = None,
) -> None:
    ctx.obj = _State(config, user)
    ctx.call_on_close(ctx.obj.close)


# -- init / check -------------------------------------------------------------------------
@app.command()
def init(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
) -> None:
    """Create lakewarden.yaml, the KEK (file provider), the key store and the audit log, where missing."""
    from governance.setup import init_workspace

    st = _state(ctx)
    import getpass
    import os

    res = init_workspace(directory, actor=st.user or os.environ.get("LAKEWARDEN_USER") or getpass.getuser())
    for p in res.created:
        console.print(f"[green]created[/] {p}")
    for p in res.kept:
        console.print(f"[dim]kept[/]    {p}")
    console.print(f"KEK {res.key_id} · audit signing key {res.audit_key_id} · workspace {res.workspace_id}")
    if res.policy_templates:
        console.print("The project had no policy: the files above are a template to start from. Edit the dataset "
                      "policy for your data, or draft one from a sample of your file with "
                      "`lakewarden policy suggest FILE`; then run `lakewarden policy check`.", highlight=False)


@policy_app.command("check")
def policy_check(
    ctx: typer.Context,
    json_out: Annotated[Optional[Path], typer.Option(help="Also write a JSON summary here (a DVC metric).")] = None,
) -> None:
    """Validate lakewarden.yaml and every policy file; summarise what they govern."""
    ws = _state(ctx).workspace()
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
    ds = _state(ctx).workspace().policies.dataset(dataset)
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


# -- gate ---------------------------------------------------------------------------------
def _print_decision(d: "Decision") -> None:
    colour = "green" if d.allowed else "red"
    console.print(f"[{colour}]{'ALLOW' if d.allowed else 'DENY'}[/] {d.stage.value} by {d.actor.name} "
                  f"({', '.join(d.actor.roles) or 'no role'}) on {d.resource}")
    console.print(f"  rules:   {', '.join(d.rule_ids)}")
    console.print(f"  reasons: {'; '.join(d.reasons)}")
    for k, v in d.obligations.items():
        if v:
            console.print(f"  {k}: {v}")


@gate_app.command("check")
def gate_check(
    ctx: typer.Context,
    stage: Annotated[Stage, typer.Argument(help="Stage to decide on.")],
    dataset: Annotated[Optional[str], typer.Option(help="Dataset the stage uses.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Table layer (bronze, silver, ...).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model name (for register/approve/deploy).")] = None,
    purpose: Annotated[Optional[str], typer.Option(help="Purpose of the use.")] = None,
    columns: Annotated[Optional[str], typer.Option(help="Comma-separated columns.")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Target epsilon (train).")] = None,
    epsilon_spent: Annotated[Optional[float], typer.Option(help="Epsilon already spent on the dataset.")] = None,
) -> None:
    """Decide whether the acting user may run STAGE; exit 3 on a deny. The decision is audited."""
    from governance.gate import Resource

    st = _state(ctx)
    ws = st.workspace()
    if model:
        res = Resource.model(model)
    elif dataset and layer:
        res = Resource.table(dataset, layer)
    elif dataset:
        res = Resource.dataset(dataset)
    else:
        raise typer.BadParameter("name a --dataset or a --model")
    context: dict[str, Any] = {}
    if purpose:
        context["purpose"] = purpose
    if columns:
        context["columns"] = [c.strip() for c in columns.split(",") if c.strip()]
    if epsilon is not None:
        context["epsilon"] = epsilon
    if epsilon_spent is not None:
        context["epsilon_spent"] = epsilon_spent
    if model and dataset:
        context["dataset"] = dataset
    d = ws.gate.enforce(stage, st.actor(), res, context)
    _print_decision(d)


# -- audit --------------------------------------------------------------------------------
@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Recompute the hash chain and check every signed checkpoint; exit 4 and name the first bad event."""
    from governance.audit_ops import verify_audit

    st = _state(ctx)
    rep = verify_audit(st.workspace(), st.actor())
    if as_json:
        console.print_json(json.dumps(rep.to_dict()))
    elif rep.ok:
        console.print(
            f"[green]audit OK[/]: {rep.events} events, {rep.checkpoints} signed checkpoints, "
            f"head at seq={rep.head_seq}, verified in {rep.seconds:.2f}s"
        )
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

    st = _state(ctx)
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


def _parse_time(v: Optional[str], name: str) -> Optional[datetime]:
    if v is None:
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise typer.BadParameter(f"{v!r} is not an ISO date or time (e.g. 2026-11-29 or 2026-11-29T10:00)", param_hint=name) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


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

    st = _state(ctx)
    tbl = query_audit(
        st.workspace(), st.actor(),
        actor=actor, action=action, resource=resource, subject_token=subject, outcome=outcome,
        since=_parse_time(since, "--since"), until=_parse_time(until, "--until"), limit=limit,
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


# -- keys ---------------------------------------------------------------------------------
@keys_app.command("new-kek")
def keys_new_kek(
    out: Annotated[Optional[Path], typer.Option(help="Write the key to this file (mode 0600) instead of printing it.")] = None,
) -> None:
    """Generate a new key-encryption key (for an env var, a file, or rotation)."""
    from governance.keys import generate_kek_b64, generate_kek_file

    if out is None:
        sys.stdout.write(generate_kek_b64() + "\n")
    else:
        kid = generate_kek_file(out)
        console.print(f"[green]wrote[/] {out} ({kid})")


@keys_app.command("status")
def keys_status(ctx: typer.Context) -> None:
    """Key store statistics: subjects, shredded subjects, the KEK in use."""
    from governance.gate import Resource

    st = _state(ctx)
    ws = st.workspace()
    ws.gate.enforce(Stage.KEYS, st.actor(), Resource.system("keys"))
    for k, v in ws.keyring.store.stats().items():
        console.print(f"{k}: {v}")


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    new_kek_file: Annotated[Optional[Path], typer.Option(help="File holding the new KEK.")] = None,
    new_kek_env: Annotated[Optional[str], typer.Option(help="Environment variable holding the new KEK.")] = None,
) -> None:
    """Rewrap every data key with a new KEK (data is not touched); then point keys.kek at it."""
    from governance.gate import Resource
    from governance.keys import kek_from_env, kek_from_file

    if (new_kek_file is None) == (new_kek_env is None):
        raise typer.BadParameter("give exactly one of --new-kek-file or --new-kek-env")
    st = _state(ctx)
    ws = st.workspace()
    ws.gate.enforce(Stage.KEYS, st.actor(), Resource.system("keys"))
    new = kek_from_file(new_kek_file) if new_kek_file else kek_from_env(new_kek_env)  # type: ignore[arg-type]
    old_id = ws.keyring.store.kek_id
    n = ws.keyring.rotate_kek(new)
    ws.audit.record("keys.rotate", actor=st.actor().name, outcome="ok", resource="system:keys",
                    details={"rewrapped": n, "from": old_id, "to": new.key_id})
    console.print(f"[green]rotated[/] {n} keys from {old_id} to {new.key_id}")
    where = f"provider: file, path: {new_kek_file}" if new_kek_file else f"provider: env, var: {new_kek_env}"
    console.print(f"[yellow]now set keys.kek in lakewarden.yaml to {{{where}}}[/] and destroy the old KEK.")


# -- lineage ------------------------------------------------------------------------------
class _Dir(str, Enum):
    up = "up"
    down = "down"
    both = "both"


@lineage_app.command("show")
def lineage_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Dataset or model name, e.g. silver.customers or model:credit.")],
    direction: Annotated[_Dir, typer.Option(help="Upstream, downstream or both.")] = _Dir.both,
    depth: Annotated[Optional[int], typer.Option(help="How many hops.")] = None,
) -> None:
    """Print what NAME was made from (upstream) and what was made from it (downstream)."""
    from governance.gate import Resource

    from governance.lineage import render_tree

    st = _state(ctx)
    ws = st.workspace()
    ws.gate.enforce(Stage.LINEAGE, st.actor(), Resource.system("lineage"))
    shown = False
    for d in ("up", "down"):
        if direction.value in (d, "both"):
            g = ws.lineage.upstream(name, depth=depth) if d == "up" else ws.lineage.downstream(name, depth=depth)
            if len(g.nodes) > 1:
                shown = True
            console.print(render_tree(g, name, "upstream" if d == "up" else "downstream"))
    if not shown:
        console.print(f"[yellow]no lineage recorded for {name}[/]")


# -- lakehouse ----------------------------------------------------------------------------
def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} PB"


@app.command()
def ingest(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset name (a policy must govern it).")],
    paths: Annotated[list[str], typer.Argument(help="Files or globs: .csv, .parquet, .jsonl.")],
    batch_rows: Annotated[Optional[int], typer.Option(help="Rows per batch (bounds memory; default depends on the dataset).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate, protect and write landing files into bronze (bad rows to quarantine, with reasons)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from lakehouse.ingest import ingest as run_ingest

    st = _state(ctx)
    ws = st.workspace()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:,} rows"),
                  TimeElapsedColumn(), console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task(f"ingest {dataset}", total=None)
        rep = run_ingest(ws, st.actor(), dataset, paths, batch_rows=batch_rows,
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


@app.command()
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


@app.command()
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
) -> None:
    """Query governed tables with your role's column masks and row filters applied."""
    from lakehouse.sql import SqlError, run_query, write_result

    if engine not in ("embedded", "trino"):
        raise SqlError(f"unknown engine {engine!r}: use embedded or trino")
    st = _state(ctx)
    ws = st.workspace()
    actor = st.actor()
    if engine == "trino":
        from lakehouse.sql import QueryResult
        from lakehouse.trino import run_query as run_trino

        if version is not None or as_of is not None:
            raise SqlError("time travel (--version/--as-of) is available on the embedded engine")
        tbl = run_trino(ws, actor, query, role=role, max_rows=max_rows)
        write_result(QueryResult(tbl, (), {}, {}), fmt.value, out, console)  # type: ignore[arg-type]
        return
    if role is not None:
        if role not in actor.roles:
            from governance.errors import AccessDenied
            from governance.gate import Decision, Resource

            d = Decision(False, (f"{actor.name} does not hold role {role}",), ("builtin/role-not-held",),
                         Stage.QUERY, actor, Resource.system("sql"))
            ws.audit.record("gate.decide", actor=actor.name, outcome="deny", stage="query", resource="system:sql",
                            rule_ids=d.rule_ids, details={"reasons": list(d.reasons), "role": role})
            ws.audit.flush()
            raise AccessDenied(d)
        from governance.gate import Actor

        actor = Actor(actor.name, (role,))
    when = _parse_time(as_of, "--as-of") if as_of else None
    res = run_query(ws, actor, query, version=version, as_of=when, max_rows=max_rows)
    write_result(res, fmt.value, out, console)  # type: ignore[arg-type]


@app.command()
def silver(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset to rebuild silver for.")],
) -> None:
    """Rebuild silver from bronze: dedupe, impute, standardize, normalize, derive; store the fitted statistics."""
    from lakehouse.silver import build_silver

    st = _state(ctx)
    rep = build_silver(st.workspace(), st.actor(), dataset)
    if rep.up_to_date:
        console.print(f"silver.{dataset}@{rep.silver_version} is up to date with bronze@{rep.bronze_version}")
    else:
        console.print(f"[green]built[/] silver.{dataset}@{rep.silver_version} from bronze@{rep.bronze_version}: {rep.rows:,} rows")
    console.print_json(json.dumps(rep.stats, default=str))


def _ref(name: str):  # noqa: ANN202
    from lakehouse.catalog import TableRef

    return TableRef.parse(name)


@tables_app.command("list")
def tables_list(ctx: typer.Context) -> None:
    """Every governed table with its version, rows, files and size."""
    from lakehouse.maintenance import list_tables

    infos = list_tables(_state(ctx).workspace())
    t = Table(title=f"governed tables ({len(infos)})")
    for c in ("table", "version", "rows", "files", "size", "partitioned by", "last change (UTC)"):
        t.add_column(c, justify="right" if c in ("version", "rows", "files", "size") else "left")
    for i in infos:
        t.add_row(str(i.ref), str(i.version), f"{i.rows:,}", str(i.files), _human_bytes(i.bytes), ", ".join(i.partitions),
                  i.modified.strftime("%Y-%m-%d %H:%M:%S") if i.modified else "")
    console.print(t)


@tables_app.command("describe")
def tables_describe(ctx: typer.Context, table: Annotated[str, typer.Argument(help="layer.dataset, e.g. silver.customers")]) -> None:
    """Columns with their policy class and protection, layout and properties."""
    from lakehouse.maintenance import describe

    d = describe(_state(ctx).workspace(), _ref(table))
    console.print(f"[bold]{d['table']}[/] version {d['version']} · {d['rows']:,} rows · {d['files']} files · "
                  f"{_human_bytes(d['bytes'])} · partitioned by {', '.join(d['partition_columns']) or 'nothing'}")
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

    rows = history(_state(ctx).workspace(), _ref(table), limit=limit)
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

    st = _state(ctx)
    out = optimize(st.workspace(), st.actor(), _ref(table))
    console.print(f"[green]optimized[/] {table}: {out['files_removed']} files → {out['files_added']}, now version {out['version']}")


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

    st = _state(ctx)
    out = vacuum(st.workspace(), st.actor(), _ref(table), dry_run=not force, retention_hours=retention_hours,
                 enforce_retention=enforce_retention)
    verb = "would delete" if out["dry_run"] else "deleted"
    console.print(f"{verb} {out['files']} file(s) from {table} (keeping {out['retention_hours']} h of history)")
    for p in out["paths"][:20]:
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

    st = _state(ctx)
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


# -- features ---------------------------------------------------------------------------------
def _features(ctx: typer.Context):  # noqa: ANN202
    import warnings

    warnings.filterwarnings("ignore", module="feast")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from features.store import Features

    st = _state(ctx)
    return st, Features(st.workspace())


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


@features_app.command("apply")
def features_apply(ctx: typer.Context) -> None:
    """Generate entities and feature views from policy and register them with Feast."""
    st, fs = _features(ctx)
    names = fs.apply(st.actor())
    console.print(f"[green]applied[/] {', '.join(names) or 'nothing (no features declared in policy)'}")


@features_app.command("materialize")
def features_materialize(ctx: typer.Context) -> None:
    """Load the latest feature values into the online store (incremental)."""
    st, fs = _features(ctx)
    versions = fs.materialize(st.actor())
    for view, v in versions.items():
        console.print(f"materialized {view} from silver version {v}")


@features_app.command("training-set")
def features_training_set(
    ctx: typer.Context,
    features: Annotated[str, typer.Option(help="Comma-separated view:feature references.")],
    purpose: Annotated[str, typer.Option(help="Why the data is used; the policy must allow it.")],
    label: Annotated[Optional[str], typer.Option(help="Label column from silver.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the training set as Parquet here.")] = None,
) -> None:
    """A point-in-time correct training set for every subject of the dataset (gated by purpose)."""
    import pyarrow.parquet as pq

    st, fs = _features(ctx)
    ts = fs.training_set(st.actor(), purpose=purpose, features=_split(features), label=label)
    if out:
        pq.write_table(ts.table, out)
        console.print(f"[green]wrote[/] {out}: {ts.table.num_rows:,} rows; sources {ts.sources}; lineage run {ts.run_id}")
    else:
        console.print(f"{ts.table.num_rows:,} rows × {ts.table.num_columns} columns from {ts.sources}")


@features_app.command("online")
def features_online(
    ctx: typer.Context,
    features: Annotated[str, typer.Option(help="Comma-separated view:feature references.")],
    purpose: Annotated[str, typer.Option(help="Why the data is used; the policy must allow it.")],
    tokens: Annotated[str, typer.Option(help="Comma-separated subject tokens (sub_...).")],
) -> None:
    """Online feature values for subject tokens."""
    st, fs = _features(ctx)
    tbl = fs.online(st.actor(), purpose=purpose, features=_split(features), tokens=_split(tokens))
    t = Table()
    for c in tbl.column_names:
        t.add_column(c)
    for r in tbl.to_pylist():
        t.add_row(*["" if v is None else str(v) for v in r.values()])
    console.print(t)


@features_app.command("erase")
def features_erase(
    ctx: typer.Context,
    token: Annotated[str, typer.Option(help="The subject's token (sub_...).")],
) -> None:
    """Remove a subject from the online store and every offline source (compliance officers)."""
    from governance.gate import Resource

    from features.store import erase_subject

    st, _ = _features(ctx)
    ws = st.workspace()
    actor = st.actor()
    ws.gate.enforce(Stage.REQUEST, actor, Resource.system("erasure"))
    removed = erase_subject(ws, token)
    from governance.requests import subject_digest

    # The token itself would outlive the erasure in the append-only log: record a keyed digest.
    ws.audit.record("features.erase", actor=actor.name, outcome="ok", resource="system:features",
                    details={"removed": removed, "subject_digest": subject_digest(ws, token)})
    for where, n in removed.items():
        console.print(f"{where}: {n} row(s) removed")


# -- training and models ------------------------------------------------------------------------
@app.command()
def train(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Model name in the registry.")],
    features: Annotated[str, typer.Option(help="Comma-separated view:feature references.")],
    label: Annotated[str, typer.Option(help="Label column of silver, declared with its favourable value under "
                                            "'labels:' in the dataset policy.")],
    purpose: Annotated[str, typer.Option(help="Purpose; the policy must allow it for every feature.")],
    epsilon: Annotated[float, typer.Option(help="Target ε of this run (capped by policy and the budget left).")] = 3.0,
    delta: Annotated[float, typer.Option(help="Target δ.")] = 1e-5,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = 5,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="Expected batch size (Poisson sampling). Default: a tenth of the training rows, at least 32 "
             "and at most 512.")] = None,
    learning_rate: Annotated[float, typer.Option(help="Adam's learning rate.")] = 0.002,
    max_grad_norm: Annotated[float, typer.Option(help="Per-sample gradient clipping norm.")] = 1.0,
    accountant: Annotated[str, typer.Option(help="prv, rdp or gdp.")] = "prv",
    seed: Annotated[int, typer.Option(help="Same seed, same model (CPU).")] = 0,
    processes: Annotated[int, typer.Option(help="Data-parallel processes (torch.distributed, gloo).")] = 1,
    mitigate: Annotated[bool, typer.Option(help="Retrain with reweighing if the fairness gate fails.")] = True,
) -> None:
    """Train a differentially private model on a training set and register it with its model card."""
    from training.flow import train_model
    from training.trainer import TrainOptions

    if not learning_rate > 0:
        raise typer.BadParameter(f"must be greater than 0 (got {learning_rate:g})", param_hint="--learning-rate")
    st = _state(ctx)
    opts = TrainOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, target_epsilon=epsilon,
                        delta=delta, max_grad_norm=max_grad_norm, accountant=accountant, seed=seed)  # type: ignore[arg-type]
    with err.status(f"training {name} (DP-SGD, target ε={epsilon:g})"):
        out = train_model(st.workspace(), st.actor(), name=name, features=_split(features), label=label,
                          purpose=purpose, options=opts, mitigate=mitigate, world_size=processes)
    c = out.card
    console.print(f"[green]registered[/] {out.ref}: ε={c.privacy.epsilon:.3f} (δ={c.privacy.delta:g}, {c.privacy.accountant}), "
                  + ", ".join(f"{k} {v:.3f}" for k, v in c.utility.items()))
    if c.favourable_label is not None:
        console.print(f"label {c.favourable_label.sentence()}", highlight=False, markup=False)
    if c.fairness is not None:
        verdict = "[green]passed[/]" if c.fairness.passed else "[red]failed[/]: " + "; ".join(c.fairness.failures)
        if c.fairness.uncertainty:
            from training.fairness import pass_rate_note

            verdict += f" ({pass_rate_note(c.fairness.uncertainty['pass_rate'])})"
        console.print(f"fairness {verdict}")
    if c.mitigation:
        console.print(f"mitigation: {c.mitigation['method']} (passed before {c.mitigation['passed_before']}, "
                      f"after {c.mitigation['passed_after']})")
    batches = "auto (a tenth of the training rows, 32–512)" if batch_size is None else str(batch_size)
    rate = f", sampling rate {c.privacy.sample_rate:.4g} per step" if c.privacy.sample_rate else ""
    console.print(f"batch size {batches}{rate}, {epochs} epoch(s), learning rate {learning_rate:g}", highlight=False)
    console.print(f"privacy spent by this call: ε={out.epsilon_spent:.3f} over {len(out.runs)} run(s)")


@models_app.command("list")
def models_list(ctx: typer.Context, name: Annotated[Optional[str], typer.Argument()] = None) -> None:
    """Registered model versions with ε, utility, fairness and status."""
    from training.registry import Registry

    cards = Registry(_state(ctx).workspace()).list(name)
    t = Table(title=f"models ({len(cards)})")
    for c in ("model", "dataset", "purpose", "ε", "AUC", "fairness", "status", "created"):
        t.add_column(c)
    for c in cards:
        fair = "—" if c.fairness is None else ("passed" if c.fairness.passed else "failed")
        t.add_row(f"{c.name}@{c.version}", c.dataset, c.purpose, f"{c.privacy.epsilon:.2f}",
                  f"{c.utility.get('auc', float('nan')):.3f}", fair, c.status, c.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(t)


@models_app.command("show")
def models_show(ctx: typer.Context, model: Annotated[str, typer.Argument(help="name or name@version")]) -> None:
    """The model card (Markdown)."""
    from rich.markdown import Markdown

    from training.registry import Registry

    console.print(Markdown(Registry(_state(ctx).workspace()).card(model).to_markdown()))


@models_app.command("approve")
def models_approve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="name@version")],
    override_reason: Annotated[Optional[str], typer.Option(help="Approve despite a failed fairness verdict, and say why.")] = None,
) -> None:
    """Record a compliance approval (the deploy gate requires one)."""
    from training.registry import Registry

    st = _state(ctx)
    card = Registry(st.workspace()).approve(st.actor(), model, override_reason=override_reason)
    console.print(f"[green]approved[/] {card.name}@{card.version} by {st.actor().name}")


# -- serving ----------------------------------------------------------------------------------
@app.command()
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="name@version of a registered model.")],
    port: Annotated[int, typer.Option(help="HTTP port (loopback).")] = 8080,
) -> None:
    """Serve a model with KServe's ModelServer (V1 and Open Inference Protocol), in the foreground."""
    import warnings

    warnings.filterwarnings("ignore")
    from serving.model import serve as run_server

    st = _state(ctx)
    run_server(st.workspace(), model, st.actor(), port=port)


@app.command()
def deploy(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="name@version")],
    target: Annotated[str, typer.Option(help="local (start the server) or k8s (render an InferenceService).")] = "local",
    port: Annotated[int, typer.Option(help="Port for the local server.")] = 8080,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the k8s manifest.")] = None,
) -> None:
    """Deploy a registered model if the deploy gate allows it (ε, fairness, approvals)."""
    from serving.deploy import deploy as run_deploy

    if target not in ("local", "k8s"):
        raise typer.BadParameter("target must be local or k8s", param_hint="--target")
    st = _state(ctx)
    res = run_deploy(st.workspace(), st.actor(), model, target=target, port=port, out_dir=out)  # type: ignore[arg-type]
    where = res.get("url") or res.get("manifest")
    console.print(f"[green]deployed[/] {res['model']} → {target}: {where}")


@deployments_app.command("list")
def deployments_list(ctx: typer.Context) -> None:
    """Local predictors this workspace started (deploy --target local): model, port, process, alive, since."""
    from serving.deploy import list_deployments

    found = list_deployments(_state(ctx).workspace())
    t = Table(title=f"local deployments ({len(found)})")
    for c in ("model", "port", "pid", "alive", "since (UTC)", "url"):
        t.add_column(c, justify="right" if c in ("port", "pid") else "left")
    style = {"running": "green", "stopped": "dim", "replaced": "yellow"}
    for st in found:
        d = st.deployment
        alive = Text("yes" if st.alive else f"no ({st.state}: {st.detail})", style=style[st.state])
        t.add_row(d.model, str(d.port), str(d.pid), alive, d.started_at.replace("T", " ").removesuffix("+00:00"), d.url)
    console.print(t)


@deployments_app.command("stop")
def deployments_stop(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="name or name@version", show_default=False)] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Stop every local predictor of this workspace.")] = False,
) -> None:
    """Stop this workspace's local predictors of MODEL (or --all); each is checked to be ours first."""
    from serving.deploy import stop_deployments

    st = _state(ctx)
    for s_ in stop_deployments(st.workspace(), st.actor(), model, all_models=all_models):
        d = s_.deployment
        if s_.alive:
            console.print(f"[green]stopped[/] {d.model} on port {d.port} (process {d.pid})")
        else:
            console.print(f"[dim]forgot[/] {d.model} on port {d.port}: {s_.state} ({s_.detail}); nothing signalled")


@app.command()
def monitor(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="name or name@version of the served model.")],
    since: Annotated[Optional[str], typer.Option(help="Only requests at or after this ISO time.")] = None,
    webhook: Annotated[Optional[str], typer.Option(help="POST the drift report here (alerts included).")] = None,
    min_records: Annotated[int, typer.Option(help="Fewer records than this: no verdict for a feature.")] = 100,
) -> None:
    """Drift (PSI) of recent requests against the training reference; alerts go to the audit log."""
    from serving.monitor import Profile
    from serving.monitor import monitor as run_monitor
    from training.registry import Registry

    st = _state(ctx)
    ws = st.workspace()
    reg = Registry(ws)
    card = reg.card(model)
    ref_file = reg.path(card.ref) / "reference.json"
    if not ref_file.exists():
        raise typer.BadParameter(f"{card.ref} has no drift reference (trained before references were stored)")
    rep = run_monitor(ws, st.actor(), model=card.name, profile=Profile.from_json(ref_file.read_text()),
                      since=_parse_time(since, "--since"), webhook=webhook, min_records=min_records)
    d = rep.to_dict()
    t = Table(title=f"drift of {card.name} against its training reference ({d.get('records', 0)} records)")
    for c in ("feature", "PSI", "status", "records"):
        t.add_column(c)
    style = {"ok": "green", "warn": "yellow", "alert": "red", "no_data": "dim"}
    rows = [(name, f) for name, f in rep.features.items()] + [("score", rep.score)]
    for name, f in rows:
        t.add_row(name, "" if f.psi is None else f"{f.psi:.3f}", Text(f.status, style=style.get(f.status, "")), str(f.count))
    console.print(t)


# -- privacy ----------------------------------------------------------------------------------
@privacy_app.command("status")
def privacy_status(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Argument(help="Dataset (default: every dataset with a budget).")] = None,
) -> None:
    """ε spent, reserved and left per dataset, composed over every private run."""
    from governance.ledger import PrivacyLedger

    ws = _state(ctx).workspace()
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


# -- trino ----------------------------------------------------------------------------------
@trino_app.command("up")
def trino_up(ctx: typer.Context) -> None:
    """Install if needed, render the configuration, start Trino, wait until ready, register the tables."""
    from governance.gate import Resource

    from lakehouse.trino import TrinoServer, default_home, install

    st = _state(ctx)
    ws = st.workspace()
    actor = st.actor()
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("trino"))
    home = default_home()
    if not (home / "bin" / "launcher").exists():
        with err.status("installing Trino from Maven Central"):
            home = install()
    srv = TrinoServer(ws, home=home)
    with err.status(f"starting Trino at {srv.url}"):
        secs = srv.start()
    console.print(f"[green]Trino is up[/] at {srv.url} ({secs:.1f}s)")
    rep = srv.sync(actor)
    console.print(f"registered {len(rep.registered)} table(s), {len(rep.present)} already there; {rep.rules} table rules")


@trino_app.command("down")
def trino_down(ctx: typer.Context) -> None:
    """Stop the local Trino server."""
    from governance.gate import Resource

    from lakehouse.trino import TrinoServer

    st = _state(ctx)
    ws = st.workspace()
    ws.gate.enforce(Stage.MAINTAIN, st.actor(), Resource.system("trino"))
    TrinoServer(ws).stop()
    console.print("Trino is down")


@trino_app.command("status")
def trino_status(ctx: typer.Context) -> None:
    """Is the server up, which version, where."""
    from lakehouse.trino import TrinoServer

    s = TrinoServer(_state(ctx).workspace()).status()
    state = "[green]running[/]" if s["running"] else "[yellow]not running[/]"
    console.print(f"Trino at {s['url']}: {state}" + (f" (version {s['version']}, up {s['uptime']})" if s["running"] else ""))
    console.print(f"home {s['home']} · config {s['etc']} · workspace {s['workspace']}")
    if not s["running"]:
        raise typer.Exit(1)


@trino_app.command("sync")
def trino_sync(ctx: typer.Context) -> None:
    """Register new tables and re-render access rules from policy (after ingest, erasure, policy changes)."""
    from lakehouse.trino import TrinoServer

    st = _state(ctx)
    srv = TrinoServer(st.workspace())
    if not srv.running():
        from lakehouse.trino import TrinoError

        raise TrinoError(f"Trino is not running at {srv.url}", hint="start it with `lakewarden trino up`")
    rep = srv.sync(st.actor())
    console.print(f"registered {', '.join(rep.registered) or 'nothing new'}; {rep.rules} table rules; {rep.seconds:.1f}s")


@trino_app.command("render")
def trino_render(
    ctx: typer.Context,
    profile: Annotated[str, typer.Option(help="production (HTTPS + password) or cluster (coordinator + workers, S3, HMS).")],
    out: Annotated[Path, typer.Option(help="Folder to write the configuration into.")],
) -> None:
    """Render Trino configuration for production or a cluster, with rules compiled from policy."""
    from lakehouse.trino import render_profile

    files = render_profile(_state(ctx).workspace(), profile)
    for rel, text in files.items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    console.print(f"[green]wrote[/] {len(files)} files to {out}")


# -- command groups in their own modules (they import this one's helpers) ----------------------
from lakewarden.cli_pipeline import pipeline_app  # noqa: E402

app.add_typer(pipeline_app, name="pipeline")


# -- entry point --------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors print one line and exit non-zero, never a traceback."""
    try:
        app(args=argv, prog_name="lakewarden")
    except LakewardenError as exc:
        err.print(Text.assemble(("error: ", "bold red"), exc.message), highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(Text("hint: " + exc.hint, style="dim"), highlight=False)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:  # a bug, not a user error: one line here, the traceback in a file
        from lakewarden.process import crash_dir, crash_line, save_crash

        args = list(sys.argv[1:] if argv is None else argv)
        path = save_crash(exc, crash_dir(_workspace_dir(args)), command="lakewarden " + " ".join(args))
        err.print(Text.assemble(("error: ", "bold red"), crash_line(exc, path)), highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


def _workspace_dir(args: list[str]) -> Optional[Path]:
    """The workspace folder of the configuration these arguments name (or the one found), if it loads."""
    from governance.config import load_config

    config = None
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            config = args[i + 1]
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
    try:
        return load_config(config).workspace_dir
    except Exception:  # noqa: BLE001 - no configuration to be had: the caller falls back to a temp folder
        return None


def run() -> None:
    """The installed ``lakewarden`` command: ``main``, then a clean process exit (lakewarden.process).

    Libraries' deprecation notes are not shown to the user (``quiet_library_warnings``); the
    project's own warnings are.
    """
    from lakewarden.process import quiet_library_warnings, run_and_exit

    quiet_library_warnings()
    run_and_exit(main)
