"""``lakewarden keys …``: key-encryption keys, the key store's status, rotation."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lakewarden.commands import console, state

keys_app = typer.Typer(help="Key-encryption keys, the key store, rotation.", no_args_is_help=True)


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
    from governance.key_ops import key_status

    st = state(ctx)
    for k, v in key_status(st.workspace(), st.actor()).items():
        console.print(f"{k}: {v}")


@keys_app.command("rotate")
def keys_rotate(
    ctx: typer.Context,
    new_kek_file: Annotated[Optional[Path], typer.Option(help="File holding the new KEK.")] = None,
    new_kek_env: Annotated[Optional[str], typer.Option(help="Environment variable holding the new KEK.")] = None,
) -> None:
    """Rewrap every data key with a new KEK (data is not touched); then point keys.kek at it."""
    from governance.key_ops import rotate_kek

    if (new_kek_file is None) == (new_kek_env is None):
        raise typer.BadParameter("give exactly one of --new-kek-file or --new-kek-env")
    st = state(ctx)
    r = rotate_kek(st.workspace(), st.actor(), new_kek_file=new_kek_file, new_kek_env=new_kek_env)
    console.print(f"[green]rotated[/] {r.rewrapped} keys from {r.old_kek} to {r.new_kek}")
    console.print(f"[yellow]now set keys.kek in lakewarden.yaml to {r.config_hint}[/] and destroy the old KEK.")
    if r.residual:
        console.print(f"[yellow]{r.residual}[/]")


@keys_app.command("rotate-mask")
def keys_rotate_mask(ctx: typer.Context) -> None:
    """Replace the key of the `hash` mask and rebuild the silver tables that hold keyed hashes."""
    from lakehouse.silver import rotate_mask_key

    st = state(ctx)
    reports = rotate_mask_key(st.workspace(), st.actor())
    names = ", ".join(f"silver.{r.dataset} (version {r.silver_version})" for r in reports) or "none"
    console.print(f"[green]rotated[/] the mask key; rebuilt {names}")
