"""HTTPS for the predictor, without starting one: the files it serves, the refusal of plain HTTP with
auth on, deploy's probe, the Kubernetes manifest, and the coalesced audit of failed authentications.

The predictor itself over HTTPS, with a real identity provider, is in test_authn.py."""

from __future__ import annotations

import json
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cli_helpers import lw_in
from serving_helpers import TlsFiles, issue_tls

from governance.config import ProjectConfig
from governance.errors import ConfigError
from governance.tls import PlaintextRefused

AUTH = {"enabled": True, "issuer": "https://idp.example/realms/lakewarden"}


def config(base: Path, **sections) -> ProjectConfig:  # noqa: ANN003
    return ProjectConfig.model_validate(sections).model_copy(
        update={"base_dir": base, "source": base / "lakewarden.yaml"})


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return issue_tls(tmp_path / "tls")


# -- the files the predictor serves ------------------------------------------------------------
def test_configured_files_are_checked_and_resolved_against_the_config_folder(tmp_path: Path, tls: TlsFiles):
    from serving.model import tls_files

    cfg = config(tmp_path, serving={"tls_cert": "tls/server.crt", "tls_key": "tls/server.key"})
    assert tls_files(cfg) == (tls.cert, tls.key)
    assert tls_files(config(tmp_path)) is None  # no certificate: plain HTTP


@pytest.mark.parametrize("setting", ["tls_cert", "tls_key"])
def test_a_missing_file_names_the_setting_and_the_path(tmp_path: Path, tls: TlsFiles, setting: str):
    from serving.model import tls_files

    files = {"tls_cert": "tls/server.crt", "tls_key": "tls/server.key", setting: "tls/nope.pem"}
    with pytest.raises(ConfigError) as e:
        tls_files(config(tmp_path, serving=files))
    assert f"serving.{setting}" in str(e.value) and str(tmp_path / "tls" / "nope.pem") in str(e.value)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_key_others_or_its_group_may_read_is_refused(tmp_path: Path, tls: TlsFiles, mode: int):
    from serving.model import tls_files

    tls.key.chmod(mode)
    with pytest.raises(ConfigError) as e:
        tls_files(config(tmp_path, serving={"tls_cert": str(tls.cert), "tls_key": str(tls.key)}))
    msg = str(e.value)
    assert "serving.tls_key" in msg and str(tls.key) in msg and f"{mode:04o}" in msg and "chmod 600" in msg
    with pytest.raises(ConfigError, match="--tls-key"):  # the same check for the files a Secret is mounted as
        tls_files(config(tmp_path), cert=tls.cert, key=tls.key)


def test_a_certificate_and_a_key_that_do_not_belong_together_are_refused(tmp_path: Path, tls: TlsFiles):
    from serving.model import tls_files

    other = issue_tls(tmp_path / "other")
    with pytest.raises(ConfigError, match="do not load as a PEM certificate chain and its private key"):
        tls_files(config(tmp_path, serving={"tls_cert": str(tls.cert), "tls_key": str(other.key)}))
    with pytest.raises(ConfigError, match="go together"):
        tls_files(config(tmp_path), cert=tls.cert)


