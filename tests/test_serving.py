"""Serving end to end: KServe's ModelServer with the governed predictor on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import lw_in
from serving_helpers import FAIR, FEATURES, approved_copy, free_port, start_predictor, trained_workspace

from governance.errors import AccessDenied
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.synth import generate
from serving.model import GovernedPredictor
from training.registry import Registry

# slow: every test here uses ``served`` (train a model, start a predictor process: 24-28 s before the first test)
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]


def post(url: str, body: bytes | dict, *, ctype: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A model trained for credit scoring, served as mel over plain HTTP (auth off): (ws, url, ref, tokens)."""
    ws, ref = trained_workspace(tmp_path_factory.mktemp("serve"), name="servetest", kek_var="SERVE_TEST_KEK", people=800)
    server = start_predictor(ws.config.source, ref, timeout=90)
    tokens = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
    yield ws, server.url, ref, tokens
    server.stop()
    ws.close()


def test_both_protocols_answer_with_the_direct_scores(served):
    ws, url, ref, tokens = served
    sample = tokens[:20]
    pred = GovernedPredictor(ws, ref, ws.actor("mel"), log_requests=False)
    assert "store" not in vars(pred.features)
    assert pred.load() and "store" in vars(pred.features)  # ready means Feast is open: no cold first request
    direct = pred.score_tokens(sample)
    code, v1 = post(f"{url}/v1/models/credit:predict", {"instances": sample})
    assert code == 200 and np.allclose(v1["predictions"], direct, atol=1e-6)
    code, v1b = post(f"{url}/v1/models/credit:predict", {"instances": [{"customer_id": t} for t in sample]})
    assert code == 200 and v1b["predictions"] == v1["predictions"]
    code, v2 = post(f"{url}/v2/models/credit/infer",
                    {"inputs": [{"name": "customer_id", "shape": [len(sample)], "datatype": "BYTES", "data": sample}]})
    assert code == 200 and np.allclose(v2["outputs"][0]["data"], direct, atol=1e-6)


