"""``lakewarden serve | deploy | monitor`` and ``lakewarden deployments …``: models in service."""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from lakewarden.commands import console, parse_time, state

top = typer.Typer()
deployments_app = typer.Typer(help="Local predictors this workspace started: list, stop.", no_args_is_help=True)


@top.command()
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="name@version of a registered model.")],
    port: Annotated[int, typer.Option(help="HTTP(S) port.")] = 8080,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate chain: instead of serving.tls_cert "
                                                          "(a mounted Kubernetes TLS Secret's tls.crt).")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Its private key (mode 0600 or group-only): instead of "
                                                         "serving.tls_key.")] = None,
) -> None:
    """Serve a model with KServe's ModelServer (V1 and Open Inference Protocol), in the foreground.

    HTTPS when a certificate is configured (serving.tls_cert/tls_key, or --tls-cert/--tls-key); with auth on, required."""
    import warnings

    st = state(ctx)
    actor = st.service_actor()  # before the heavy imports: a refused --as fails fast
    warnings.filterwarnings("ignore")
    from serving.model import serve as run_server

    run_server(st.workspace(), model, actor, port=port, tls_cert=tls_cert, tls_key=tls_key)


@top.command()
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
    st = state(ctx)
    res = run_deploy(st.workspace(), st.actor(), model, target=target, port=port, out_dir=out)  # type: ignore[arg-type]
    console.print(f"[green]deployed[/] {res.model} → {target}: {res.where}")


@deployments_app.command("list")
def deployments_list(ctx: typer.Context) -> None:
    """Local predictors this workspace started (deploy --target local): model, port, process, alive, since."""
    from serving.deploy import list_deployments

    found = list_deployments(state(ctx).workspace())
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

    st = state(ctx)
    for s_ in stop_deployments(st.workspace(), st.actor(), model, all_models=all_models):
        d = s_.deployment
        if s_.alive:
            console.print(f"[green]stopped[/] {d.model} on port {d.port} (process {d.pid})")
        else:
            console.print(f"[dim]forgot[/] {d.model} on port {d.port}: {s_.state} ({s_.detail}); nothing signalled")


@top.command()
def monitor(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="name or name@version of the served model.")],
    since: Annotated[Optional[str], typer.Option(help="Only requests at or after this ISO time.")] = None,
    webhook: Annotated[Optional[str], typer.Option(help="POST the drift report here (alerts included).")] = None,
    min_records: Annotated[int, typer.Option(help="Fewer records than this: no verdict for a feature.")] = 100,
) -> None:
    """Drift (PSI) of recent requests against the model's training profile; alerts go to the audit log."""
    from serving.monitor import monitor_model

    st = state(ctx)
    rep = monitor_model(st.workspace(), st.actor(), model, since=parse_time(since, "--since"), webhook=webhook,
                        min_records=min_records)
    d = rep.to_dict()
    t = Table(title=f"drift of {rep.model} against its training profile ({d.get('records', 0)} records)")
    for c in ("feature", "PSI", "status", "records"):
        t.add_column(c)
    style = {"ok": "green", "warn": "yellow", "alert": "red", "no_data": "dim"}
    rows = [(name, f) for name, f in rep.features.items()] + [("score", rep.score)]
    for name, f in rows:
        t.add_row(name, "" if f.psi is None else f"{f.psi:.3f}", Text(f.status, style=style.get(f.status, "")), str(f.count))
    console.print(t)


