"""Where a governed customers ingest's time goes: the key store against everything else (run by hand).

A measurement, never a way to run the product. In each round the same CSV (one row per new person,
the heaviest case of issue #15) is timed five ways, each in its own process, alternating:

* ``plain``    ``write_deltalake`` of the CSV, as ``bench_ingest.py``'s plain side;
* ``governed`` the real governed ingest (``lakehouse.ingest.ingest``);
* ``crypto``   the same ingest with the key store's bulk call (``governance.keys.native.
               resolve_subjects``) replaced by its cryptography alone: the blind-index HMAC of
               every id, a random data key per subject, and that key wrapped under the KEK with
               the token as associated data, in the native core, as the key store does them
               (the tokens are random here; the store derives each from its row id with one AES
               block). No look-up, nothing stored: every id is taken as new;
* ``layout``   ``crypto``, and the batch stored in the layout of ``bench_keystore_layout.py``
               (per-batch blobs of wrapped keys, tiered sorted runs of blind indexes, fan-out 8
               or ``--layout-fanout``,
               the key store's pragmas; one writer at a time, as the store's turn): what a key
               store built that way would cost, less its look-ups (every id is new here, as a
               batch of new people mostly is behind the store's filter);
* ``none``     the same ingest with that call replaced by random tokens and keys: a key store
               that costs nothing.

Everything else (validation, tokens in the rows, sealing, quarantine, the bronze and vault Delta
writes, exactly-once commits, audit, lineage) runs as in the product, in a scratch workspace
deleted after. ``none`` is therefore the floor that any key store would sit on, and
``governed - crypto`` is what the key store's storage (SQLite's rows, indexes, merges, its
I/O) costs. CPU seconds (user + system) are reported beside the wall time, since on 2 cores
a side that keeps both busy cannot go faster than half its CPU.

    python benchmarks/bench_ingest_floor.py --size 10000000 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ingest import CONFIG, PLAIN, REPO, _copy, _warm, landing, settle  # noqa: E402

console = Console()

# The stand-ins replace the module attribute the key store calls (``store.py: subject_keys``), so
# the rest of the store (its system keys, its checks) is the real one.
STAND_IN = r"""
import os, sys
import numpy as np
import pyarrow as pa
from governance.keys import native
from governance.keys.native import _col, _mv, _native

MODE = sys.argv[3]
FANOUT = int(sys.argv[4]) if len(sys.argv) > 4 else 8
if MODE == "layout":
    import threading
    sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
    from bench_keystore_layout import open_layout, store_batch
    _LAYOUT, _LAYOUT_LOCK, _NEXT_ID = {}, threading.Lock(), [1]
_LUT = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz234567", np.uint8)
_RNG = np.random.default_rng()

def _tokens(n):
    buf = np.empty((n, 30), np.uint8)
    buf[:, :4] = np.frombuffer(b"sub_", np.uint8)
    buf[:, 4:] = _LUT[_RNG.integers(0, 32, (n, 26), dtype=np.uint8)]
    offsets = np.arange(0, 30 * n + 1, 30, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))

def stand_in(db, bi_key, kek, kek_id, ids, *, create, keys, now, fanout, token_key=None,
             before_turn=None):
    n = len(ids)
    tokens = _tokens(n)
    data_keys = os.urandom(32 * n)
    if MODE in ("crypto", "layout"):
        bis = native.blind_indexes(bi_key, ids)
        wrapped = _native.wrap_keys(_mv(kek), data_keys, b"lakewarden:dek\x00", _col(tokens), None)
        if MODE == "layout":
            with _LAYOUT_LOCK:
                if db not in _LAYOUT:
                    _LAYOUT[db] = open_layout(db + ".layout")
                store_batch(_LAYOUT[db], _NEXT_ID[0], bis, wrapped, FANOUT)
                _NEXT_ID[0] += n
    return tokens, (data_keys if keys else None), n

if MODE != "governed":
    native.resolve_subjects = stand_in
"""

TIMED = r"""
import json, os, sys, time
import pyarrow as pa
from governance.workspace import Workspace
from lakehouse.ingest import ingest
cfg, src = sys.argv[1], sys.argv[2]
ws = Workspace.open(cfg)
ws.gate, ws.lineage
pa.array([0])
t0, c0 = time.perf_counter(), os.times()
rep = ingest(ws, ws.actor("pipeline"), "customers", [src])
ws.close()
c1 = os.times()
seconds = time.perf_counter() - t0
stored = {}
if MODE == "layout":  # untimed: what the layout holds
    stored["layout_subjects"] = sum(c.execute("SELECT coalesce(sum(n), 0) FROM keyblocks").fetchone()[0]
                                    for c in _LAYOUT.values())
