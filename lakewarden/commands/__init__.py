"""The command layer: one module per command group. Each command parses its arguments, calls one
library verb and renders the typed result it gets back. Nothing here decides or audits: the
verbs do (tests/test_commands_layer.py fails on a command module that touches the gate, the
audit log, the key ring or the lineage store). ``lakewarden.cli`` assembles the groups.

What a command needs beyond typer and rich is imported inside it: `lakewarden --help` and
`models list` must not pay for torch, Feast, KServe, pyarrow's datasets or even the policy model
(pydantic) at start. tests/test_cli_start.py keeps it so.
"""

# No `from __future__ import annotations` in the command modules: typer resolves every command's
# annotations when it builds the command tree, and evaluating them as strings (~1,000 evals)
# cost each start about 0.04 s.

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console

if TYPE_CHECKING:
    from governance.gate import Actor
    from governance.workspace import Workspace

console = Console()
if not console.is_terminal:  # pipes and CI logs: wide enough for tables to stay readable
    console = Console(width=160)
err = Console(stderr=True)


@dataclass
class State:
    """The root command's options, and the workspace they open (lazily, once per command)."""

    config: Optional[Path]
    user: Optional[str]
    user_from: str = "--as"  # where ``user`` came from: "--as" or "LAKEWARDEN_USER" (the environment)
    _ws: Any = None

    def workspace(self) -> "Workspace":
        if self._ws is None:
            from governance.workspace import Workspace

            self._ws = Workspace.open(self.config)
        return self._ws

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()

    def actor(self) -> "Actor":
        """The acting user. With ``auth.enabled``: the verified user of ``lakewarden login``'s cached
        token, and ``--as``/``LAKEWARDEN_USER`` are refused (governance/tokens.py). Without: the
        claim, ``--as`` else $LAKEWARDEN_USER else the OS user, roles from the policy."""
        ws = self.workspace()
        if ws.config.auth.enabled:
            from governance.tokens import acting_user

            return acting_user(ws, claimed=self.user, claimed_by=self.claim_label())
        return ws.actor(self.user)

    def service_actor(self) -> "Actor":
        """The principal a long-running server (``lakewarden serve``) starts as. With ``auth.enabled``:
        the verified login when there is one; else the service principal the environment names
        (``LAKEWARDEN_USER``, as serving/deploy.py and the k8s manifests set it: a deployed server has
        no one to log in), never ``--as``. Its callers are verified per request all the same."""
        ws = self.workspace()
        if not ws.config.auth.enabled:
            return ws.actor(self.user)
        from governance.tokens import LoginRequired, acting_user

        if self.user and self.user_from != "LAKEWARDEN_USER":
            return acting_user(ws, claimed=self.user, claimed_by=self.claim_label())
        try:
            return acting_user(ws)
        except LoginRequired:
            if not self.user:
                raise
            return ws.service_actor(self.user)

    def claim_label(self) -> str:
        return "LAKEWARDEN_USER" if self.user_from == "LAKEWARDEN_USER" else "--as"


def state(ctx: typer.Context) -> State:
    return ctx.find_root().obj


def parse_time(v: Optional[str], name: str) -> Optional[datetime]:
    """An ISO date or time from an option (UTC where it names no zone); a bad one is a usage error."""
    if v is None:
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise typer.BadParameter(f"{v!r} is not an ISO date or time (e.g. 2026-11-29 or 2026-11-29T10:00)", param_hint=name) from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def split(values: str) -> list[str]:
    """A comma-separated option as a list, blanks dropped."""
    return [v.strip() for v in values.split(",") if v.strip()]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"
