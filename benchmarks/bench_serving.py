"""Load-test the governed predictor against the stack a user would build without Lakewarden (by hand).

Three KServe ModelServer processes on loopback, one worker each:

* **governed**: ``lakewarden serve`` — token checks, the gate (online lookups audited as runs of
  repeated decisions), Feast online features through :class:`features.store.Features`, the
  registered model, the request log, Prometheus metrics and drift gauges;
* **fair baseline**: KServe + Feast + the same model — the same Feast repository and online store,
  the same features, the same encoder and network, no gate, no audit, no request log, no metrics;
* **constant**: a kserve.Model that returns 0.5 (the floor of the HTTP stack; a second, labelled
  line, not the baseline).

The load generator is ``wrk`` (Debian's package: ``make bench-deps``), native code, so its own
CPU does not decide the figure; its CPU share of the machine is measured (rusage of the wrk
process over the wall time × CPUs) and reported. V1 requests of one entity at concurrency 1, 8
and 32, each for ``--seconds``; ``--rounds`` rounds with the servers' order alternated, and the
median round reported with every round's ratio (the spread).

Goals (issue #16): governed throughput ≥ 0.8 × the fair baseline at concurrency 1, 8 and 32, and
p99 at concurrency 8 ≤ 1.3 × the fair baseline's.
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

CONSTANT = r"""
import sys, kserve
class Constant(kserve.Model):
    def __init__(self):
        super().__init__("constant"); self.ready = True
    async def predict(self, payload, headers=None):
        return {"predictions": [0.5 for _ in payload["instances"]]}
kserve.ModelServer(http_port=int(sys.argv[1]), workers=1, enable_grpc=False).start([Constant()])
"""

# KServe + Feast + the same model: what a user writes without Lakewarden. It reads the registered
# model's files and the workspace's Feast repository (loading only, at start); per request it
# does what the governed predictor does for a known token, minus every governance step.
FAIR = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import kserve, pyarrow as pa, torch
from governance.workspace import Workspace
from features.store import Features
from training.registry import Registry
port, config, ref = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ws = Workspace.open(config)
reg = Registry(ws)
card = reg.card(ref)
loaded = reg.load(card.ref, verify=False)
store = Features(ws).store  # the same feature_store configuration and online store
key = ws.policies.dataset(card.dataset).subject_key
features, columns = list(card.features), [f.split(":", 1)[1] for f in card.features]
model, encoder = loaded.model, loaded.encoder
class Fair(kserve.Model):
    def __init__(self):
        super().__init__("fair")
    def load(self):
        store.get_feature_view(features[0].split(":", 1)[0]); self.ready = True; return True
    async def predict(self, payload, headers=None):
        if isinstance(payload, (bytes, bytearray)):
            payload = json.loads(payload)
        values = store.get_online_features(features=features, entity_rows=[{key: t} for t in payload["instances"]]).to_dict()
        x = encoder.transform(pa.table({c: values[c] for c in columns}))
        with torch.no_grad():
            scores = torch.sigmoid(model(torch.from_numpy(x)).squeeze(-1)).numpy()
        return {"predictions": [float(s) for s in scores]}
m = Fair(); m.load()
kserve.ModelServer(http_port=port, workers=1, enable_grpc=False).start([m])
"""

