"""A trained model behind a real predictor process: what test_serving and test_authn serve.

* :func:`trained_workspace` makes a project (policies, an env-var KEK), ingests synthetic customers,
  materializes the features and trains ``credit`` for credit scoring;
* :func:`issue_tls` makes a local CA and a loopback server certificate: the chain and the key
  written apart (uvicorn reads them apart), the key 0600, and the CA file clients trust;
* :func:`start_predictor` runs ``lakewarden serve`` as its own process group and waits until the
  model is ready (over https, trusting the CA, when the project serves TLS).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["customer_profile:income", "customer_profile:income_log", "customer_profile:region"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate for loopback, its key and the CA that signed it (all PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca))

    def yaml(self) -> str:
        """The ``serving:`` section of lakewarden.yaml naming these files."""
        return f"serving: {{tls_cert: '{self.cert}', tls_key: '{self.key}', tls_ca: '{self.ca}'}}\n"


def issue_tls(folder: Path) -> TlsFiles:
    """A new local CA and a server certificate for 127.0.0.1/::1/localhost, under ``folder``."""
    from cryptography.hazmat.primitives import serialization

    from governance.tls import LocalCA, write_private

    ca = LocalCA.create("Lakewarden test CA")
    cert = ca.issue_server()
    key_pem = cert.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.crt").write_bytes(cert.cert_pem)
    return TlsFiles(ca=ca.write_cert(folder / "ca.pem"), cert=folder / "server.crt",
                    key=write_private(folder / "server.key", key_pem))


def trained_workspace(d: Path, *, name: str, kek_var: str, people: int, extra_yaml: str = "") -> tuple[Any, Any]:
    """A project in ``d`` with ``credit`` trained on ``people`` synthetic customers: ``(workspace, ref)``.
    Its actors are service identities (the principals' names; :meth:`Workspace.service_actor`), which
    are the names' claims in laptop mode and what the library makes without a token when auth is on."""
    from features.store import Features
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from training.flow import train_model
    from training.trainer import TrainOptions

    shutil.copytree(REPO / "policies", d / "policies")
    (d / "lakewarden.yaml").write_text(
        f"version: 1\nname: {name}\nstorage: {{root: .lakewarden/tables}}\n"
        f"keys: {{store: .lakewarden/keys/keystore.db, kek: {{provider: env, var: {kek_var}}}}}\n"
        f"{extra_yaml}policies: [policies/*.yaml]\n")
    os.environ[kek_var] = generate_kek_b64()
    res = generate(d / "landing", people=people, transactions_per_person=0, seed=4, bias=0.3)
    ws = Workspace.open(d / "lakewarden.yaml")
    ingest(ws, ws.service_actor("dana"), "customers", [res.files["customers"]])
    build_silver(ws, ws.service_actor("dana"), "customers")
    fs = Features(ws)
    fs.apply(ws.service_actor("pipeline"))
    fs.materialize(ws.service_actor("pipeline"))
    out = train_model(ws, ws.service_actor("sam"), name="credit", features=FEATURES, label="defaulted", purpose="credit_scoring",
                      options=TrainOptions(epochs=1, target_epsilon=2.0, accountant="rdp"), mitigate=False)
    ws.audit.flush()
    return ws, out.ref


FAIR = {"sex": {"disparate_impact": 0.95, "equal_opportunity_diff": 0.02, "predictive_parity_diff": 0.03},
        "ethnicity": {"disparate_impact": 0.9, "equal_opportunity_diff": 0.04, "predictive_parity_diff": 0.05}}


def approved_copy(ws: Any, ref: Any) -> Any:
    """A deployable version of the trained model: the same files, a fair card, approved by carla."""
    from training.registry import Registry

    reg = Registry(ws)
    trained = reg.card(ref)
    files = {n: (reg.path(ref) / n).read_bytes() for n in ("model.pt", "encoder.json")}
    fair = reg.register(ws.service_actor("sam"), name="credit", dataset="customers", files=files, card_fields={
        "purpose": "credit_scoring", "features": FEATURES, "label": "defaulted", "fairness": FAIR,
        "preprocessing": dict(trained.preprocessing), "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}})
    reg.approve(ws.service_actor("carla"), fair)
    return fair


@dataclass
class Predictor:
    """A ``lakewarden serve`` process: its URL, the trust a client needs (None: plain HTTP), its log."""

    proc: subprocess.Popen
    url: str
    context: ssl.SSLContext | None
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM its process group (once; later calls only wait) and wait; its exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)


def start_predictor(config: Path, ref: Any, *, user: str = "mel", tls: TlsFiles | None = None,
                    timeout: float = 120) -> Predictor:
    """``lakewarden serve --model REF`` for the project of ``config`` as ``user``, ready to answer."""
    port = free_port()
    env = {**os.environ, "LAKEWARDEN_CONFIG": str(config), "LAKEWARDEN_USER": user}
    log_path = config.parent / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(ref), "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    p = Predictor(proc, f"{'https' if tls else 'http'}://127.0.0.1:{port}", tls.context() if tls else None, log_path)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{p.url}/v2/models/credit/ready", timeout=1, context=p.context):
                return p
        except OSError:
            if proc.poll() is not None:
                pytest.fail("the predictor exited: " + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.3)
    proc.kill()
    pytest.fail("the predictor did not start: " + log_path.read_text(errors="replace")[-2000:])
