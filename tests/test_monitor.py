"""Drift monitoring: PSI known answers, the request log, reports, the monitor stage, metrics, alert rules."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from governance.errors import AccessDenied
from serving.monitor import (
    CategoricalProfile,
    DriftMetrics,
    NumericProfile,
    Profile,
    RequestRecords,
    drift_report,
    monitor,
    psi,
    psi_categorical,
    read_request_log,
    render_textfile,
    request_log_path,
)

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "infra" / "prometheus" / "alerts.yml"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def token(rng: np.random.Generator) -> str:
    return "sub_" + "".join(_B32[i] for i in rng.integers(0, 32, 26))


# -- PSI known answers ------------------------------------------------------------------------
def test_psi_known_answer_with_empty_bins():
    # Baseline 0..99 in 4 quantile bins: edges 24.75, 49.5, 74.25, each bin 1/4.
    # Current: half at 10 (bin 0), half at 60 (bin 2); bins 1 and 3 empty -> epsilon 1e-4.
    # PSI = 2 (0.5 - 0.25) ln 2 + 2 (1e-4 - 0.25) ln(1e-4 / 0.25)
    assert NumericProfile.from_sample(range(100), bins=4).edges == (24.75, 49.5, 74.25)
    assert psi(list(range(100)), [10] * 50 + [60] * 50, bins=4) == pytest.approx(4.257031786505947, rel=1e-12)


def test_psi_identical_is_zero_and_shifted_normal_is_an_alert():
    rng = np.random.default_rng(7)
    ref = rng.normal(0.0, 1.0, 5000)
    assert psi(ref, ref) == 0.0
    assert psi(ref, rng.normal(0.0, 1.0, 5000)) < 0.02  # sampling noise only
    assert psi(ref, rng.normal(0.0, 1.0, 5000) + 1.0) > 0.25  # one standard deviation: ≈ 0.95


def test_psi_drops_none_and_nan_and_refuses_empty_or_non_numbers():
    assert psi([1, 2, 3, 4, None, math.nan], [1, None, 2, 3, 4, math.nan], bins=2) == 0.0
    with pytest.raises(ValueError, match="current sample has no values"):
        psi([1, 2, 3], [None, math.nan])
    with pytest.raises(ValueError, match="profile sample has no values"):
        psi([], [1.0])
    with pytest.raises(TypeError, match="numeric PSI needs numbers, got str"):
        psi([1, 2, 3], ["north"])
    with pytest.raises(ValueError, match="bins must be an integer >= 2"):
        psi([1, 2, 3], [1], bins=1)


def test_psi_ties_merge_bins_and_a_constant_baseline_still_sees_shifts_both_ways():
    # 50 zeros and 1..50: the lower quantiles are all 0 and merge into one bin of share 1/2.
    ref = NumericProfile.from_sample([0] * 50 + list(range(1, 51)), bins=10)
    assert ref.edges[0] == 0.0 and ref.shares[:2] == (0.0, 0.5)
    # A constant: bins below, at and above the value.
    assert psi([5] * 10, [5] * 3) == 0.0
    assert psi([5] * 10, [6] * 3) == psi([5] * 10, [4] * 3) == pytest.approx((1 - 1e-4) * math.log(1e4) * 2)


def test_psi_categorical_known_answer_with_a_new_category():
    # Baseline a, b 1/2 each; current a, b 1/4 each and c (new, epsilon in the baseline) 1/2.
    # PSI = 2 (0.25 - 0.5) ln(0.5) + (0.5 - 1e-4) ln(0.5 / 1e-4)
    got = psi_categorical(["a"] * 50 + ["b"] * 50, ["a"] * 25 + ["b"] * 25 + ["c"] * 50)
    assert got == pytest.approx(-0.5 * math.log(0.5) + 0.4999 * math.log(5000), rel=1e-12)
    assert got == pytest.approx(4.60431846666895, rel=1e-12)
    assert psi_categorical(["a", "b", None], ["b", "a"]) == 0.0
    assert psi_categorical([True, False], ["true", "false"]) == 0.0  # booleans read as true/false


def test_docstring_examples_run():
    import doctest

    import serving.monitor
    import training.profile

    attempted = failed = 0
    for mod in (serving.monitor, training.profile):  # the profile half lives in training/
        r = doctest.testmod(mod)
        attempted, failed = attempted + r.attempted, failed + r.failed
    assert attempted >= 1 and failed == 0


# -- profile --------------------------------------------------------------------------------
def _training_table(rng: np.random.Generator, n: int = 2000) -> tuple[pa.Table, np.ndarray]:
    income = rng.lognormal(10.8, 0.4, n)
    table = pa.table(
        {
            "customer_token": [token(rng) for _ in range(n)],
            "_subject_bucket": rng.integers(0, 16, n),
            "income": income,
            "income_log": np.log(income),
            "birth_date": rng.integers(1950, 2000, n),
            "region": rng.choice(["north", "south", "east", "west"], n, p=[0.4, 0.3, 0.2, 0.1]).tolist(),
        }
    )
    return table, rng.beta(2, 8, n)


def test_profile_from_table_keeps_summaries_only_and_round_trips_json():
    rng = np.random.default_rng(1)
    table, scores = _training_table(rng)
    ref = Profile.from_table(table, score=scores)
    assert sorted(ref.features) == ["birth_date", "income", "income_log", "region"]  # no token, no _columns
    assert ref.features["income"].kind == "numeric" and len(ref.features["income"].shares) == 10
    assert ref.features["region"].kind == "categorical"
    assert ref.features["region"].shares["north"] == pytest.approx(0.4, abs=0.03)
    text = ref.to_json()
    assert "sub_" not in text and len(text) < 4000  # bin edges and shares, not 2000 rows
    back = Profile.from_json(text)
    assert back == ref and back.to_json() == text
    # The summary gives the same PSI as the raw sample.
    cur = rng.lognormal(11.0, 0.4, 500)
    assert back.features["income"].psi(cur) == pytest.approx(psi(table.column("income").to_pylist(), cur))


def test_profile_from_table_with_a_score_column_and_refusals():
    rng = np.random.default_rng(2)
    table, scores = _training_table(rng, 300)
    table = table.append_column("score", pa.array(scores))
    ref = Profile.from_table(table, score="score", columns=["income", "region"])
    assert sorted(ref.features) == ["income", "region"] and ref.score.count == 300
    with pytest.raises(ValueError, match="column 'customer_token' holds subject tokens"):
        Profile.from_table(table, score="score", columns=["customer_token"])
    with pytest.raises(ValueError, match="3 scores for 300 rows"):
        Profile.from_table(table, score=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="feature 'id' has 300 categories"):
        Profile.from_samples({"id": [f"c{i}" for i in range(300)]}, scores)
    with pytest.raises(TypeError, match="column 'when' has type timestamp"):
        Profile.from_table(pa.table({"when": pa.array([T0] * 3)}), score=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="not a drift profile of format"):
        Profile.from_json('{"format": "something-else/1"}')


# -- request log --------------------------------------------------------------------------
def _record(rng: np.random.Generator, ts: datetime, *, income: float, region: str, score: float, **extra) -> dict:
    features = {"income": income, "income_log": math.log(income), "birth_date": int(rng.integers(1950, 2000)),
                "region": region, **extra}
    return {"ts": ts.isoformat().replace("+00:00", "Z"), "model": "credit", "version": 1, "token": token(rng),
            "features": features, "score": score}


def test_read_request_log_skips_and_counts_malformed_lines(tmp_path: Path):
    rng = np.random.default_rng(3)
    good = [_record(rng, T0 + timedelta(minutes=i), income=50000.0 + i, region="north", score=0.1) for i in range(5)]
    other = dict(good[0], model="fraud")
    lines = [json.dumps(r).encode() for r in good[:3]] + [
        b"not json",
        b"[1, 2, 3]",
        json.dumps({"model": "credit", "features": {}}).encode(),  # no ts
        json.dumps({"ts": "yesterday", "features": {}}).encode(),  # unparseable ts
        json.dumps({"ts": "2025-03-01T12:00:00Z", "features": [1]}).encode(),  # features not an object
        b'{"ts": "2025-03-01T12:00:00Z", "features": {"region": "\xff"}}',  # invalid UTF-8
        b"",
        json.dumps(other).encode(),
        json.dumps(good[3]).encode(),
        json.dumps(good[4]).encode()[:40],  # a line cut short by a crash
    ]
    path = tmp_path / "credit.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    recs = read_request_log(path, model="credit")
    assert isinstance(recs, RequestRecords) and isinstance(recs, list)
    assert [r["token"] for r in recs] == [r["token"] for r in (*good[:3], good[3])]
    assert (recs.lines, recs.malformed, recs.filtered) == (12, 7, 1)
    assert recs[0]["_ts"] == T0
    later = read_request_log(path, since=T0 + timedelta(minutes=2))
    assert [r["_ts"] for r in later] == [T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)]
    assert later.filtered == 3  # two older credit records and the fraud one (older too)
    naive = read_request_log(path, since=datetime(2025, 3, 1, 12, 2))  # naive: taken as UTC
    assert len(naive) == 2
    with pytest.raises(FileNotFoundError):
        read_request_log(tmp_path / "missing.jsonl")


# -- drift report -------------------------------------------------------------------------
@pytest.fixture
def profile() -> Profile:
    rng = np.random.default_rng(4)
    income = rng.normal(50000.0, 10000.0, 4000)
    return Profile.from_samples(
        {
            "income": income.tolist(),
            "income_log": np.log(np.abs(income) + 1).tolist(),
            "region": ["north"] * 2000 + ["south"] * 2000,
            "birth_date": rng.integers(1950, 2000, 4000).tolist(),
        },
        rng.beta(2, 8, 4000),
    )


def _traffic(n: int, *, income_shift: float, north: float, seed: int = 5, extra: dict | None = None) -> list[dict]:
    """Requests: income shifted by ``income_shift`` standard deviations, ``north`` share of north."""
    rng = np.random.default_rng(seed)
    out = []
    n_north = round(n * north)
    for i in range(n):
        inc = float(rng.normal(50000.0 + income_shift * 10000.0, 10000.0))
        out.append(_record(rng, T0 + timedelta(seconds=i), income=inc, region="north" if i < n_north else "south",
                           score=float(rng.beta(2, 8)), **(extra or {})))
    return out


def test_drift_report_statuses_and_counts(profile: Profile):
    recs = _traffic(1000, income_shift=1.0, north=0.66, extra={"new_feature": 1})
    for r in recs[:10]:
        del r["features"]["birth_date"]
    recs[10]["features"]["income_log"] = "oops"
    recs[11]["score"] = None
    rep = drift_report(profile, recs, model="credit", now=T0)
    f = rep.features
    # region: 0.66 / 0.34 against 0.5 / 0.5 -> 0.16 ln(1.32) + 0.16 ln(0.5 / 0.34) ≈ 0.106: warn.
    assert f["region"].psi == pytest.approx(0.16 * math.log(0.66 / 0.5) + 0.16 * math.log(0.5 / 0.34))
    assert f["region"].status == "warn"
    assert f["income"].status == "alert" and f["income"].psi > 0.25
    assert f["income_log"].status == "alert" and f["income_log"].invalid == 1 and f["income_log"].count == 999
    assert f["birth_date"].status == "ok" and (f["birth_date"].missing, f["birth_date"].count) == (10, 990)
    assert rep.score.status == "ok" and rep.score.missing == 1
    assert rep.status == "alert" and rep.alerts == ("income", "income_log")
    assert rep.records == 1000 and rep.versions == {"1": 1000} and rep.unexpected_features == ("new_feature",)
    assert (rep.window_start, rep.window_end) == (T0, T0 + timedelta(seconds=999))
    d = rep.to_dict()
    assert d["features"]["region"] == {"kind": "categorical", "psi": round(f["region"].psi, 6), "status": "warn",
                                       "count": 1000, "missing": 0, "invalid": 0}
    assert d["status"] == "alert" and d["alerts"] == ["income", "income_log"] and d["computed_at"] == T0.isoformat()
    assert "sub_" not in json.dumps(d)


def test_drift_report_no_data_min_records_and_thresholds(profile: Profile):
    rep = drift_report(profile, [], model="credit", now=T0)
    assert rep.status == "no_data" and all(x.psi is None for x in rep.features.values()) and rep.records == 0
    small = _traffic(20, income_shift=0.0, north=0.5)
    rep = drift_report(profile, small, min_records=50, now=T0)
    assert {x.status for x in rep.features.values()} == {"no_data"} and rep.features["income"].psi is not None
    calm = drift_report(profile, _traffic(1000, income_shift=0.0, north=0.5), now=T0)
    assert calm.status == "ok" and calm.alerts == ()
    strict = drift_report(profile, _traffic(1000, income_shift=0.0, north=0.66), thresholds={"warn": 0.01, "alert": 0.05})
    assert strict.features["region"].status == "alert"
    with pytest.raises(ValueError, match="0 < warn <= alert"):
        drift_report(profile, [], thresholds={"warn": 0.3, "alert": 0.2})
    with pytest.raises(ValueError, match="exactly 'warn' and 'alert'"):
        drift_report(profile, [], thresholds={"warn": 0.1})


def test_drift_report_reads_malformed_count_from_the_log(profile: Profile, tmp_path: Path):
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _traffic(50, income_shift=0.0, north=0.5)) + "\n{broken\n")
    rep = drift_report(profile, read_request_log(path), now=T0)
    assert rep.records == 50 and rep.malformed == 1 and rep.to_dict()["malformed"] == 1


# -- the monitor stage ----------------------------------------------------------------------
class _Hook:
    """A webhook receiver on 127.0.0.1 answering ``status`` (and ``location`` for redirects)."""

    def __init__(self, status: int = 200, location: str | None = None) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                hook.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                hook.headers.append(dict(self.headers))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/s3cr3tpath"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Hook":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _write_log(ws, recs: list[dict]) -> Path:
    path = request_log_path(ws, "credit")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + "garbage\n")
    return path


def _events(ws, action: str) -> list[dict]:
    return ws.audit.query(action=action).to_pylist()


def test_monitor_audits_drift_and_alerts_without_tokens(workspace, profile: Profile):
    recs = _traffic(600, income_shift=1.0, north=0.5)
    _write_log(workspace, recs)
    mel = workspace.actor("mel")
    rep = monitor(workspace, mel, model="credit", profile=profile, now=T0)
    assert rep.status == "alert" and rep.records == 600 and rep.malformed == 1 and rep.model == "credit"

    (drift,) = _events(workspace, "monitor.drift")
    assert (drift["actor"], drift["outcome"], drift["stage"], drift["resource"]) == ("mel", "alert", "serve", "model:credit")
    assert drift["rule_ids"] == "roles/ml_engineer/stages/serve"
    det = json.loads(drift["details"])
    assert det["records"] == 600 and det["malformed"] == 1
    assert det["features"]["income"]["status"] == "alert"
    assert det["features"]["income"]["psi"] == round(rep.features["income"].psi, 6)
    assert det["score"]["status"] == "ok"

    alerts = _events(workspace, "monitor.alert")
    assert sorted(json.loads(a["details"])["feature"] for a in alerts) == sorted(rep.alerts)
    assert all(a["outcome"] == "alert" for a in alerts) and "income" in rep.alerts

    everything = workspace.audit.query().to_pylist()
    assert not [e for e in everything if "sub_" in json.dumps(e, default=str)]
    assert not any(r["token"] in json.dumps(everything, default=str) for r in recs)
    assert workspace.audit.redactions == 0
    (gate,) = [e for e in everything if e["action"] == "gate.decide"]
    assert gate["outcome"] == "allow" and gate["stage"] == "serve"


def test_monitor_is_gated(workspace, profile: Profile):
    with pytest.raises(AccessDenied) as e:
        monitor(workspace, workspace.actor("ana"), model="credit", profile=profile)
    assert e.value.decision.rule_ids == ("roles/stages/serve",)
    assert _events(workspace, "monitor.drift") == []


def test_monitor_without_traffic_reports_no_data(workspace, profile: Profile):
    rep = monitor(workspace, workspace.actor("mel"), model="credit", profile=profile, now=T0)
    assert rep.status == "no_data" and rep.records == 0
    assert [e["outcome"] for e in _events(workspace, "monitor.drift")] == ["no_data"]
    with pytest.raises(FileNotFoundError):
        monitor(workspace, workspace.actor("mel"), model="credit", profile=profile, log_path="/nonexistent.jsonl")
    with pytest.raises(ValueError, match="model name"):
        monitor(workspace, workspace.actor("mel"), model="../etc", profile=profile)
    with pytest.raises(ValueError, match="webhook must be an http"):
        monitor(workspace, workspace.actor("mel"), model="credit", profile=profile, webhook="file:///etc/passwd")


def test_monitor_posts_the_report_to_the_webhook(workspace, profile: Profile):
    _write_log(workspace, _traffic(300, income_shift=1.0, north=0.5))
    with _Hook() as hook:
        rep = monitor(workspace, workspace.actor("mel"), model="credit", profile=profile,
                      webhook=hook.url, timeout=30, now=T0)
    (body,) = hook.bodies
    assert json.loads(body) == rep.to_dict()
    assert hook.headers[0]["Content-Type"] == "application/json"
    (ev,) = _events(workspace, "monitor.webhook")
    assert ev["outcome"] == "ok"
    host = hook.url.split("/hooks")[0]
    assert json.loads(ev["details"]) == {"endpoint": host, "http_status": 200, "status": "alert"}
    assert "s3cr3tpath" not in json.dumps(workspace.audit.query().to_pylist(), default=str)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("500", {"error": "HTTPError", "http_status": 500}),
        ("redirect", {"error": "HTTPError", "http_status": 302}),
        ("refused", {"error": "URLError"}),
    ],
)
def test_a_failing_webhook_is_audited_not_raised(workspace, profile: Profile, kind: str, expected: dict):
    _write_log(workspace, _traffic(100, income_shift=0.0, north=0.5))
    if kind == "refused":
        with _Hook() as hook:
            url = hook.url
        # the server is closed: nothing listens on the port any more
    else:
        hook = _Hook(500) if kind == "500" else _Hook(302, location="http://127.0.0.1:9/elsewhere")
        with hook:
            url = hook.url
            rep = monitor(workspace, workspace.actor("mel"), model="credit", profile=profile, webhook=url, timeout=30)
        assert len(hook.bodies) == 1  # the redirect was not followed
    if kind == "refused":
        rep = monitor(workspace, workspace.actor("mel"), model="credit", profile=profile, webhook=url, timeout=30)
    assert rep.records == 100
    (ev,) = _events(workspace, "monitor.webhook")
    assert ev["outcome"] == "error"
    assert json.loads(ev["details"]) == {"endpoint": url.split("/hooks")[0], "status": rep.status, **expected}
    assert len(_events(workspace, "monitor.drift")) == 1


# -- Prometheus -----------------------------------------------------------------------------
def test_drift_metrics_export_psi_with_model_and_feature_labels(profile: Profile):
    registry = CollectorRegistry()
    metrics = DriftMetrics(registry)
    rep = drift_report(profile, _traffic(500, income_shift=1.0, north=0.66), model="credit", now=T0)
    metrics.observe(rep)
    for name, f in rep.features.items():
        assert registry.get_sample_value("lakewarden_feature_psi", {"model": "credit", "feature": name}) == f.psi
    assert registry.get_sample_value("lakewarden_score_psi", {"model": "credit"}) == rep.score.psi
    assert registry.get_sample_value("lakewarden_drift_records", {"model": "credit"}) == 500
    assert registry.get_sample_value("lakewarden_drift_last_run_timestamp_seconds", {"model": "credit"}) == T0.timestamp()

    # A second DriftMetrics on the same registry (the global REGISTRY) reuses the gauges.
    again = DriftMetrics(registry)
    # No traffic now: the PSI series disappear instead of staying at stale values.
    again.observe(drift_report(profile, [], model="credit", now=T0 + timedelta(hours=1)))
    assert registry.get_sample_value("lakewarden_feature_psi", {"model": "credit", "feature": "income"}) is None
    assert registry.get_sample_value("lakewarden_score_psi", {"model": "credit"}) is None
    assert registry.get_sample_value("lakewarden_drift_records", {"model": "credit"}) == 0
    with pytest.raises(ValueError, match="names no model"):
        metrics.observe(drift_report(profile, []))


def test_render_textfile_is_prometheus_exposition(profile: Profile):
    rep = drift_report(profile, _traffic(500, income_shift=1.0, north=0.5), model="credit", now=T0)
    text = render_textfile(rep)
    assert "# TYPE lakewarden_feature_psi gauge" in text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    got = {s.labels["feature"]: s.value for s in fams["lakewarden_feature_psi"].samples}
    assert got == pytest.approx({n: f.psi for n, f in rep.features.items()})
    assert [s.labels for s in fams["lakewarden_score_psi"].samples] == [{"model": "credit"}]


def test_alert_rules_use_the_exported_metric_names():
    kserve_metrics = pytest.importorskip("kserve.metrics")
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert set(rules) >= {"FeatureDrift", "FeatureDriftWarning", "ScoreDrift", "PredictorHighLatency", "PredictorDown"}
    assert all(r["annotations"].get("summary") and r["annotations"].get("description") for r in rules.values())
    exported = {m.name for m in DriftMetrics().registry.collect()}
    assert {"lakewarden_feature_psi", "lakewarden_score_psi", "lakewarden_drift_last_run_timestamp_seconds"} <= exported
    assert rules["FeatureDrift"]["expr"] == "lakewarden_feature_psi > 0.25"
    assert rules["ScoreDrift"]["expr"] == "lakewarden_score_psi > 0.25"
    hist = kserve_metrics.PREDICT_HIST_TIME
    assert hist._name == "request_predict_seconds" and hist._labelnames == ("model_name",)
    assert f"{hist._name}_bucket" in rules["PredictorHighLatency"]["expr"]


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("LAKEWARDEN_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is not installed and LAKEWARDEN_REQUIRE_PROMTOOL=1 (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus); set LAKEWARDEN_REQUIRE_PROMTOOL=1 to require it")
    return found


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


FEATURE_DRIFT_ANNOTATIONS = {
    "summary": "Feature income of model credit has drifted (PSI 0.40)",
    "description": (
        "The Population Stability Index of feature income against the training profile of model credit has been "
        "above 0.25 for 15 minutes (now 0.40). Live inputs no longer look like the training data: check the upstream "
        "feature pipeline, then consider retraining. The monitor.drift and monitor.alert audit events hold the counts."
    ),
}


def test_promtool_unit_test_feature_drift_fires_after_15_minutes(tmp_path: Path):
    promtool = _promtool()
    income = {"severity": "page", "model": "credit", "feature": "income"}
    spec = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'lakewarden_feature_psi{model="credit",feature="income"}', "values": "0.4x30"},
                    {"series": 'lakewarden_feature_psi{model="credit",feature="region"}', "values": "0.05x30"},
                    {"series": 'lakewarden_score_psi{model="credit"}', "values": "0.02x30"},
                    # 10 requests a minute, all between 0.1 s and 1 s: p99 = 0.1 + 0.99 × 0.9 = 0.991 s.
                    {"series": 'request_predict_seconds_bucket{model_name="credit",le="0.1"}', "values": "0x30"},
                    {"series": 'request_predict_seconds_bucket{model_name="credit",le="1"}', "values": "0+10x30"},
                    {"series": 'request_predict_seconds_bucket{model_name="credit",le="+Inf"}', "values": "0+10x30"},
                    {"series": 'up{job="lakewarden-predictor",instance="predictor:8080"}', "values": "1x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "FeatureDrift", "exp_alerts": []},  # pending, not firing yet
                    {"eval_time": "20m", "alertname": "FeatureDrift",
                     "exp_alerts": [{"exp_labels": income, "exp_annotations": FEATURE_DRIFT_ANNOTATIONS}]},
                    {"eval_time": "20m", "alertname": "FeatureDriftWarning", "exp_alerts": []},  # needs 30m
                    {"eval_time": "20m", "alertname": "ScoreDrift", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "PredictorDown", "exp_alerts": []},
                    {"eval_time": "5m", "alertname": "PredictorHighLatency", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "PredictorHighLatency", "exp_alerts": [{
                        "exp_labels": {"severity": "warning", "model_name": "credit"},
                        "exp_annotations": {
                            "summary": "Predictor credit is slow (p99 predict 991ms)",
                            "description": (
                                "The 99th percentile of KServe predict latency (request_predict_seconds) of model "
                                "credit has been above 0.5 s for 10 minutes (now 991ms). Check the pod CPU/GPU, the "
                                "feature-store lookups and the replica count."
                            ),
                        },
                    }]},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_reading_only_the_tail_of_a_request_log(tmp_path):
    from serving.monitor import read_request_log

    p = tmp_path / "r.jsonl"
    line = '{"ts": "2026-01-01T00:00:00+00:00", "model": "m", "token": "sub_%s", "features": {"x": 1}, "score": 0.5}\n' % (
        "a" * 26)
    p.write_text(line * 1000)
    full = read_request_log(p)
    tail = read_request_log(p, tail_bytes=len(line) * 10 + 5)
    assert len(full) == 1000 and len(tail) == 10 and tail.malformed == 0
