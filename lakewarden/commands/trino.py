"""``lakewarden trino …``: a local Trino server over the governed tables."""

from pathlib import Path
from typing import Annotated

import typer

from lakewarden.commands import console, err, state

trino_app = typer.Typer(help="A local Trino server over the governed tables: up, down, status, sync.", no_args_is_help=True)


@trino_app.command("up")
def trino_up(ctx: typer.Context) -> None:
    """Install if needed, render the configuration, start Trino, wait until ready, register the tables."""
    from lakehouse.trino import trino_up as start

    st = state(ctx)
    with err.status("Trino") as spinner:
        up = start(st.workspace(), st.actor(), on_step=spinner.update)
    console.print(f"[green]Trino is up[/] at {up.url} ({up.seconds:.1f}s)")
    console.print(f"registered {len(up.sync.registered)} table(s), {len(up.sync.present)} already there; {up.sync.rules} table rules")


@trino_app.command("down")
def trino_down(ctx: typer.Context) -> None:
    """Stop the local Trino server."""
    from lakehouse.trino import trino_down as stop

    st = state(ctx)
    stop(st.workspace(), st.actor())
    console.print("Trino is down")


@trino_app.command("status")
def trino_status(ctx: typer.Context) -> None:
    """Is the server up, which version, where."""
    from lakehouse.trino import trino_status as status

    s = status(state(ctx).workspace())
    up = "[green]running[/]" if s["running"] else "[yellow]not running[/]"
    console.print(f"Trino at {s['url']}: {up}" + (f" (version {s['version']}, up {s['uptime']})" if s["running"] else ""))
    console.print(f"home {s['home']} · config {s['etc']} · workspace {s['workspace']}")
    if not s["running"]:
        raise typer.Exit(1)


@trino_app.command("sync")
def trino_sync(ctx: typer.Context) -> None:
    """Register new tables and re-render access rules from policy (after ingest, erasure, policy changes)."""
    from lakehouse.trino import trino_sync as sync

    st = state(ctx)
    rep = sync(st.workspace(), st.actor())
    console.print(f"registered {', '.join(rep.registered) or 'nothing new'}; {rep.rules} table rules; {rep.seconds:.1f}s")


@trino_app.command("render")
def trino_render(
    ctx: typer.Context,
    profile: Annotated[str, typer.Option(help="production (HTTPS + password) or cluster (coordinator + workers over S3, metastore in the bucket).")],
    out: Annotated[Path, typer.Option(help="Folder to write the configuration into.")],
) -> None:
    """Render Trino configuration for production or a cluster, with rules compiled from policy."""
    from lakehouse.trino import render_profile

    files = render_profile(state(ctx).workspace(), profile)
    for rel, text in files.items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    console.print(f"[green]wrote[/] {len(files)} files to {out}")


