"""Load-test the governed predictor against a bare kserve.Model returning a constant (by hand).

Both run as KServe ModelServer processes on loopback; a load generator in a third process
(httpx, asyncio) sends V1 requests of one entity at concurrency 1, 8 and 32, bounded by a
request count and a time limit, and reports p50/p99 latency and throughput.

Goal (issue #6): governed throughput ≥ 0.7× the bare one, p99 ≤ 10 ms at concurrency 8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
console = Console()

BARE = r"""
import sys, kserve
class Bare(kserve.Model):
    def __init__(self):
        super().__init__("bare"); self.ready = True
    async def predict(self, payload, headers=None):
        return {"predictions": [0.5 for _ in payload["instances"]]}
kserve.ModelServer(http_port=int(sys.argv[1]), workers=1, enable_grpc=False).start([Bare()])
"""

LOAD = r"""
import asyncio, json, sys, time, httpx
url, body, conc, total, limit = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
lat, errors = [], 0
async def worker(client, n, deadline):
    global errors
    for _ in range(n):
        if time.perf_counter() > deadline:
            return
        t0 = time.perf_counter()
        r = await client.post(url, content=body, headers={"content-type": "application/json"})
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            errors += 1
async def main():
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for _ in range(20):  # warm-up
            await client.post(url, content=body, headers={"content-type": "application/json"})
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client, total // conc, t0 + limit) for _ in range(conc)))
        return time.perf_counter() - t0
wall = asyncio.run(main())
lat.sort()
print(json.dumps({"n": len(lat), "errors": errors, "rps": len(lat) / wall,
                  "p50_ms": lat[len(lat) // 2] * 1000, "p99_ms": lat[int(len(lat) * 0.99) - 1] * 1000}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"server at {url} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from features.store import Features
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from training.flow import train_model
    from training.trainer import TrainOptions

    root = Path(tempfile.mkdtemp(prefix="lw-bench-serving-"))
    os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
    (root / "lakewarden.yaml").write_text(
        f"version: 1\nname: bench\nstorage: {{root: {root}/tables}}\nworkspace: {root}/ws\n"
        f"keys: {{store: {root}/keys/ks.db, kek: {{provider: env, var: LAKEWARDEN_KEK}}}}\n"
        f"policies: [{REPO}/policies/*.yaml]\n")
    procs = []
    try:
        with console.status("preparing data, features and a model"):
            res = generate(root / "landing", people=2000, transactions_per_person=0, seed=2)
            ws = Workspace.open(root / "lakewarden.yaml")
            ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
            build_silver(ws, ws.actor("dana"), "customers")
            fs = Features(ws)
            fs.apply(ws.actor("pipeline"))
            fs.materialize(ws.actor("pipeline"))
            out = train_model(ws, ws.actor("sam"), name="credit", label="defaulted", purpose="credit_scoring",
                              features=["customer_profile:income", "customer_profile:income_log", "customer_profile:region"],
                              options=TrainOptions(epochs=1, target_epsilon=3.0, accountant="rdp"), mitigate=False)
            token = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"][0].as_py()
            ws.close()
        gport, bport = free_port(), free_port()
        env = {**os.environ, "LAKEWARDEN_CONFIG": str(root / "lakewarden.yaml"), "LAKEWARDEN_USER": "mel"}
        procs.append(subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(out.ref), "--port", str(gport)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        procs.append(subprocess.Popen([sys.executable, "-c", BARE, str(bport)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        wait(f"http://127.0.0.1:{gport}/v2/models/credit/ready")
        wait(f"http://127.0.0.1:{bport}/v2/models/bare/ready")
        body = json.dumps({"instances": [token]})
        results = []
        for conc in (1, 8, 32):
            row = {"concurrency": conc}
            for label, url in (("bare", f"http://127.0.0.1:{bport}/v1/models/bare:predict"),
                               ("governed", f"http://127.0.0.1:{gport}/v1/models/credit:predict")):
                with console.status(f"{label}, concurrency {conc}"):
                    p = subprocess.run([sys.executable, "-c", LOAD, url, body, str(conc), str(args.requests), str(args.seconds)],
                                       capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit(p.stderr)
                row[label] = json.loads(p.stdout.strip().splitlines()[-1])
            row["throughput_ratio"] = row["governed"]["rps"] / row["bare"]["rps"]
            results.append(row)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
    t = Table(title=f"V1 predict, one entity per request, loopback, {os.cpu_count()} CPUs")
    for c in ("concurrency", "bare rps", "bare p50/p99 ms", "governed rps", "governed p50/p99 ms", "ratio (goal ≥ 0.7)"):
        t.add_column(c, justify="right")
    for r in results:
        b, g = r["bare"], r["governed"]
        t.add_row(str(r["concurrency"]), f"{b['rps']:.0f}", f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}", f"{g['rps']:.0f}",
                  f"{g['p50_ms']:.1f} / {g['p99_ms']:.1f}", f"{r['throughput_ratio']:.2f}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