def test_with_auth_on_and_no_certificate_the_server_refuses_before_loading_or_listening(
        project: Path, monkeypatch: pytest.MonkeyPatch):
    import serving.model as model

    def never(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded or the server started")

    monkeypatch.setattr(model, "_kserve", never)
    monkeypatch.setattr(model, "GovernedPredictor", never)
    cfg = project / "lakewarden.yaml"
    cfg.write_text(cfg.read_text() + f"auth: {{enabled: true, issuer: '{AUTH['issuer']}'}}\n")
    from governance.workspace import Workspace

    with Workspace.open(cfg) as ws, pytest.raises(PlaintextRefused) as e:
        model.serve(ws, "credit@1", ws.service_actor("mel"), port=8123)
    assert e.value.exit_code == 2 and "serving.tls_cert" in str(e.value)
    p = lw_in(project, "serve", "--model", "credit@1", "--port", "8123", user="mel",  # the command: one line, exit 2
              env={"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]})
    assert p.returncode == 2 and "without TLS: refused" in p.stderr, p.stderr


# -- failed authentications: counted, audited, coalesced -----------------------------------------
class FakeAudit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def record(self, action: str, **kw) -> None:  # noqa: ANN003
        self.events.append((action, kw))


def test_failures_are_audited_at_most_once_per_reason_per_window_with_their_count():
    from serving.model import MAX_AUDITED_CLIENTS, AuthnFailures

    now = [0.0]
    audit = FakeAudit()
    f = AuthnFailures(audit, resource="model:credit@1", window=60, clock=lambda: now[0])
    for i in range(1000):  # a flood: one record, at once
        f.note("signature", f"10.0.0.{i % 20}")
    f.note("expired", "10.0.0.1")
    assert [(kw["details"]["reason"], kw["details"]["failures"]) for _, kw in audit.events] == [("signature", 1), ("expired", 1)]
    _, kw = audit.events[0]
    assert (kw["outcome"], kw["actor"], kw["stage"], kw["resource"]) == ("deny", "(unauthenticated)", "serve", "model:credit@1")
    now[0] = 59.9
    f.note("signature", "10.0.0.1")
    assert len(audit.events) == 2  # still within the window
    now[0] = 60.0
    f.note("signature", "10.0.0.1")  # the window has passed: the count since the last record
    d = audit.events[-1][1]["details"]
    assert d["failures"] == 1000 + 1 and len(d["clients"]) == MAX_AUDITED_CLIENTS and d["clients_omitted"] > 0
    f.note("signature", "10.0.0.2")
    f.note("bogus-reason", None)  # a code nobody knows is "other" (the label set stays bounded): its first, at once
    assert audit.events[-1][1]["details"] == {"reason": "other", "failures": 1, "clients": [], "window_s": 60.0}
    assert f.flush() == 1  # at stop: every open count
    assert audit.events[-1][1]["details"]["reason"] == "signature" and audit.events[-1][1]["details"]["failures"] == 1
    assert f.flush() == 0
    total = sum(kw["details"]["failures"] for _, kw in audit.events if kw["details"]["reason"] == "signature")
    assert total == 1000 + 2 + 1


def test_the_failure_counter_lives_in_the_registry_kserve_exposes():
    from prometheus_client import REGISTRY, generate_latest

    from serving.model import AUTHN_REASONS, authn_failure_counter

    c = authn_failure_counter()
    assert authn_failure_counter() is c
    before = REGISTRY.get_sample_value("lakewarden_authn_failures_total", {"reason": "expired"})
    c.labels("expired").inc()
    assert REGISTRY.get_sample_value("lakewarden_authn_failures_total", {"reason": "expired"}) == before + 1
    text = generate_latest(REGISTRY).decode()
    assert all(f'lakewarden_authn_failures_total{{reason="{r}"}}' in text for r in (*AUTHN_REASONS, "other"))


# -- deploy's probe over https ------------------------------------------------------------------
class _Https:
    """A tiny HTTPS server on loopback that answers like a ready predictor (and its identity route)."""

    def __init__(self, tls: TlsFiles, ident: dict) -> None:
        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps(ident if self.path == "/lakewarden/identity" else {}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_a) -> None:  # noqa: ANN002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_deploy_probes_over_https_trusting_serving_tls_ca(tmp_path: Path, tls: TlsFiles):
    from types import SimpleNamespace

    from governance.identity import workspace_id
    from serving.deploy import UntrustedPredictor, client_tls, local_url, predictor_identity, wait_ready

    cfg = config(tmp_path, serving={"tls_cert": str(tls.cert), "tls_key": str(tls.key), "tls_ca": "tls/ca.pem"})
    ident = {"workspace_id": workspace_id(cfg), "model": "credit@1", "pid": 1}
    srv = _Https(tls, ident)
    try:
        url = local_url(cfg, srv.port)
        assert url == f"https://127.0.0.1:{srv.port}" and local_url(config(tmp_path), 80) == "http://127.0.0.1:80"
        wait_ready(url, "credit", timeout=10, context=client_tls(cfg), config=cfg)
        assert predictor_identity(SimpleNamespace(config=cfg), srv.port) == ident
        untrusting = config(tmp_path, serving={"tls_cert": str(tls.cert), "tls_key": str(tls.key)})  # system trust
        with pytest.raises(UntrustedPredictor, match="does not verify against the system's trust store"):
            wait_ready(url, "credit", timeout=30, context=client_tls(untrusting), config=untrusting)  # at once
        other = issue_tls(tmp_path / "other")
        wrong = config(tmp_path, serving={"tls_cert": str(tls.cert), "tls_key": str(tls.key), "tls_ca": str(other.ca)})
        with pytest.raises(UntrustedPredictor, match=r"serving\.tls_ca"):
            predictor_identity(SimpleNamespace(config=wrong), srv.port)
    finally:
        srv.close()
    with pytest.raises(ConfigError, match=r"serving\.tls_ca.*nope\.pem"):
        client_tls(config(tmp_path, serving={"tls_cert": "a", "tls_key": "b", "tls_ca": "nope.pem"}))


# -- the Kubernetes manifest --------------------------------------------------------------------
def test_a_tls_manifest_mounts_a_tls_secret_read_only_and_embeds_no_pem(tmp_path: Path, tls: TlsFiles):
    from serving.manifests import TLS_DIR, example_card, render_inference_service, to_yaml, validate, write_manifest

    cfg = config(tmp_path, auth=AUTH, serving={"tls_cert": str(tls.cert), "tls_key": str(tls.key)})
    obj = render_inference_service(example_card(), config=cfg)  # TLS because the config names a certificate
    assert validate(obj) == []
    pred = obj["spec"]["predictor"]
    c = pred["containers"][0]
    vol = next(v for v in pred["volumes"] if v["name"] == "lakewarden-tls")
    assert vol["secret"]["secretName"] == "credit-v1-tls" and {i["key"] for i in vol["secret"]["items"]} == {"tls.crt", "tls.key"}
    assert vol["secret"]["defaultMode"] & 0o007 == 0  # never readable by others
    mount = next(m for m in c["volumeMounts"] if m["name"] == "lakewarden-tls")
    assert mount == {"name": "lakewarden-tls", "mountPath": TLS_DIR, "readOnly": True}
    assert c["args"][-4:] == ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    text = to_yaml(obj)
    assert "BEGIN" not in text and tls.key.read_text() not in text and str(tls.key) not in text
    path = write_manifest(example_card(), tmp_path / "out", config=cfg)
    assert "credit-v1-tls" in path.read_text() and "PRIVATE KEY" not in path.read_text()
    assert render_inference_service(example_card(), tls_secret="credit-cert")["spec"]["predictor"]["volumes"][1][
        "secret"]["secretName"] == "credit-cert"


def test_with_auth_on_and_no_tls_the_manifest_is_not_rendered(tmp_path: Path):
    from serving.manifests import example_card, render_inference_service, write_manifest

    cfg = config(tmp_path, auth=AUTH)
    with pytest.raises(PlaintextRefused, match="InferenceService lakewarden/credit-v1"):
        render_inference_service(example_card(), config=cfg)
    with pytest.raises(PlaintextRefused):
        write_manifest(example_card(), tmp_path / "out", config=cfg)
    assert not (tmp_path / "out").exists()
    assert render_inference_service(example_card(), config=cfg, tls=True)["spec"]["predictor"]["securityContext"]
    plain = render_inference_service(example_card(), config=config(tmp_path))  # auth off: plain stays allowed
    assert "--tls-cert" not in plain["spec"]["predictor"]["containers"][0]["args"]


def test_validate_refuses_pem_a_writable_secret_and_tls_files_from_elsewhere(tls: TlsFiles):
    from serving.manifests import example_card, render_inference_service, validate

    obj = render_inference_service(example_card(), tls=True)
    c = obj["spec"]["predictor"]["containers"][0]
    c["env"].append({"name": "TLS_CERT", "value": tls.cert.read_text()})
    c["volumeMounts"][1]["readOnly"] = False
    c["args"][-1] = "/tmp/tls.key"
    c["readinessProbe"]["httpGet"].pop("scheme")
    problems = "\n".join(validate(obj))
    assert "embeds PEM text" in problems and "writable" in problems and "--tls-key must name a file of a mounted Secret" in problems
    assert "readinessProbe.httpGet.scheme must be HTTPS" in problems