def test_the_drift_window_is_in_memory_without_tokens_and_refreshes_off_the_request_path(served):
    ws, url, ref, tokens = served
    pred = GovernedPredictor(ws, ref, ws.actor("mel"), log_requests=False)
    pred.load()
    now = [1000.0]
    pred.clock = lambda: now[0]  # the interval on an injected clock: a slow machine changes nothing
    known = tokens[:-2]
    batch = (known * (1000 // len(known) + 1))[:1000]
    pred.score_tokens(batch)  # the first 1,000: the gauges are computed at once
    first = pred._drift_at
    assert first is not None and len(pred.recent) == 1000
    assert all(set(r) == {"features", "score", "version"} for r in pred.recent)  # no token is kept
    assert not any(t in repr(list(pred.recent)) for t in known)
    now[0] += pred.drift_interval - 0.5
    pred.score_tokens(batch)  # within the interval: no new report
    assert pred._drift_at == first
    now[0] += 1.0
    pred.score_tokens(batch)  # due: computed in a background thread
    assert pred._drift_busy.acquire(timeout=30)  # wait for it (bounded)
    pred._drift_busy.release()
    assert pred._drift_at > first and len(pred.recent) == 3000
    report = pred.refresh_drift()
    assert report.records == 3000 and report.versions == {str(pred.card.version): 3000}


def test_the_registry_loads_what_the_predictor_serves(served):
    """Serving's one way into a trained model: Registry.load (card, encoder, torch model, threshold, profile)."""
    from training.registry import LoadedModel, Profile, Registry
    from training.trainer import predict_proba

    ws, url, ref, tokens = served
    reg = Registry(ws)
    m = reg.load(ref)
    assert isinstance(m, LoadedModel) and m.ref == reg.card(ref).ref and m.card == reg.card(ref)
    pre = m.card.preprocessing
    assert m.threshold == pre["threshold"] and m.encoder.to_dict() == pre["encoder"]
    assert isinstance(m.profile, Profile) and m.profile == reg.profile(ref)
    assert sorted(m.profile.features) == sorted(f.split(":", 1)[1] for f in m.card.features)
    X = np.random.default_rng(0).normal(size=(5, pre["n_features"])).astype(np.float32)
    blob = (reg.path(ref) / "model.pt").read_bytes()
    want = predict_proba(blob, X, n_features=pre["n_features"], hidden=tuple(pre["hidden"]))
    assert np.array_equal(m.predict_proba(X), want)


BAD = [
    ("malformed JSON", b"{not json", 400, "request format"),
    ("no instances", {"rows": []}, 400, "instances"),
    ("empty instances", {"instances": []}, 400, "non-empty"),
    ("wrong type", {"instances": [42]}, 400, "token string"),
    ("not a token", {"instances": ["C-000000001"]}, 400, "not subject tokens"),
    ("too many", {"instances": ["sub_" + "a" * 26] * 1001}, 400, "at most 1000"),
    ("unknown entity", {"instances": ["sub_" + "b" * 26]}, 404, "unknown subject"),
]


@pytest.mark.parametrize("case,body,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(served, case, body, code, words):
    ws, url, ref, tokens = served
    got, resp = post(f"{url}/v1/models/credit:predict", body)
    assert got == code and words in resp.get("error", ""), resp
    ok, _ = post(f"{url}/v1/models/credit:predict", {"instances": tokens[:1]})
    assert ok == 200


def test_v2_shape_and_type_errors_unknown_model_and_oversized_body(served):
    ws, url, ref, tokens = served
    for inp, words in (
        ({"name": "id", "shape": [1], "datatype": "BYTES", "data": tokens[:1]}, "must be named"),
        ({"name": "customer_id", "shape": [1], "datatype": "FP32", "data": [1.0]}, "datatype BYTES"),
        ({"name": "customer_id", "shape": [2], "datatype": "BYTES", "data": tokens[:1]}, "shape"),
    ):
        code, resp = post(f"{url}/v2/models/credit/infer", {"inputs": [inp]})
        assert code == 400 and words in json.dumps(resp), resp
    code, _ = post(f"{url}/v1/models/nope:predict", {"instances": tokens[:1]})
    assert code == 404
    # A body declared over the limit is refused on its headers: the answer comes before the body is sent
    # (sending 2 MB first races the server closing the connection after its 413: a broken pipe, not a status).
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/models/credit:predict")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(2 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and b"request body over" in r.read()
    conn.close()
    # the same body sent chunked, without a Content-Length, is cut off as it streams in
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/models/credit:predict", body=(b"x" * 65536 for _ in range(32)),
                 headers={"content-type": "application/json"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and b"request body over" in r.read()
    conn.close()
    assert post(f"{url}/v1/models/credit:predict", {"instances": tokens[:1]})[0] == 200


def test_erased_subjects_are_not_served(served):
    ws, url, ref, tokens = served
    victim, other = tokens[-1], tokens[-2]
    assert post(f"{url}/v1/models/credit:predict", {"instances": [victim]})[0] == 200
    from features.erasure import HANDLER
    from governance.erasure import ErasureContext

    HANDLER.erase(ws, ErasureContext("req_test", [victim]))  # the features handler, as a request's erase step runs it
    code, resp = post(f"{url}/v1/models/credit:predict", {"instances": [victim]})
    assert code == 404 and victim in resp["error"] and "erased" in resp["error"]
    assert post(f"{url}/v1/models/credit:predict", {"instances": [other]})[0] == 200


def test_request_log_holds_tokens_never_identifiers(served):
    ws, url, ref, tokens = served
    post(f"{url}/v1/models/credit:predict", {"instances": tokens[:3]})
    log = ws.config.workspace_dir / "serving" / "requests" / "credit.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert lines and all(r["token"].startswith("sub_") for r in lines)
    assert "C-0" not in log.read_text() and "@example" not in log.read_text()


def test_deploy_gate_refuses_unapproved_and_over_budget_models(served, tmp_path: Path):
    from governance.gate import Resource

    ws, url, ref, tokens = served
    reg = Registry(ws)
    trained = reg.card(ref)
    files = {"model.pt": (reg.path(ref) / "model.pt").read_bytes(), "encoder.json": (reg.path(ref) / "encoder.json").read_bytes()}
    base = {"purpose": "credit_scoring", "features": FEATURES, "label": "defaulted",
            "preprocessing": dict(trained.preprocessing), "fairness": FAIR}
    fair = reg.register(ws.actor("sam"), name="credit", dataset="customers", files=files,
                        card_fields={**base, "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}})
    greedy = reg.register(ws.actor("sam"), name="credit", dataset="customers", files=files,
                          card_fields={**base, "privacy": {"epsilon": 12.0, "delta": 1e-5, "accountant": "rdp"}})
    from serving.deploy import deploy

    with pytest.raises(AccessDenied, match="customers/deployment/approvals"):
        deploy(ws, ws.actor("mel"), fair, target="k8s", out_dir=tmp_path)
    reg.approve(ws.actor("carla"), fair)
    reg.approve(ws.actor("carla"), greedy)
    with pytest.raises(AccessDenied, match="customers/deployment/max_epsilon"):
        deploy(ws, ws.actor("mel"), greedy, target="k8s", out_dir=tmp_path)
    with pytest.raises(AccessDenied, match="customers/fairness"):
        deploy(ws, ws.actor("mel"), ref, target="k8s", out_dir=tmp_path)  # the trained one: fairness failed or unapproved
    res = deploy(ws, ws.actor("mel"), fair, target="k8s", out_dir=tmp_path)
    assert Path(res.manifest).exists() and reg.card(fair).status == "deployed"
    port = free_port()
    res = deploy(ws, ws.actor("mel"), fair, target="local", port=port)
    try:
        code, v1 = post(f"{res.url}/v1/models/credit:predict", {"instances": tokens[:2]})
        assert code == 200 and len(v1["predictions"]) == 2
        again = deploy(ws, ws.actor("mel"), fair, target="local", port=port)  # this workspace's server of this model
        assert again.existing and again.pid == res.pid
    finally:
        os.killpg(res.pid, signal.SIGTERM)
    assert not ws.gate.decide("deploy", ws.actor("carla"), Resource.model("credit", fair.version),
                              reg.deploy_context(fair)).allowed  # carla may not deploy (stage)


def test_metrics_and_drift_monitoring(served):
    ws, url, ref, tokens = served
    for i in range(0, 1000, 100):  # 1000 scored entities: the server refreshes its drift gauges
        assert post(f"{url}/v1/models/credit:predict", {"instances": (tokens[:-2] * 2)[i:i + 100]})[0] == 200
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert 'lakewarden_prediction_score_bucket{le="0.5",model="credit"}' in metrics
    assert "request_predict_seconds_bucket" in metrics  # KServe's own
    assert 'lakewarden_feature_psi{feature="income",model="credit"}' in metrics
    # monitor reads the request log the server wrote: the command in this process will do
    env = {"LAKEWARDEN_CONFIG": str(ws.config.source)}
    p = lw_in(ws.config.base_dir, "monitor", "--model", str(ref), "--min-records", "10", user="mel", env=env)
    assert p.returncode == 0, p.stderr
    assert "income" in p.stdout and "score" in p.stdout
    p = lw_in(ws.config.base_dir, "monitor", "--model", str(ref), user="ana", env=env)
    assert p.returncode == 3 and "Traceback" not in p.stderr


def test_a_server_for_an_identity_that_may_not_serve_refuses_to_start(served):
    ws, url, ref, tokens = served
    # a subprocess: were the refusal to regress, the server would start and serve in this process
    env = {**os.environ, "LAKEWARDEN_CONFIG": str(ws.config.source), "LAKEWARDEN_USER": "ana"}
    p = subprocess.run([sys.executable, "-m", "lakewarden", "serve", "--model", str(ref), "--port", str(free_port())],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and "roles/stages/serve" in p.stderr and "Traceback" not in p.stderr


def test_deploy_never_adopts_a_predictor_of_another_workspace(served, tmp_path: Path):
    """A predictor on the port is used only if it says it is this workspace's, serving this model."""
    import shutil

    from governance.identity import ForeignServer, workspace_id
    from serving.deploy import DeployError, deploy
    from serving.identity import read_identity

    ws, url, ref, tokens = served
    port = int(url.rsplit(":", 1)[1])
    assert read_identity(port) == {"workspace_id": workspace_id(ws.config), "model": str(ref),
                                   "pid": read_identity(port)["pid"]}
    fair = approved_copy(ws, ref)
    with pytest.raises(DeployError, match=f"already serves {ref} for this workspace, not {fair}"):
        deploy(ws, ws.actor("mel"), fair, target="local", port=port)
    ws.audit.flush()
    shutil.copytree(ws.config.base_dir, tmp_path / "copy", ignore=shutil.ignore_patterns("landing"))
    copy = Workspace.open(tmp_path / "copy" / "lakewarden.yaml")  # the same files in another folder: another workspace
    assert workspace_id(copy.config) != workspace_id(ws.config)
    with pytest.raises(ForeignServer) as e:
        deploy(copy, copy.actor("mel"), fair, target="local", port=port)
    msg = str(e.value)
    assert e.value.exit_code == 2 and f"127.0.0.1:{port}" in msg and workspace_id(ws.config) in msg, msg
    assert str(ws.config.workspace_dir.resolve()) in msg and workspace_id(copy.config) in msg, msg
    assert Registry(copy).card(fair).status != "deployed" and Registry(ws).card(fair).status != "deployed"
    copy.close()


# -- scoring by the subject's own id ----------------------------------------------------------
def _ids(tmp_path: Path, n: int) -> list[str]:
    """The first ids of the fixture's customers: the generator is deterministic (same seed, same people)."""
    import csv

    res = generate(tmp_path / "again", people=800, transactions_per_person=0, seed=4, bias=0.3)
    with open(res.files["customers"], newline="") as fh:
        return [r["customer_id"] for r, _ in zip(csv.DictReader(fh), range(n))]


def test_a_subject_can_be_scored_by_its_own_id_on_both_protocols(served, tmp_path: Path):
    ws, url, ref, tokens = served
    ids = _ids(tmp_path, 4)
    toks = ws.keyring.tokens_for(ids, create=False)
    assert all(toks)
    code, by_token = post(f"{url}/v1/models/credit:predict", {"instances": toks})
    assert code == 200
    code, by_id = post(f"{url}/v1/models/credit:predict", {"instances": [{"subject_id": i} for i in ids]})
    assert code == 200 and "errors" not in by_id and np.allclose(by_id["predictions"], by_token["predictions"], atol=1e-6)
    # ids and tokens mixed, an id nobody has: a per-instance error, the others scored, the id never repeated
    unknown = "C-999999999"
    code, mixed = post(f"{url}/v1/models/credit:predict",
                       {"instances": [toks[0], {"subject_id": unknown}, {"customer_id": toks[1]}, {"subject_id": ids[2]}]})
    assert code == 200, mixed
    p = mixed["predictions"]
    assert p[1] is None and np.allclose([p[0], p[2], p[3]], [by_token["predictions"][i] for i in (0, 1, 2)], atol=1e-6)
    assert mixed["errors"] == [{"instance": 1, "error": "unknown subject: the key store has no such id (never ingested, or erased)"}]
    assert unknown not in json.dumps(mixed)
    code, v2 = post(f"{url}/v2/models/credit/infer", {"inputs": [
        {"name": "subject_id", "shape": [3], "datatype": "BYTES", "data": [ids[0], unknown, ids[3]]}]})
    assert code == 200, v2
    out = {o["name"]: o for o in v2["outputs"]}
    score, err = out["score"]["data"], out["error"]["data"]
    assert np.isclose(score[0], by_token["predictions"][0], atol=1e-6) and np.isclose(score[2], by_token["predictions"][3], atol=1e-6)
    assert score[1] is None or np.isnan(score[1])
    assert err[0] == "" and err[2] == "" and err[1].startswith("unknown subject") and unknown not in json.dumps(v2)
    for body, words in (({"instances": [{"subject_id": ""}]}, "non-empty text"),
                        ({"instances": [{"subject_id": 7}]}, "must be a token string"),
                        ({"instances": [{"subject_id": ids[0], "customer_id": toks[0]}]}, "not both"),
                        ({"instances": [ids[0]]}, "send {\"subject_id\"")):
        code, resp = post(f"{url}/v1/models/credit:predict", body)
        assert code == 400 and words in resp.get("error", ""), resp
        assert ids[0] not in json.dumps(resp)


def test_ids_stay_out_of_logs_and_the_key_store_is_only_read(served, tmp_path: Path):
    ws, url, ref, tokens = served
    ids = _ids(tmp_path, 6)[4:]
    before = ws.keyring.store.stats()["subjects"]
    code, resp = post(f"{url}/v1/models/credit:predict", {"instances": [{"subject_id": i} for i in ids] + [{"subject_id": "X-1"}]})
    assert code == 200 and resp["predictions"][-1] is None
    assert ws.keyring.store.stats()["subjects"] == before  # an unknown id created no token
    log = (ws.config.workspace_dir / "serving" / "requests" / "credit.jsonl").read_text()
    for t in ws.keyring.tokens_for(ids, create=False):
        assert t in log  # scored: the request log keeps the token
    server_log = (ws.config.base_dir / "server.log").read_text(errors="replace")
    for i in ids:
        assert i not in log and i not in server_log
    # the lookup is gated like the feature lookup and audited with counts only (in-process predictor)
    pred = GovernedPredictor(ws, ref, ws.actor("mel"), log_requests=False)
    scores, errors = pred.score_subjects([ids[0], "X-2"])
    assert not np.isnan(scores[0]) and np.isnan(scores[1]) and set(errors) == {1}
    ws.audit.flush()
    # the running predictor flushes its own events (its 3-id request) on its interval: take this call's
    ev = [e for e in ws.audit.query(action="serve.resolve_ids").to_pylist() if json.loads(e["details"])["ids"] == 2][-1]
    assert ev["outcome"] == "ok" and ev["stage"] == "serve" and ev["resource"] == f"model:{ref}"
    d = json.loads(ev["details"])
    assert (d["ids"], d["resolved"], d["unknown"]) == (2, 1, 1)
    gate = [e for e in ws.audit.query(action="gate.decide").to_pylist() if e["stage"] == "serve"][-2:]
    assert any(json.loads(e["details"]).get("columns") == ["customer_id"] and e["outcome"] == "allow" for e in gate)
    everything = json.dumps(ws.audit.query().to_pylist(), default=str)
    assert ids[0] not in everything and "X-2" not in everything


# -- local deployments: list and stop ----------------------------------------------------------
def test_deployments_are_listed_and_stopped_only_when_they_are_ours(served):
    from serving.deploy import DeployError, deploy, list_deployments, stop_deployments
    from serving.identity import read_identity

    ws, url, ref, tokens = served
    fair = approved_copy(ws, ref)
    port = free_port()
    res = deploy(ws, ws.actor("mel"), fair, target="local", port=port)
    try:
        found = {s.deployment.port: s for s in list_deployments(ws)}
        st = found[port]
        assert st.alive and st.deployment.model == str(fair) and st.deployment.pid == res.pid and st.deployment.started_at
        # deployments list/stop in this process: they read the deployment records and signal the predictor
        # deploy started (its own process, whatever runs the command)
        env = {"LAKEWARDEN_CONFIG": str(ws.config.source)}
        p = lw_in(ws.config.base_dir, "deployments", "list", user="mel", env=env)
        assert p.returncode == 0 and str(fair) in p.stdout and str(port) in p.stdout and "yes" in p.stdout, p.stderr
        with pytest.raises(AccessDenied, match="roles/stages/deploy"):
            stop_deployments(ws, ws.actor("ana"), "credit")
        with pytest.raises(DeployError, match="no local predictor of nope"):
            stop_deployments(ws, ws.actor("mel"), "nope")
        p = lw_in(ws.config.base_dir, "deployments", "stop", user="mel", env=env)
        assert p.returncode == 2 and "--all" in p.stderr and "Traceback" not in p.stderr
        p = lw_in(ws.config.base_dir, "deployments", "stop", str(fair), user="mel", env=env)
        assert p.returncode == 0 and f"stopped {fair} on port {port}" in p.stdout, p.stderr
        assert read_identity(port) is None and port not in {s.deployment.port for s in list_deployments(ws)}
        assert read_identity(int(url.rsplit(":", 1)[1])) is not None  # the fixture's own server still runs
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(res.pid, signal.SIGTERM)
    ws.audit.flush()
    ev = [e for e in ws.audit.query(action="deployments.stop").to_pylist() if e["resource"] == f"model:{fair}"]
    assert ev and json.loads(ev[-1]["details"]) == {"port": port, "state_before": "running"}


def test_a_port_taken_by_something_else_is_never_signalled(served):
    """The record says our predictor ran there; now another process listens: stop forgets it, kills nothing."""
    from serving.deploy import Deployment, _record, list_deployments, stop_deployments

    ws, url, ref, tokens = served
    port = free_port()
    other = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the stand-in http.server did not start in 30 s")
        _record(ws, Deployment(model=f"{ref}", port=port, pid=other.pid, url=f"http://127.0.0.1:{port}",
                               started_at="2026-01-01T00:00:00+00:00"))
        st = {s.deployment.port: s for s in list_deployments(ws)}[port]
        assert st.state == "replaced" and not st.alive
        out = stop_deployments(ws, ws.actor("mel"), all_models=False, model=ref.name)
        assert [s.state for s in out if s.deployment.port == port] == ["replaced"]
        assert other.poll() is None  # still running: not ours, not signalled
        assert port not in {s.deployment.port for s in list_deployments(ws)}
    finally:
        other.kill()
        other.wait(10)
