"""``lakewarden init``: create a workspace (configuration, KEK, key store, audit log, policy templates)."""

from pathlib import Path
from typing import Annotated

import typer

from lakewarden.commands import console, state

top = typer.Typer()


@top.command()
def init(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="Project folder.")] = Path("."),
) -> None:
    """Create lakewarden.yaml, the KEK (file provider), the key store and the audit log, where missing."""
    from governance.setup import init_workspace

    st = state(ctx)
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


