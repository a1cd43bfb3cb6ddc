"""Benchmark streaming ingest against a plain Kafka consumer writing the same batches with
``write_deltalake`` (run by hand; the same broker, the same topic, the same run).

A local broker (``lakehouse.broker``, Kafka 4.4 KRaft on loopback) is started in a temporary
folder. Transactions records (synthetic, ``--people`` customers, 10 per customer) are produced as
JSON to a one-partition topic.

* **throughput** — the whole backlog (``--rows``) consumed in batches of ``--batch`` records:
  ``plain`` (confluent-kafka consumer, ``pyarrow.json`` per batch, ``write_deltalake`` append)
  against ``governed`` (``lakehouse.stream.stream``: contract, quarantine, tokens, exactly-once
  commits, ledger, audit, lineage) on raw JSON (the policy's ``stream.sealed: optional``), and
  ``governed-sealed`` on records sealed per subject by ``SealedProducer`` (each opened with the
  subject's key). Each consumer runs in its own process; ``--rounds`` rounds, order alternated.
* **latency** — a producer process sends ``--rate`` records/s for ``--seconds`` while each
  consumer runs with a batch policy of 1 s, 10 s, and 10k records (10k records is reached at the
  producer's rate in 10k/rate seconds); latency = Delta commit time − the record's produce
  timestamp, per record, p50 and p99.

Goal (issue #18): governed / plain throughput ≥ 0.5 (or what the ingest core allows).
Results: benchmarks/results/stream.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / ".data"
console = Console()

CONFIG = """\
version: 1
name: bench
storage: {{root: {root}/tables-{tag}}}
workspace: {root}/ws-{tag}
keys:
  store: {root}/keys/keystore.db
  kek: {{provider: env, var: LAKEWARDEN_KEK}}
