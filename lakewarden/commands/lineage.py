"""``lakewarden lineage show``: what a dataset or model was made from, and what was made from it."""

from enum import Enum
from typing import Annotated, Optional

import typer

from lakewarden.commands import console, state

lineage_app = typer.Typer(help="OpenLineage run events: upstream and downstream.", no_args_is_help=True)


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
    from governance.lineage import render_tree
    from governance.lineage_ops import lineage_of

    st = state(ctx)
    view = lineage_of(st.workspace(), st.actor(), name, direction=direction.value, depth=depth)  # type: ignore[arg-type]
    for graph, label in ((view.upstream, "upstream"), (view.downstream, "downstream")):
        if graph is not None:
            console.print(render_tree(graph, name, label))  # type: ignore[arg-type]
    if not view.found:
        console.print(f"[yellow]no lineage recorded for {name}[/]")
