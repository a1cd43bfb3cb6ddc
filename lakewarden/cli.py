"""The ``lakewarden`` command line: the command groups of :mod:`lakewarden.commands`, assembled.

Each command parses its arguments, calls one library verb and renders the result. Errors a user
can cause (LakewardenError) print one line, with a hint where there is one, and exit non-zero:
2 for bad input or configuration, 3 for a policy denial, 4 for a failed audit verification, 1
otherwise. A bug prints one line too; its traceback goes to a crash file (lakewarden.process).
"""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from governance.errors import LakewardenError
from lakewarden.commands import State, err
from lakewarden.commands import audit, auth, features, gate, keys, lakehouse, lineage, models, pipeline, policy, privacy
from lakewarden.commands import requests, serving, streams, tables, trino, workspace

app = typer.Typer(
    name="lakewarden",
    help="Governance-first lakehouse: policy-gated ingest, features, private training, serving, compliance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _top in (workspace.top, auth.top, lakehouse.top, streams.top, models.top, serving.top):
    app.registered_commands.extend(_top.registered_commands)
for _group, _name in (
    (policy.policy_app, "policy"), (gate.gate_app, "gate"), (audit.audit_app, "audit"), (keys.keys_app, "keys"),
    (lineage.lineage_app, "lineage"), (trino.trino_app, "trino"), (features.features_app, "features"),
    (privacy.privacy_app, "privacy"), (models.models_app, "models"), (tables.tables_app, "tables"),
    (serving.deployments_app, "deployments"), (requests.requests_app, "requests"), (pipeline.pipeline_app, "pipeline"),
    (streams.broker_app, "broker"),
):
    app.add_typer(_group, name=_name)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="lakewarden.yaml to use.", envvar="LAKEWARDEN_CONFIG")] = None,
    user: Annotated[Optional[str], typer.Option("--as", help="Act as this user (roles come from policy); refused when auth.enabled (use `lakewarden login`).", envvar="LAKEWARDEN_USER")] = None,
) -> None:
    # typer ships its own click: its ParameterSource is compared by name
    from_env = getattr(ctx.get_parameter_source("user"), "name", None) == "ENVIRONMENT"
    ctx.obj = State(config, user, "LAKEWARDEN_USER" if from_env else "--as")
    ctx.call_on_close(ctx.obj.close)


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