print(json.dumps({"rows": rep.rows_read, "accepted": rep.rows_accepted, "seconds": seconds,
                  "cpu_seconds": c1.user - c0.user + c1.system - c0.system, "peak_rss_mb": rep.peak_rss_mb, **stored}))
"""

PLAIN_CPU = "import os\n" + PLAIN.replace("t0 = time.perf_counter()", "t0 = time.perf_counter(); _c0 = os.times()") + (
    "\n_c1 = os.times()\nprint(json.dumps({'cpu_seconds': _c1.user - _c0.user + _c1.system - _c0.system}))\n")

SIDES = ("plain", "governed", "crypto", "layout", "none")


def _run(code: str, args: list[str], env: dict[str, str]) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr)
    out = {}
    for line in p.stdout.strip().splitlines():  # the plain side prints its figures, then its CPU
        out.update(json.loads(line))
    return out


def _side(side: str, src: Path, env: dict[str, str], settle_s: float = 0.0, fanout: int = 8) -> dict:
    root = Path(tempfile.mkdtemp(prefix="lw-bench-floor-"))
    try:
        if side == "plain":
            settle(settle_s)
            return _run(PLAIN_CPU, [str(src), str(root / "plain"), "250000"], env)
        cfg = root / "lakewarden.yaml"
        cfg.write_text(CONFIG.format(root=root, tables=f"{root}/tables", keystore=f"{root}/keys/keystore.db", repo=REPO))
        landing_copy = _copy(src, root)
        _warm(src)
        settle(settle_s)
        out = _run(STAND_IN + TIMED, [str(cfg), str(landing_copy), side, str(fanout)], env)
        if out["accepted"] != out["rows"]:
            raise SystemExit(f"{side}: {out['rows'] - out['accepted']} of {out['rows']} rows were not accepted")
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="customers (rows, every one a new person)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the sides; medians are reported")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait before every timed run (see bench_ingest.py: the VM hands freed memory back)")
    ap.add_argument("--layout-fanout", type=int, default=8,
                    help="the layout side's runs merged into one (a fan-out above the batches never merges)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="which sides to time (plain always)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default results/ingest-floor-<size>.json)")
    args = ap.parse_args()
    from governance.keys import generate_kek_b64
    from governance.keys.native import backend

    if backend() != "native":
        raise SystemExit("the floor is measured on the native core: build it first (make install)")
    env = {**os.environ, "LAKEWARDEN_KEK": generate_kek_b64()}
    src = landing(args.size, 1.0)["customers"]
    sides = [s for s in SIDES if s == "plain" or s in args.sides]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeat):
        for side in sides:
            with console.status(f"round {i + 1}/{args.repeat}: {side}"):
                runs[side].append(_side(side, src, env, args.settle, args.layout_fanout))
    plain = statistics.median(r["seconds"] for r in runs["plain"])
    summary = {}
    t = Table(title=f"governed customers ingest, {args.size:,} new people: the key store against the rest (medians)")
    for c in ("side", "seconds", "CPU seconds", "cores busy", "ratio to plain", "runs (s)"):
        t.add_column(c, justify="left" if c == "side" else "right")
    for side in sides:
        secs = statistics.median(r["seconds"] for r in runs[side])
        cpu = statistics.median(r["cpu_seconds"] for r in runs[side])
        summary[side] = {"seconds": secs, "cpu_seconds": cpu, "ratio": plain / secs,
                         "runs": [r["seconds"] for r in runs[side]]}
        t.add_row(side, f"{secs:.2f}", f"{cpu:.1f}", f"{cpu / secs:.2f}", f"{plain / secs:.2f}",
                  ", ".join(f"{r['seconds']:.1f}" for r in runs[side]))
    console.print(t)
    if {"governed", "crypto", "none"} <= summary.keys():
        console.print(f"the key store's storage: {summary['governed']['seconds'] - summary['crypto']['seconds']:.1f} s; "
                      f"its cryptography: {summary['crypto']['seconds'] - summary['none']['seconds']:.1f} s; "
                      f"everything else: {summary['none']['seconds']:.1f} s (plain {plain:.1f} s)")
    out = args.out or REPO / "benchmarks" / "results" / f"ingest-floor-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "size": args.size, "repeat": args.repeat, "settle": args.settle, "sides": sides,
                               "layout_fanout": args.layout_fanout,
                               "summary": summary, "runs": runs}, indent=2) + "\n")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