WRK_LUA = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, "errors": %%d, "non2xx": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, timeout: float = 120, context=None) -> None:  # noqa: ANN001 (an ssl.SSLContext for https)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1, context=context)
            return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"server at {url} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, script: Path, conc: int, seconds: float, server_pid: int) -> dict:
    """One wrk run: throughput, p50/p99, errors, and the CPU shares of wrk and of the server."""
    threads = min(conc, 2)
    server_before = cpu_seconds(server_pid)
    t0 = time.perf_counter()
    p = subprocess.Popen(["wrk", "-t", str(threads), "-c", str(conc), "-d", f"{seconds:g}s", "--timeout", "10s",
                          "-s", str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"wrk failed: {err.strip()}")
    stats = json.loads(out.strip().splitlines()[-1])
    ncpu = os.cpu_count() or 1
    server_cpu = cpu_seconds(server_pid) - server_before
    return {
        "requests": stats["requests"], "errors": stats["errors"] + stats["non2xx"],
        "rps": stats["requests"] / (stats["duration_us"] / 1e6),
        "p50_ms": stats["p50_us"] / 1000, "p99_ms": stats["p99_us"] / 1000,
        "server_cpu_share": server_cpu / (wall * ncpu),
        "wall_s": wall,
    }


def wrk_cpu_share(url: str, script: Path, conc: int, seconds: float) -> float:
    """wrk's own CPU over the wall time × CPUs (a separate short run: rusage of the child)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["wrk", "-t", str(min(conc, 2)), "-c", str(conc), "-d", f"{seconds:g}s", "-s", str(script), url],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    return (ru.ru_utime + ru.ru_stime) / (wall * (os.cpu_count() or 1))


def prepare(root: Path, extra_yaml: str = "") -> tuple[Path, object, str]:
    """A project under ``root`` (policies of this repository, an env-var KEK) with synthetic customers,
    materialized features and ``credit`` trained for credit scoring: (config path, the model's
    training output, one subject token). ``extra_yaml`` is appended to lakewarden.yaml."""
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

    os.environ["LAKEWARDEN_KEK"] = generate_kek_b64()
    config = root / "lakewarden.yaml"
    config.write_text(
        f"version: 1\nname: bench\nstorage: {{root: {root}/tables}}\nworkspace: {root}/ws\n"
        f"keys: {{store: {root}/keys/ks.db, kek: {{provider: env, var: LAKEWARDEN_KEK}}}}\n"
        f"{extra_yaml}policies: [{REPO}/policies/*.yaml]\n")
    with console.status("preparing data, features and a model"):
        res = generate(root / "landing", people=2000, transactions_per_person=0, seed=2)
        ws = Workspace.open(config)
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
    return config, out, token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serving.json")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make bench-deps` (Debian's wrk package)")
    root = Path(tempfile.mkdtemp(prefix="lw-bench-serving-"))
    procs: dict[str, subprocess.Popen] = {}
    rounds: list[list[dict]] = []
    wrk_share: dict[int, float] = {}
    try:
        config, out, token = prepare(root)
        ports = {name: free_port() for name in ("governed", "fair", "constant")}
        env = {**os.environ, "LAKEWARDEN_CONFIG": str(config), "LAKEWARDEN_USER": "mel", "PYTHONPATH": str(REPO)}
        cmds = {
            "governed": [sys.executable, "-m", "lakewarden", "serve", "--model", str(out.ref), "--port", str(ports["governed"])],
            "fair": [sys.executable, "-c", FAIR, str(ports["fair"]), str(config), str(out.ref)],
            "constant": [sys.executable, "-c", CONSTANT, str(ports["constant"])],
        }
        for name, cmd in cmds.items():
            procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)
        model_of = {"governed": "credit", "fair": "fair", "constant": "constant"}
        with console.status("starting three model servers"):
            for name, port in ports.items():
                wait(f"http://127.0.0.1:{port}/v2/models/{model_of[name]}/ready")
        script = root / "post.lua"
        script.write_text(WRK_LUA % json.dumps(json.dumps({"instances": [token]})))
        urls = {n: f"http://127.0.0.1:{p}/v1/models/{model_of[n]}:predict" for n, p in ports.items()}
        for n, u in urls.items():  # each answers, and answers 200
            req = urllib.request.Request(u, data=json.dumps({"instances": [token]}).encode(),
                                         headers={"content-type": "application/json"})
            assert json.loads(urllib.request.urlopen(req, timeout=30).read())["predictions"], n
        for conc in (1, 8, 32):  # warm-up, and wrk's own CPU share against the fair baseline
            load(urls["fair"], script, conc, 2, procs["fair"].pid)
            wrk_share[conc] = wrk_cpu_share(urls["fair"], script, conc, 3)
        for r in range(args.rounds):
            order = ["governed", "fair", "constant"] if r % 2 == 0 else ["fair", "governed", "constant"]
            rows = []
            for conc in (1, 8, 32):
                row: dict = {"concurrency": conc}
                for name in order:
                    with console.status(f"round {r + 1}/{args.rounds}: {name}, concurrency {conc}"):
                        row[name] = load(urls[name], script, conc, args.seconds, procs[name].pid)
                row["ratio_vs_fair"] = row["governed"]["rps"] / row["fair"]["rps"]
                row["ratio_vs_constant"] = row["governed"]["rps"] / row["constant"]["rps"]
                row["p99_vs_fair"] = row["governed"]["p99_ms"] / row["fair"]["p99_ms"]
                rows.append(row)
            rounds.append(rows)
    finally:
        for p in procs.values():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)

    results = []
    for i, conc in enumerate((1, 8, 32)):
        per = [rows[i] for rows in rounds]
        mid = sorted(per, key=lambda r: r["ratio_vs_fair"])[len(per) // 2]
        results.append({**mid, "wrk_cpu_share": wrk_share[conc],
                        "ratio_vs_fair_rounds": [r["ratio_vs_fair"] for r in per],
                        "p99_vs_fair_rounds": [r["p99_vs_fair"] for r in per]})
    t = Table(title=f"V1 predict, one entity per request, loopback, wrk, {os.cpu_count()} CPUs (median round of {args.rounds})")
    for c in ("conc.", "fair rps", "fair p50/p99 ms", "governed rps", "governed p50/p99 ms", "gov/fair (goal ≥ 0.8)",
              "each round", "p99 gov/fair (c8 goal ≤ 1.3)", "constant rps", "gov/constant", "wrk CPU"):
        t.add_column(c, justify="right")
    for r in results:
        f, g, k = r["fair"], r["governed"], r["constant"]
        t.add_row(str(r["concurrency"]), f"{f['rps']:.0f}", f"{f['p50_ms']:.1f} / {f['p99_ms']:.1f}", f"{g['rps']:.0f}",
                  f"{g['p50_ms']:.1f} / {g['p99_ms']:.1f}", f"{r['ratio_vs_fair']:.2f}",
                  ", ".join(f"{x:.2f}" for x in r["ratio_vs_fair_rounds"]), f"{r['p99_vs_fair']:.2f}",
                  f"{k['rps']:.0f}", f"{r['ratio_vs_constant']:.2f}", f"{r['wrk_cpu_share']:.0%}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "issue": 16, "load_generator": "wrk 4.1.0 (Debian)",
                                    "seconds": args.seconds, "rounds": args.rounds, "results": results,
                                    "all_rounds": rounds}, indent=2) + "\n")
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
