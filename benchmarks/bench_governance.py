"""Benchmark the governance kernel (run by hand: `make bench`; not a timed test).

Measures, on this machine, in one run:
  * audit append (batched): events/s through AuditLog.record + flush, against plain
    `write_deltalake` of the same finished Arrow rows (the ratio is the cost of hashing,
    signing, redaction and locking);
  * audit verify: events/s over the whole log (chain + signatures);
  * one gate decision: µs per decide(), without and with the audit buffer;
  * sealing values: KeyRing.seal_many against raw AES-GCM on the same values.

Goals (issue #2): append ≥ 20,000 events/s, verify ≥ 200,000 events/s, a decision ≤ 50 µs.
Results go to benchmarks/results/governance.json and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from deltalake import DeltaTable, write_deltalake
from rich.console import Console
from rich.table import Table

from governance.audit import AuditLog
from governance.gate import Actor, Gate, Resource
from governance.keys import KeyRing, KeyStore, LocalKek
from governance.policy import load_policies

REPO = Path(__file__).resolve().parents[1]
console = Console()


def bench_audit(tmp: Path, n: int, batch: int) -> dict:
    log = AuditLog(str(tmp / "ev"), str(tmp / "cp"), tmp / "st", signing_key=Ed25519PrivateKey.generate(),
                   checkpoint_every=1000, flush_every=batch)
    t0 = time.perf_counter()
    for i in range(n):
        log.record("gate.decide", actor="sam", outcome="allow" if i % 7 else "deny", stage="train",
                   resource="dataset:customers", rule_ids=("roles/data_scientist/stages/train", "customers/privacy/budget"),
                   details={"purpose": "credit_scoring", "epsilon": 3.0, "reasons": ["allowed"]})
    log.flush()
    append_s = time.perf_counter() - t0
    # Plain deltalake: the same finished rows, same batch size, no hashing/signing/redaction.
    rows = DeltaTable(str(tmp / "ev")).to_pyarrow_table()
    t0 = time.perf_counter()
    for off in range(0, n, batch):
        write_deltalake(str(tmp / "plain"), rows.slice(off, batch), mode="append")
    plain_s = time.perf_counter() - t0
    rep = log.verify()
    assert rep.ok, rep.findings
    t0 = time.perf_counter()
    rep = log.verify()
    verify_s = time.perf_counter() - t0
    return {
        "events": n,
        "batch": batch,
        "append_events_per_s": n / append_s,
        "plain_write_events_per_s": n / plain_s,
        "append_vs_plain": (n / append_s) / (n / plain_s),
        "verify_events_per_s": n / verify_s,
        "verify_s": verify_s,
        "checkpoints": rep.checkpoints,
    }


def bench_gate(n: int) -> dict:
    ps = load_policies(sorted((REPO / "policies").glob("*.yaml")))

    class Buffer:  # the audit log's in-memory record path without Delta I/O
        def __init__(self) -> None:
            self.log = AuditLog("/nonexistent/ev", "/nonexistent/cp", "/tmp", signing_key=None, flush_every=10**12)

        def record(self, *a, **k):
            self.log.record(*a, **k)

        def flush(self):
            self.log._buf = {k: [] for k in self.log._buf}

    cases = [
        ("query", Actor("ana"), Resource.table("customers"), {"columns": ["income", "region"]}),
        ("features", Actor("sam"), Resource.dataset("customers"), {"purpose": "credit_scoring", "columns": ["income", "region"]}),
        ("train", Actor("sam"), Resource.dataset("customers"), {"purpose": "credit_scoring", "epsilon": 3.0, "epsilon_spent": 4.0}),
        ("features", Actor("sam"), Resource.dataset("customers"), {"purpose": "credit_scoring", "columns": ["sex"]}),
    ]
    out = {}
    for label, gate in (("decide_us", Gate(ps)), ("decide_with_audit_us", Gate(ps, audit=Buffer()))):
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for i in range(n):
                s, a, r, c = cases[i & 3]
                gate.decide(s, a, r, c)
            samples.append((time.perf_counter() - t0) / n * 1e6)
        out[label] = statistics.median(samples)
    # A hot path's repeated question (an online lookup per request): enforce_repeated answers from
    # the run's first, audited decision and counts the call (issue #16).
    gate = Gate(ps, audit=Buffer(), repeat_window=3600)
    s, a, r, c = "serve", Actor("mel"), Resource.dataset("customers"), {"purpose": "credit_scoring", "columns": ["income"]}
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            gate.enforce_repeated(s, a, r, c, tally={"entities": 1})
        samples.append((time.perf_counter() - t0) / n * 1e6)
    out["repeated_us"] = statistics.median(samples)
    return out


def bench_seal(tmp: Path, n: int) -> dict:
    ring = KeyRing(KeyStore(tmp / "ks.db", LocalKek(os.urandom(32), source="bench")))
    values = [f"person{i}@example.org" for i in range(n)]
    tokens = ring.tokens_for([f"id{i % 1000}" for i in range(n)])
    ring.seal_many(values[:1000], tokens[:1000], dataset="d", column="c")  # warm caches
    t0 = time.perf_counter()
    ring.seal_many(values, tokens, dataset="d", column="c")
    ours = n / (time.perf_counter() - t0)
    keys = {t: AESGCM(ring.store.dek(t)) for t in set(tokens)}
    t0 = time.perf_counter()
    for v, t in zip(values, tokens):
        keys[t].encrypt(os.urandom(12), v.encode(), b"aad")
    raw = n / (time.perf_counter() - t0)
    ring.close()
    return {"values": n, "seal_values_per_s": ours, "raw_aesgcm_values_per_s": raw, "seal_vs_raw": ours / raw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--decisions", type=int, default=20_000)
    ap.add_argument("--seal", type=int, default=200_000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "governance.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lw-bench-"))
    try:
        with console.status("audit append + verify"):
            audit = bench_audit(tmp / "a", args.events, args.batch)
        with console.status("gate decisions"):
            gate = bench_gate(args.decisions)
        with console.status("sealing"):
            seal = bench_seal(tmp / "k", args.seal)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "audit": audit, "gate": gate, "seal": seal}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    t = Table(title=f"governance kernel ({os.cpu_count()} cores)")
    for c in ("measure", "value", "goal", "baseline (same run)"):
        t.add_column(c)
    t.add_row("audit append, batched", f"{audit['append_events_per_s']:,.0f} events/s", "≥ 20,000",
              f"plain write_deltalake {audit['plain_write_events_per_s']:,.0f}/s (ratio {audit['append_vs_plain']:.2f})")
    t.add_row("audit verify", f"{audit['verify_events_per_s']:,.0f} events/s", "≥ 200,000", f"{audit['events']:,} events in {audit['verify_s']:.2f}s")
    t.add_row("gate decision", f"{gate['decide_us']:.1f} µs", "≤ 50 µs", "")
    t.add_row("gate decision + audit record", f"{gate['decide_with_audit_us']:.1f} µs", "≤ 50 µs", "")
    t.add_row("a repeated decision (counted in its run)", f"{gate['repeated_us']:.1f} µs", "", "")
    t.add_row("seal (AES-256-GCM, per-subject DEK)", f"{seal['seal_values_per_s']:,.0f} values/s", "",
              f"raw AESGCM {seal['raw_aesgcm_values_per_s']:,.0f}/s (ratio {seal['seal_vs_raw']:.2f})")
    console.print(t)
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