streaming: {{bootstrap_servers: "{bootstrap}"}}
policies: [{root}/policies/*.yaml]
"""

# The plain consumer: what a team writes without governance. Same batch policy as the stream.
PLAIN = r"""
import io, json, sys, time
import numpy as np
import pyarrow.json as pj
from confluent_kafka import Consumer
from deltalake import write_deltalake
bootstrap, topic, dst, batch, batch_s, total, idle = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "plain-" + dst, "auto.offset.reset": "earliest",
              "enable.auto.commit": False, "isolation.level": "read_committed"})
c.subscribe([topic])
buf, stamps, opened, n, lat, t0, last = [], [], None, 0, [], None, time.monotonic()
def flush():
    global buf, stamps, opened, n
    tbl = pj.read_json(io.BytesIO(b"\n".join(buf)))
    write_deltalake(dst, tbl, mode="append")
    now = time.time() * 1000
    lat.extend((now - np.array(stamps)).tolist())
    n += len(buf)
    buf, stamps, opened = [], [], None
while True:
    msgs = c.consume(num_messages=min(batch, 10000), timeout=0.1)
    now = time.monotonic()
    for m in msgs:
        if m.error():
            continue
        if t0 is None:
            t0 = time.perf_counter()
        if opened is None:
            opened = now
        buf.append(m.value()); stamps.append(m.timestamp()[1])
        if len(buf) >= batch:
            flush()
    if msgs:
        last = now
    if buf and (now - opened >= batch_s or (total and n + len(buf) >= total) or (not total and now - last > idle)):
        flush()  # by time, the backlog's last (short) batch, or the producer has stopped
    if (total and n >= total) or (not total and now - last > idle and t0 is not None and not buf):
        break
secs = time.perf_counter() - t0
c.close()
print(json.dumps({"rows": n, "seconds": secs, "lat": lat}))
"""

GOVERNED = r"""
import json, sys, time
from governance.workspace import Workspace
from lakehouse.stream import stream
cfg, topic, batch, batch_s, idle, ds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
ws = Workspace.open(cfg)
t0 = time.perf_counter()
rep = stream(ws, ws.actor("dana"), ds, topic, batch_records=batch, batch_seconds=batch_s, until_idle=idle, group="g-" + str(time.time()))
secs = rep.busy_seconds  # first record received -> last batch committed (as the plain consumer counts)
ws.close()
print(json.dumps({"rows": rep.rows_read, "accepted": rep.rows_accepted, "seconds": secs, "lat": rep.latencies_ms}))
"""

PRODUCER = r"""
import json, sys, time
from confluent_kafka import Producer
bootstrap, topic, src, rate, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
recs = [l.encode() for l in open(src, "rb").read().decode().splitlines() if l.strip()]
p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "enable.idempotence": True})
t0 = time.monotonic(); i = 0
while time.monotonic() - t0 < seconds:
    due = int((time.monotonic() - t0) * rate)
    while i < due:
        p.produce(topic, value=recs[i % len(recs)]); i += 1
    p.poll(0); time.sleep(0.005)
p.flush(60)
print(i)
"""


def _run(code: str, *args: str, env: dict | None = None, timeout: int = 1800) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pct(lat: list[float], q: float) -> float | None:
    return float(np.percentile(lat, q)) if lat else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=2_000, help="records/s of the latency runs")
    ap.add_argument("--seconds", type=float, default=25)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from governance.keys import generate_kek_b64
    from lakehouse.synth import generate
    from lakehouse.broker import LocalBroker, create_topic, free_port

    people = max(1, args.rows // 10)
    src_dir = DATA / f"stream-{people}"
    if not (src_dir / "transactions.jsonl").exists():
        generate(src_dir, people=people, transactions_per_person=10, fmt="jsonl", seed=3, overwrite=True)
    lines = [line for line in (src_dir / "transactions.jsonl").read_text().splitlines() if line.strip()][: args.rows]
    src = src_dir / f"tx-{len(lines)}.jsonl"
    src.write_text("\n".join(lines) + "\n")
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-stream-"))
    broker = LocalBroker(tmp / "kafka", port=free_port(pair=True), heap_mb=1024).start()
    env = {"LAKEWARDEN_KEK": generate_kek_b64()}
    results: dict = {"rows": len(lines), "batch": args.batch, "throughput": [], "latency": []}
    try:
        import yaml

        root = tmp / "lake"
        (root / "policies").mkdir(parents=True)
        for f in (REPO / "policies").glob("*.yaml"):
            doc = yaml.safe_load(f.read_text())
            if doc.get("dataset") == "transactions":
                doc["stream"] = {"sealed": "optional", "max_topic_retention": "24h"}
            (root / "policies" / f.name).write_text(yaml.safe_dump(doc, sort_keys=False))
        def config(tag: str) -> Path:
            # A fresh lake and workspace (audit, ledger) per run, one key store for all of them:
            # the customers' keys exist, as in production.
            path = root / f"lakewarden-{tag}.yaml"
            path.write_text(CONFIG.format(root=root, tag=tag, bootstrap=broker.bootstrap))
            return path

        cfg = config("producer")
        from confluent_kafka import Producer

        raw_topic = "tx-raw"
        create_topic(broker.bootstrap, raw_topic, config={"retention.ms": str(12 * 3_600_000)})
        p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "compression.type": "zstd"})
        for line in lines:
            while True:
                try:
                    p.produce(raw_topic, value=line.encode())
                    break
                except BufferError:
                    p.poll(0.1)
        p.flush(120)
        # The same records sealed per subject (the customers' keys are created here, as a producer would).
        sealed_topic = "tx-sealed"
        create_topic(broker.bootstrap, sealed_topic, config={"retention.ms": str(12 * 3_600_000)})
        t0 = time.perf_counter()
        _run(r"""
import json, sys
from governance.workspace import Workspace
from lakehouse.stream import produce
ws = Workspace.open(sys.argv[1])
n = produce(ws, ws.actor("dana"), "transactions", sys.argv[2], [sys.argv[3]])
ws.close(); print(json.dumps({"n": n}))
""", cfg, sealed_topic, src, env=env)
        seal_secs = time.perf_counter() - t0
        console.print(f"{len(lines):,} records on {raw_topic} and {sealed_topic} (sealing producer {seal_secs:.1f}s)")

        for rnd in range(args.rounds):
            order = ["plain", "governed", "governed-sealed"]
            if rnd % 2:
                order.reverse()
            row: dict = {"round": rnd + 1}
            for kind in order:
                tag = uuid.uuid4().hex[:8]
                if kind == "plain":
                    r = _run(PLAIN, broker.bootstrap, raw_topic, str(tmp / f"plain-{tag}"), args.batch, 3600,
                             len(lines), 2.0)
                else:
                    ds_topic = raw_topic if kind == "governed" else sealed_topic
                    r = _run(GOVERNED, config(tag), ds_topic, args.batch, 3600, 0.0, "transactions", env=env)
                row[kind] = {"rows": r["rows"], "seconds": round(r["seconds"], 3),
                             "rows_per_s": round(r["rows"] / r["seconds"])}
                console.print(f"round {rnd + 1} {kind}: {r['rows']:,} rows in {r['seconds']:.2f}s")
            row["ratio"] = round(row["governed"]["rows_per_s"] / row["plain"]["rows_per_s"], 3)
            row["ratio_sealed"] = round(row["governed-sealed"]["rows_per_s"] / row["plain"]["rows_per_s"], 3)
            results["throughput"].append(row)

        if not args.skip_latency:
            for name, batch, secs in (("1 s", 10_000_000, 1.0), ("10 s", 10_000_000, 10.0),
                                      ("10k records", 10_000, 3600.0)):
                row = {"policy": name}
                for kind in ("plain", "governed"):
                    topic = f"lat-{uuid.uuid4().hex[:8]}"
                    create_topic(broker.bootstrap, topic, config={"retention.ms": str(12 * 3_600_000)})
                    prod = subprocess.Popen([sys.executable, "-c", PRODUCER, broker.bootstrap, topic, str(src),
                                             str(args.rate), str(args.seconds)], stdout=subprocess.PIPE, text=True)
                    if kind == "plain":
                        r = _run(PLAIN, broker.bootstrap, topic, str(tmp / f"lat-{topic}"), batch,
                                 min(secs, 3600), 0, 12.0)
                    else:
                        r = _run(GOVERNED, config(topic), topic, batch, min(secs, 3600), 12.0, "transactions",
                                 env=env)
                    prod.wait(120)
                    row[kind] = {"rows": r["rows"], "p50_ms": round(_pct(r["lat"], 50), 1),
                                 "p99_ms": round(_pct(r["lat"], 99), 1)}
                    console.print(f"latency {name} {kind}: {r['rows']:,} rows, p50 {row[kind]['p50_ms']:.0f} ms, "
                                  f"p99 {row[kind]['p99_ms']:.0f} ms")
                results["latency"].append(row)
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    t = Table(title=f"streaming ingest, {len(lines):,} transactions, batches of {args.batch:,} (rows/s)")
    for c in ("round", "plain", "governed (raw JSON)", "ratio", "governed (sealed)", "ratio"):
        t.add_column(c, justify="right")
    for r in results["throughput"]:
        t.add_row(str(r["round"]), f"{r['plain']['rows_per_s']:,}", f"{r['governed']['rows_per_s']:,}",
                  f"{r['ratio']:.2f}", f"{r['governed-sealed']['rows_per_s']:,}", f"{r['ratio_sealed']:.2f}")
    console.print(t)
    if results["latency"]:
        t = Table(title=f"produce → committed Delta version, {args.rate:,.0f} records/s for {args.seconds:g}s")
        for c in ("batch policy", "plain p50", "plain p99", "governed p50", "governed p99"):
            t.add_column(c, justify="right")
        for r in results["latency"]:
            t.add_row(r["policy"], f"{r['plain']['p50_ms'] / 1000:.2f}s", f"{r['plain']['p99_ms'] / 1000:.2f}s",
                      f"{r['governed']['p50_ms'] / 1000:.2f}s", f"{r['governed']['p99_ms'] / 1000:.2f}s")
        console.print(t)
    out = REPO / "benchmarks" / "results" / "stream.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
