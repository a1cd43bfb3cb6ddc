"""Streaming commands: `stream` (a topic into a dataset), `produce` (sealed records to a topic),
`broker` (a local Kafka broker for the laptop profile)."""

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lakewarden.commands import console, err, state

top = typer.Typer()
broker_app = typer.Typer(help="A local Kafka broker (KRaft, loopback) for the laptop profile and the demo.",
                         no_args_is_help=True)


@top.command()
def stream(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset name (a policy must govern it).")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Kafka topic to consume.")],
    bootstrap: Annotated[Optional[str], typer.Option(help="Brokers (default: streaming.bootstrap_servers).")] = None,
    batch_records: Annotated[Optional[int], typer.Option(help="A batch closes at this many records.")] = None,
    batch_seconds: Annotated[float, typer.Option(help="... or when its first record has waited this long.")] = 10.0,
    until_idle: Annotated[Optional[float], typer.Option(help="Stop once caught up and idle this many seconds.")] = None,
    max_seconds: Annotated[Optional[float], typer.Option(help="Stop after this many seconds.")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus metrics (lag) on 127.0.0.1:PORT.")] = None,
    show_status: Annotated[bool, typer.Option("--status", help="Show per-partition counts and offsets; consume nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Consume a topic into a dataset: the governed ingest per micro-batch, exactly once (SIGTERM stops cleanly)."""
    from lakehouse import stream as S

    st = state(ctx)
    ws = st.workspace()
    if show_status:
        rows = S.status(ws, dataset, topic)
        if as_json:
            sys.stdout.write(json.dumps(rows, indent=2) + "\n")
            return
        t = Table(title=f"stream {topic} → {dataset}: from the ingest ledger (read = accepted + quarantined)")
        for c in ("partition", "batches", "read", "accepted", "quarantined", "last offset", "table watermarks"):
            t.add_column(c, justify="left" if c == "table watermarks" else "right")
        for r in rows:
            wm = ", ".join(f"{k} {v}" for k, v in r["watermarks"].items() if v is not None)
            t.add_row(str(r["partition"]), f"{r['batches']:,}", f"{r['rows_read']:,}", f"{r['accepted']:,}",
                      f"{r['quarantined']:,}", str(r["last_offset"]), wm)
        console.print(t if rows else f"nothing from topic {topic!r} in {dataset} yet")
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen = {"n": 0}

    def progress(src: str, n: int) -> None:
        seen["n"] += n
        if not as_json and err.is_terminal:  # a live count on a terminal; logs get the table only
            err.print(f"\r{src}: {seen['n']:,} records", end="")

    try:
        rep = S.stream(ws, st.actor(), dataset, topic, bootstrap=bootstrap, batch_records=batch_records,
                       batch_seconds=batch_seconds, until_idle=until_idle, max_seconds=max_seconds, stop=stop,
                       metrics_port=metrics_port, progress=progress)
    except KeyboardInterrupt:
        err.print("\ninterrupted: committed batches stay; the next run resumes after them")
        raise SystemExit(130) from None
    if not as_json and seen["n"] and err.is_terminal:
        err.print("")
    if as_json:
        sys.stdout.write(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
        return
    t = Table(title=f"stream {topic} → {dataset}: {rep.rows_read:,} records in {rep.seconds:.1f}s ({rep.stopped})")
    for c in ("partition", "resumed at", "batches", "read", "accepted", "quarantined", "last offset", "lag"):
        t.add_column(c, justify="right")
    for p in sorted(rep.partitions.values(), key=lambda p: p.partition):
        t.add_row(str(p.partition), "start" if p.resumed_from is None else str(p.resumed_from), f"{p.batches:,}",
                  f"{p.rows_read:,}", f"{p.rows_accepted:,}", f"{p.rows_quarantined:,}", str(p.last_offset),
                  "?" if p.lag is None else f"{p.lag:,}")
    console.print(t)
    if rep.reasons:
        r = Table(title="quarantined records by reason")
        r.add_column("reason")
        r.add_column("records", justify="right")
        for reason, n in rep.reasons.most_common(15):
            r.add_row(reason, f"{n:,}")
        console.print(r)
    p50, p99 = rep.latency(50), rep.latency(99)
    lat = f"; produce → committed p50 {p50 / 1000:.2f}s, p99 {p99 / 1000:.2f}s" if p50 is not None else ""
    console.print(f"records read {rep.rows_read:,} = accepted {rep.rows_accepted:,} + quarantined "
                  f"{rep.rows_quarantined:,}{lat}")


@top.command()
def produce(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Dataset the records are for (its policy names the subject key).")],
    paths: Annotated[list[str], typer.Argument(help="JSON Lines or CSV files of records.")],
    topic: Annotated[str, typer.Option("--topic", "-t", help="Kafka topic to send to.")],
    bootstrap: Annotated[Optional[str], typer.Option(help="Brokers (default: streaming.bootstrap_servers).")] = None,
) -> None:
    """Send records to a topic, each sealed for its subject (an erasure then reaches the broker's copy)."""
    from lakehouse.stream import produce as run_produce

    st = state(ctx)
    n = run_produce(st.workspace(), st.actor(), dataset, topic, paths, bootstrap=bootstrap)
    console.print(f"sent {n:,} sealed records to {topic}")


@broker_app.command("start")
def broker_start(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Listener port on 127.0.0.1 (the controller takes PORT+1).")] = 9092,
    data_dir: Annotated[Optional[Path], typer.Option(help="Broker folder (default: <workspace>/kafka).")] = None,
) -> None:
    """Install (once, from Maven Central) and start a local Kafka broker in the background (stage maintain)."""
    from lakehouse.stream import broker_up

    st = state(ctx)
    b = broker_up(st.workspace(), st.actor(), port=port, data_dir=data_dir)
    console.print(f"Kafka broker on {b.bootstrap} (pid {b.proc.pid if b.proc else '?'}), data in {b.data_dir}")


@broker_app.command("stop")
def broker_stop(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Option(help="Broker folder (default: <workspace>/kafka).")] = None,
) -> None:
    """Stop the local broker started by `broker start` (stage maintain)."""
    from lakehouse.stream import broker_down

    st = state(ctx)
    broker_down(st.workspace(), st.actor(), data_dir=data_dir)
    console.print("broker stopped")


@broker_app.command("create-topic")
def broker_topic(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Topic name.")],
    partitions: Annotated[int, typer.Option(help="Partitions.")] = 1,
    retention_hours: Annotated[Optional[float], typer.Option(help="retention.ms of the topic, in hours.")] = None,
    bootstrap: Annotated[Optional[str], typer.Option(help="Brokers (default: streaming.bootstrap_servers).")] = None,
) -> None:
    """Create a topic (an existing one is left as it is; stage maintain)."""
    from lakehouse.stream import create_topic

    st = state(ctx)
    create_topic(st.workspace(), st.actor(), name, partitions=partitions, retention_hours=retention_hours,
                 bootstrap=bootstrap)
    console.print(f"topic {name}: {partitions} partition(s)")
