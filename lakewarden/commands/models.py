"""``lakewarden train`` and ``lakewarden models …``: private training and the model registry."""

from typing import Annotated, Optional

import typer
from rich.table import Table

from lakewarden.commands import console, err, split, state

top = typer.Typer()
models_app = typer.Typer(help="The model registry: list, show, approve.", no_args_is_help=True)


@top.command()
def train(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Model name in the registry.")],
    features: Annotated[str, typer.Option(help="Comma-separated view:feature references.")],
    label: Annotated[str, typer.Option(help="Label column of silver, declared with its favourable value under "
                                            "'labels:' in the dataset policy.")],
    purpose: Annotated[str, typer.Option(help="Purpose; the policy must allow it for every feature.")],
    epsilon: Annotated[float, typer.Option(help="Target ε of this run (capped by policy and the budget left).")] = 3.0,
    delta: Annotated[float, typer.Option(help="Target δ.")] = 1e-5,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = 5,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, show_default=False,
        help="Expected batch size (Poisson sampling). Default: a tenth of the training rows, at least 32 "
             "and at most 512.")] = None,
    learning_rate: Annotated[float, typer.Option(help="Adam's learning rate.")] = 0.002,
    max_grad_norm: Annotated[float, typer.Option(help="Per-sample gradient clipping norm.")] = 1.0,
    accountant: Annotated[str, typer.Option(help="prv, rdp or gdp.")] = "prv",
    seed: Annotated[int, typer.Option(help="Same seed, same model (CPU).")] = 0,
    processes: Annotated[int, typer.Option(help="Data-parallel processes (torch.distributed, gloo), or Ray Train workers.")] = 1,
    engine: Annotated[str, typer.Option(help="local (processes here) or ray (Ray Train workers on the cluster at $RAY_ADDRESS).")] = "local",
    mitigate: Annotated[bool, typer.Option(help="Retrain with reweighing if the fairness gate fails.")] = True,
) -> None:
    """Train a differentially private model on a training set and register it with its model card."""
    from training.flow import train_model
    from training.trainer import TrainOptions

    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"unknown engine {engine!r} (engines: local, ray)", param_hint="--engine")
    if not learning_rate > 0:
        raise typer.BadParameter(f"must be greater than 0 (got {learning_rate:g})", param_hint="--learning-rate")
    st = state(ctx)
    opts = TrainOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, target_epsilon=epsilon,
                        delta=delta, max_grad_norm=max_grad_norm, accountant=accountant, seed=seed)  # type: ignore[arg-type]
    with err.status(f"training {name} (DP-SGD, target ε={epsilon:g})"):
        out = train_model(st.workspace(), st.actor(), name=name, features=split(features), label=label,
                          purpose=purpose, options=opts, mitigate=mitigate, world_size=processes, engine=engine)
    c = out.card
    console.print(f"[green]registered[/] {out.ref}: ε={c.privacy.epsilon:.3f} (δ={c.privacy.delta:g}, {c.privacy.accountant}), "
                  + ", ".join(f"{k} {v:.3f}" for k, v in c.utility.items()))
    if c.favourable_label is not None:
        console.print(f"label {c.favourable_label.sentence()}", highlight=False, markup=False)
    if c.fairness is not None:
        verdict = "[green]passed[/]" if c.fairness.passed else "[red]failed[/]: " + "; ".join(c.fairness.failures)
        if c.fairness.uncertainty:
            from training.fairness import pass_rate_note

            verdict += f" ({pass_rate_note(c.fairness.uncertainty['pass_rate'])})"
        console.print(f"fairness {verdict}")
    if c.mitigation:
        console.print(f"mitigation: {c.mitigation['method']} (passed before {c.mitigation['passed_before']}, "
                      f"after {c.mitigation['passed_after']})")
    batches = "auto (a tenth of the training rows, 32–512)" if batch_size is None else str(batch_size)
    rate = f", sampling rate {c.privacy.sample_rate:.4g} per step" if c.privacy.sample_rate else ""
    console.print(f"batch size {batches}{rate}, {epochs} epoch(s), learning rate {learning_rate:g}", highlight=False)
    console.print(f"privacy spent by this call: ε={out.epsilon_spent:.3f} over {len(out.runs)} run(s)")


@models_app.command("list")
def models_list(ctx: typer.Context, name: Annotated[Optional[str], typer.Argument()] = None) -> None:
    """Registered model versions with ε, utility, fairness and status."""
    from training.registry import Registry

    cards = Registry(state(ctx).workspace()).list(name)
    t = Table(title=f"models ({len(cards)})")
    for c in ("model", "dataset", "purpose", "ε", "AUC", "fairness", "status", "created"):
        t.add_column(c)
    for c in cards:
        fair = "—" if c.fairness is None else ("passed" if c.fairness.passed else "failed")
        t.add_row(f"{c.name}@{c.version}", c.dataset, c.purpose, f"{c.privacy.epsilon:.2f}",
                  f"{c.utility.get('auc', float('nan')):.3f}", fair, c.status, c.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(t)


@models_app.command("show")
def models_show(ctx: typer.Context, model: Annotated[str, typer.Argument(help="name or name@version")]) -> None:
    """The model card (Markdown)."""
    from rich.markdown import Markdown

    from training.registry import Registry

    console.print(Markdown(Registry(state(ctx).workspace()).card(model).to_markdown()))


@models_app.command("approve")
def models_approve(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="name@version")],
    override_reason: Annotated[Optional[str], typer.Option(help="Approve despite a failed fairness verdict, and say why.")] = None,
) -> None:
    """Record a compliance approval (the deploy gate requires one)."""
    from training.registry import Registry

    st = state(ctx)
    card = Registry(st.workspace()).approve(st.actor(), model, override_reason=override_reason)
    console.print(f"[green]approved[/] {card.name}@{card.version} by {st.actor().name}")


