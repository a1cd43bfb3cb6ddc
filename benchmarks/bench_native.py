"""Benchmark the native core's per-value work against the raw AES-GCM limit (run by hand).

* ``openssl speed -evp aes-256-gcm``: what one core of this machine can encrypt, per block size
  (the raw limit: no key schedule per value, no nonce draw, no associated data, no output column);
* ``seal`` / ``open`` of whole Arrow columns by ``governance.keys.native``: values of 24 bytes
  (an e-mail address) and 1 KiB, under one subject key for the whole column and under a new key
  for every value (ingesting new people), native and pure-Python, same run;
* blind indexes per second; subjects created per second by the key store's bulk path.

The native core uses every core (rayon), ``openssl speed`` one: the table shows both, and the
ratio to the openssl figure at the nearest block size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from governance.keys import KeyStore, LocalKek, native, wire

REPO = Path(__file__).resolve().parents[1]
console = Console()


def openssl_speed(seconds: int) -> dict[int, float]:
    """Bytes per second by block size, from ``openssl speed -evp aes-256-gcm``."""
    sizes = [16, 64, 256, 1024, 8192, 16384]
    out: dict[int, float] = {}
    for size in sizes:  # one size per run keeps the parsing simple across openssl versions
        q = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "-bytes", str(size), "-evp", "aes-256-gcm"],
                           capture_output=True, text=True)
        m = re.search(r"^aes-256-gcm\s+([\d.]+)k", q.stdout, re.M | re.I)
        if m:
            out[size] = float(m.group(1)) * 1000
    return out


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def column_bench(n: int, size: int, per_value_key: bool, force: str) -> dict:
    vals = pa.array([os.urandom(size // 2).hex()[:size] for _ in range(min(n, 2000))] * (n // min(n, 2000)), pa.string())
    n = len(vals)
    k = n if per_value_key else 1
    keys = os.urandom(32 * k)
    tokens = pa.array(native.new_tokens(k))
    index = pa.array(range(n), pa.int32()) if per_value_key else pa.array([0] * n, pa.int32())
    prefix = wire.value_aad_prefix("customers", "email")
    sealed = native.seal_column(keys, index, tokens, prefix, vals, force=force)
    t_seal = _time(lambda: native.seal_column(keys, index, tokens, prefix, vals, force=force), 1 if force == "python" else 3)
    t_open = _time(lambda: native.open_column(keys, index, tokens, prefix, sealed, force=force), 1 if force == "python" else 3)
    mb = n * size / 1e6
    return {"backend": force, "value_bytes": size, "values": n, "key_per_value": per_value_key,
            "seal_values_per_s": n / t_seal, "seal_mb_per_s": mb / t_seal,
            "open_values_per_s": n / t_open, "open_mb_per_s": mb / t_open}


def rows_bench(n: int) -> dict:
    """A customers batch: 5 sealed columns of ~24-byte values, every row a new subject. ``seal_columns``
    (one cipher per subject for all 5, each column written in place) against ``seal_column`` 5 times."""
    cols = {c: (wire.value_aad_prefix("customers", c),
                pa.array([os.urandom(12).hex() for _ in range(min(n, 2000))] * (n // min(n, 2000)), pa.string()))
            for c in ("name", "email", "phone", "sex", "ethnicity")}
    n = len(next(iter(cols.values()))[1])
    keys, tokens, index = os.urandom(32 * n), pa.array(native.new_tokens(n)), pa.array(range(n), pa.int32())
    together = _time(lambda: native.seal_columns(keys, index, tokens, cols))
    one_by_one = _time(lambda: [native.seal_column(keys, index, tokens, p, v) for p, v in cols.values()])
    return {"rows": n, "columns": len(cols), "value_bytes": 24,
            "seal_columns_values_per_s": n * len(cols) / together, "seal_column_x5_values_per_s": n * len(cols) / one_by_one}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", type=int, default=1_000_000)
    ap.add_argument("--python-values", type=int, default=200_000)
    ap.add_argument("--openssl-seconds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "native.json")
    args = ap.parse_args()
    if native.backend() != "native":
        raise SystemExit("the native core is not built (make install) or LAKEWARDEN_NATIVE=0 is set")
    with console.status("openssl speed -evp aes-256-gcm"):
        limit = openssl_speed(args.openssl_seconds)
    rows = []
    for size in (24, 1024):
        for per_value_key in (False, True):
            for force, n in (("native", args.values), ("python", args.python_values)):
                nn = n if size == 24 else n // 8
                with console.status(f"{force}: {nn:,} values of {size} B, {'a key per value' if per_value_key else 'one key'}"):
                    rows.append(column_bench(nn, size, per_value_key, force))
    with console.status("5 sealed columns, a key per row"):
        many = rows_bench(args.values // 4)
    ids = pa.array([f"C-{i:012d}" for i in range(args.values)])
    key = os.urandom(32)
    bi = {f: len(ids) / _time(lambda f=f: native.blind_indexes(key, ids, force=f), 1) for f in ("native", "python")}
    with tempfile.TemporaryDirectory() as d:
        store = KeyStore(Path(d) / "keystore.db", LocalKek(os.urandom(32), source="bench"))
        t = time.perf_counter()
        store.subject_keys(ids, keys=True)
        created = len(ids) / (time.perf_counter() - t)
        t = time.perf_counter()
        store.subject_keys(ids, keys=True)
        looked_up = len(ids) / (time.perf_counter() - t)
        store.close()
    result = {"cpus": os.cpu_count(), "openssl_bytes_per_s": limit, "columns": rows, "five_columns": many,
              "blind_indexes_per_s": bi, "subjects_created_per_s": created, "subjects_looked_up_per_s": looked_up}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    console.print(f"written to {args.out}")


def _print(r: dict) -> None:
    lim = r["openssl_bytes_per_s"]
    t = Table(title=f"whole-column AES-256-GCM ({r['cpus']} cores) against openssl speed (1 core)")
    for c in ("backend", "value", "keys", "seal values/s", "seal MB/s", "open values/s", "open MB/s", "openssl MB/s (1 core)",
              "seal / openssl"):
        t.add_column(c, justify="left" if c in ("backend", "keys") else "right")
    for row in r["columns"]:
        size = row["value_bytes"]
        near = min(lim, key=lambda b: abs(b - size)) if lim else None
        ref = lim[near] / 1e6 if near else None
        t.add_row(row["backend"], f"{size} B", "one per value" if row["key_per_value"] else "one for all",
                  f"{row['seal_values_per_s']:,.0f}", f"{row['seal_mb_per_s']:,.1f}",
                  f"{row['open_values_per_s']:,.0f}", f"{row['open_mb_per_s']:,.1f}",
                  f"{ref:,.0f} ({near} B blocks)" if ref else "—", f"{row['seal_mb_per_s'] / ref:.2f}" if ref else "—")
    console.print(t)
    if "five_columns" in r:
        f = r["five_columns"]
        console.print(f"{f['rows']:,} rows × {f['columns']} sealed columns, a key per row: seal_columns "
                      f"{f['seal_columns_values_per_s']:,.0f} values/s, seal_column per column "
                      f"{f['seal_column_x5_values_per_s']:,.0f} values/s")
    console.print(f"blind indexes/s: native {r['blind_indexes_per_s']['native']:,.0f}, "
                  f"Python {r['blind_indexes_per_s']['python']:,.0f}; key store: "
                  f"{r['subjects_created_per_s']:,.0f} subjects created/s, {r['subjects_looked_up_per_s']:,.0f} looked up/s")


if __name__ == "__main__":
    main()
