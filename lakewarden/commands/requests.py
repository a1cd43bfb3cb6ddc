"""``lakewarden requests …``: erasure and access requests (compliance officers).

A thin shell over :mod:`governance.erasure`: parse, call, print. The library asks the gate
and loads the layers' handlers (entry points) itself.
"""

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from governance.errors import LakewardenError

console = Console()
if not console.is_terminal:
    console = Console(width=160)

requests_app = typer.Typer(
    help="Erasure and access requests: file, run (resumable), list, status, certificates.", no_args_is_help=True
)


def _ws_actor(ctx: typer.Context) -> tuple[Any, Any]:
    st = ctx.find_root().obj
    return st.workspace(), st.actor()


def _subjects(subject: list[str] | None, subjects_file: Path | None) -> list[str]:
    out = list(subject or [])
    if subjects_file is not None:
        try:
            out += [ln.strip() for ln in subjects_file.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise LakewardenError(f"cannot read {subjects_file}: {exc.strerror}") from None
    return out


def _progress(state: str) -> None:
    console.print(f"  [dim]→[/] {state}")


def _print_status(st: Any) -> None:
    colour = {"done": "green", "overdue": "red", "due soon": "yellow"}.get(st.sla, "white")
    console.print(
        f"{st.request_id} · {st.kind} · {st.regime.upper()} · {st.subjects} subject(s) · state [bold]{st.state}[/] · "
        f"due {st.due_at:%Y-%m-%d} · [{colour}]{st.sla}[/]" + (" · [red]late[/]" if st.late and st.sla == "done" else "")
    )
    d = st.detail
    if st.state == "awaiting_purge":
        console.print(f"  history is kept until {d.get('purge_after', '?')} (policy retention.history); "
                      "run again then, or pass --purge-now to vacuum at once (audited)")
    if st.state == "verification_failed":
        console.print(f"  [red]verification found the subject[/]: {', '.join(d.get('findings', [])[:5]) or d.get('residual')}")
    if d.get("models_flagged"):
        console.print(f"  models trained on the subject's data: {', '.join(d['models_flagged'])} "
                      f"({', '.join(sorted(set(d.get('model_actions', {}).values())))})")
    if st.kind == "access" and d.get("files"):
        console.print(f"  exported {d.get('items', 0)} item(s) to {d.get('out_dir')}: {', '.join(d['files'])}")
    if st.state == "done" and st.kind == "erase":
        v = d.get("verification", {})
        console.print(f"  verified: {v.get('files_scanned', 0):,} files, {v.get('bytes_scanned', 0):,} bytes, "
                      f"{v.get('delta_versions', 0):,} Delta versions scanned, 0 findings; certificate "
                      f"{d.get('certificate_sha256', '')[:16]}…")


@requests_app.command("erase")
def erase(
    ctx: typer.Context,
    subject: Annotated[Optional[list[str]], typer.Option("--subject", help="Subject id as ingested (repeatable).")] = None,
    subjects_file: Annotated[Optional[Path], typer.Option(help="A file with one subject id per line (batch).")] = None,
    regime: Annotated[Optional[str], typer.Option(help="gdpr or ccpa (default: requests.regime in lakewarden.yaml).")] = None,
    run: Annotated[bool, typer.Option("--run/--file-only", help="Run the request right after filing it.")] = True,
    purge_now: Annotated[bool, typer.Option("--purge-now", help="Vacuum Delta history at once instead of waiting for the policy's window (audited).")] = False,
) -> None:
    """File an erasure request (and run it): rows, online features, logs, keys, history; then verify."""
    from governance.erasure import file_request, run_request

    ws, actor = _ws_actor(ctx)
    st = file_request(ws, actor, "erase", _subjects(subject, subjects_file), regime=regime)
    console.print(f"[green]filed[/] {st.request_id} ({st.subjects} subject(s), due {st.due_at:%Y-%m-%d})")
    if run:
        st = run_request(ws, actor, st.request_id, purge_now=purge_now, progress=_progress)
    _print_status(st)


@requests_app.command("access")
def access(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Folder for the export (JSON and CSV).")],
    subject: Annotated[Optional[list[str]], typer.Option("--subject", help="Subject id as ingested (repeatable).")] = None,
    subjects_file: Annotated[Optional[Path], typer.Option(help="A file with one subject id per line.")] = None,
    regime: Annotated[Optional[str], typer.Option(help="gdpr or ccpa (default: requests.regime in lakewarden.yaml).")] = None,
) -> None:
    """Export everything held on a subject, decrypted, with where it lives and what used it."""
    from governance.erasure import file_request, run_request

    ws, actor = _ws_actor(ctx)
    st = file_request(ws, actor, "access", _subjects(subject, subjects_file), regime=regime, out_dir=out)
    console.print(f"[green]filed[/] {st.request_id}")
    _print_status(run_request(ws, actor, st.request_id, progress=_progress))


@requests_app.command("run")
def run_cmd(
    ctx: typer.Context,
    request_id: Annotated[Optional[str], typer.Argument(help="A request id (default: every open request).")] = None,
    purge_now: Annotated[bool, typer.Option("--purge-now", help="Vacuum Delta history at once (audited).")] = False,
) -> None:
    """Resume requests: each continues from its last recorded step."""
    from governance.erasure import run_pending, run_request

    ws, actor = _ws_actor(ctx)
    done = ([run_request(ws, actor, request_id, purge_now=purge_now, progress=_progress)] if request_id
            else run_pending(ws, actor, purge_now=purge_now, progress=_progress))
    if not done:
        console.print("no open requests")
    for st in done:
        _print_status(st)


@requests_app.command("list")
def list_cmd(ctx: typer.Context) -> None:
    """Every request with its deadline and SLA status."""
    from governance.erasure import list_requests

    ws, actor = _ws_actor(ctx)
    rows = list_requests(ws, actor)
    t = Table(title="compliance requests")
    for c in ("request", "kind", "regime", "subjects", "filed", "due", "state", "SLA", "completed"):
        t.add_column(c)
    for st in rows:
        colour = {"done": "green", "overdue": "red", "due soon": "yellow"}.get(st.sla, "white")
        t.add_row(st.request_id, st.kind, st.regime.upper(), str(st.subjects), f"{st.filed_at:%Y-%m-%d %H:%M}",
                  f"{st.due_at:%Y-%m-%d}", st.state, f"[{colour}]{st.sla}[/]" + (" (late)" if st.late else ""),
                  f"{st.completed_at:%Y-%m-%d %H:%M}" if st.completed_at else "")
    console.print(t)


@requests_app.command("status")
def status_cmd(ctx: typer.Context, request_id: Annotated[str, typer.Argument(help="The request id (req_...).")]) -> None:
    """One request: state, deadline, what was done and verified."""
    from governance.erasure import request_status

    ws, actor = _ws_actor(ctx)
    _print_status(request_status(ws, actor, request_id))


@requests_app.command("certificate")
def certificate_cmd(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The request id (req_...).")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the certificate (JSON + signature) here.")] = None,
) -> None:
    """Verify a request's signed erasure certificate (Ed25519, the audit signing key)."""
    import json

    from governance.erasure import verify_certificate

    ws, actor = _ws_actor(ctx)
    cert = verify_certificate(ws, actor, request_id)
    d = cert.data
    if out is not None:
        out.write_text(json.dumps({"certificate": d, "signature": cert.signature, "key_id": cert.key_id}, indent=2) + "\n")
    v = d.get("verified", {})
    console.print(f"[green]valid[/] certificate for {request_id} · key {cert.key_id} · sha256 {cert.digest[:16]}… · "
                  f"{d['subjects']} subject(s) · {sum(d['done']['rows_deleted'].values())} row(s) deleted · "
                  f"{v.get('files_scanned', 0):,} files / {v.get('bytes_scanned', 0):,} bytes scanned, 0 findings")

