"""``lakewarden gate check``: ask the policy gate for a decision (the verb audits it)."""

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from governance.stages import Stage
from lakewarden.commands import console, split, state

if TYPE_CHECKING:
    from governance.gate import Decision

gate_app = typer.Typer(help="Ask the policy gate for a decision.", no_args_is_help=True)


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
    from governance.gate import check_access

    if not (model or dataset):
        raise typer.BadParameter("name a --dataset or a --model")
    st = state(ctx)
    d = check_access(st.workspace(), st.actor(), stage, dataset=dataset, layer=layer, model=model, purpose=purpose,
                     columns=split(columns) if columns else None, epsilon=epsilon, epsilon_spent=epsilon_spent)
    _print_decision(d)


