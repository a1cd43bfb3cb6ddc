"""``lakewarden features …``: Feast over the governed tables (erasure goes through ``lakewarden requests``)."""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lakewarden.commands import console, split, state

features_app = typer.Typer(help="Feast over the governed tables: apply, materialize, training-set, online.", no_args_is_help=True)


def _features(ctx: typer.Context):  # noqa: ANN202
    import warnings

    warnings.filterwarnings("ignore", module="feast")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from features.store import Features

    st = state(ctx)
    return st, Features(st.workspace())


@features_app.command("apply")
def features_apply(ctx: typer.Context) -> None:
    """Generate entities and feature views from policy and register them with Feast."""
    st, fs = _features(ctx)
    names = fs.apply(st.actor())
    console.print(f"[green]applied[/] {', '.join(names) or 'nothing (no features declared in policy)'}")


@features_app.command("materialize")
def features_materialize(ctx: typer.Context) -> None:
    """Load the latest feature values into the online store (incremental)."""
    st, fs = _features(ctx)
    versions = fs.materialize(st.actor())
    for view, v in versions.items():
        console.print(f"materialized {view} from silver version {v}")


@features_app.command("training-set")
def features_training_set(
    ctx: typer.Context,
    features: Annotated[str, typer.Option(help="Comma-separated view:feature references.")],
    purpose: Annotated[str, typer.Option(help="Why the data is used; the policy must allow it.")],
    label: Annotated[Optional[str], typer.Option(help="Label column from silver.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the training set as Parquet here.")] = None,
    engine: Annotated[str, typer.Option(help="local (Feast's offline store here) or ray (the join per subject bucket on the Ray cluster at $RAY_ADDRESS).")] = "local",
) -> None:
    """A point-in-time correct training set for every subject of the dataset (gated by purpose)."""
    import pyarrow.parquet as pq

    st, fs = _features(ctx)
    ts = fs.training_set(st.actor(), purpose=purpose, features=split(features), label=label, engine=engine)
    if out:
        pq.write_table(ts.table, out)
        console.print(f"[green]wrote[/] {out}: {ts.table.num_rows:,} rows; sources {ts.sources}; lineage run {ts.run_id}")
    else:
        console.print(f"{ts.table.num_rows:,} rows × {ts.table.num_columns} columns from {ts.sources}")


@features_app.command("online")
def features_online(
    ctx: typer.Context,
    features: Annotated[str, typer.Option(help="Comma-separated view:feature references.")],
    purpose: Annotated[str, typer.Option(help="Why the data is used; the policy must allow it.")],
    tokens: Annotated[str, typer.Option(help="Comma-separated subject tokens (sub_...).")],
) -> None:
    """Online feature values for subject tokens."""
    st, fs = _features(ctx)
    tbl = fs.online(st.actor(), purpose=purpose, features=split(features), tokens=split(tokens))
    t = Table()
    for c in tbl.column_names:
        t.add_column(c)
    for r in tbl.to_pylist():
        t.add_row(*["" if v is None else str(v) for v in r.values()])
    console.print(t)
