"""``lakewarden login | logout``: the command line's identity when ``auth.enabled`` (governance/tokens.py)."""

from typing import TYPE_CHECKING, Annotated

import typer

from lakewarden.commands import console, state

if TYPE_CHECKING:
    from governance.tokens import DeviceCode

top = typer.Typer()


def _show_code(dc: "DeviceCode") -> None:
    console.print(f"To log in, open {dc.verification_uri} and enter the code {dc.user_code}", highlight=False,
                  soft_wrap=True)
    if dc.verification_uri_complete:
        console.print(f"  (or open {dc.verification_uri_complete})", highlight=False, soft_wrap=True)
    console.print(f"Waiting for the approval (the code expires in {dc.expires_in:.0f} s)...", highlight=False)
    console.file.flush()


@top.command()
def login(
    ctx: typer.Context,
    timeout: Annotated[int, typer.Option(help="Give up after this many seconds.", min=1)] = 600,
) -> None:
    """Log in to the workspace's identity provider (device code: approve in a browser); the token is cached."""
    from governance.tokens import login as device_login

    st = state(ctx)  # --as / LAKEWARDEN_USER are passed on to be refused: the login names the user
    actor, path = device_login(st.workspace(), on_code=_show_code, timeout=timeout, claimed=st.user,
                               claimed_by=st.claim_label())
    console.print(f"[green]logged in[/] as {actor.name} ({', '.join(actor.roles)}); token cached in {path}",
                  highlight=False, soft_wrap=True)


@top.command()
def logout(ctx: typer.Context) -> None:
    """Forget this workspace's cached login (the token file is deleted)."""
    from governance.tokens import logout as forget

    path = forget(state(ctx).workspace())
    console.print(f"logged out: deleted {path}" if path else "not logged in to this workspace", highlight=False,
                  soft_wrap=True)
