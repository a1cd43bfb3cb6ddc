"""Governed deployment: the deploy gate decides, then the model is served locally or rendered for Kubernetes.

The gate's ``deploy`` stage reads the model card: ε within the policy's cap, fairness within
its thresholds, and at least the required approvals by the policy's approvers — none of
them by the deployer (separation of duties). A deny ends here with the rule named.

* ``local`` starts ``lakewarden serve`` (KServe's ModelServer with the governed predictor)
  as a background process on loopback and waits until it is ready;
* ``k8s`` renders a KServe InferenceService from the kserve SDK's typed objects
  (serving/manifests.py) and validates it.

Either way the deployment is recorded in the registry (status ``deployed``) and audited.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Literal

from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace
from training.registry import ModelRef, Registry


class DeployError(RuntimeError):
    pass


def wait_ready(url: str, name: str, *, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise DeployError(f"the predictor at {url} did not become ready within {timeout:.0f}s")


def deploy(ws: Workspace, actor: Actor, ref: ModelRef | str, *, target: Literal["local", "k8s"], port: int = 8080,
           out_dir: Path | None = None) -> dict[str, Any]:
    """Deploy a registered model version if the gate allows it; return where it runs or what was rendered."""
    reg = Registry(ws)
    card = reg.card(ref)
    decision = ws.gate.enforce(Stage.DEPLOY, actor, Resource.model(card.name, card.version), reg.deploy_context(card.ref))
    out: dict[str, Any] = {"model": str(card.ref), "target": target, "rules": list(decision.rule_ids)}
    if target == "k8s":
        from serving.manifests import validate, write_manifest

        path = write_manifest(card, out_dir or ws.config.workspace_dir / "deploy")
        import yaml

        problems = validate(yaml.safe_load(path.read_text()))
        if problems:
            raise DeployError(f"rendered manifest {path} is invalid: {'; '.join(problems)}")
        out["manifest"] = str(path)
    else:
        logs = ws.config.workspace_dir / "serving"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LAKEWARDEN_CONFIG": str(ws.config.source or ws.config.base_dir / "lakewarden.yaml"),
               "LAKEWARDEN_USER": actor.name}
        with open(logs / f"{card.name}-server.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(card.ref), "--port", str(port)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, card.name)
        except DeployError:
            proc.terminate()
            raise
        out.update({"url": url, "pid": proc.pid})
        (logs / f"{card.name}.pid").write_text(str(proc.pid))
    reg.mark_deployed(actor, card.ref, target, decision=decision)
    ws.audit.record("deploy", actor=actor.name, outcome="ok", stage=Stage.DEPLOY.value, resource=f"model:{card.ref}",
                    details={k: v for k, v in out.items() if k != "pid"})
    return out


__all__ = ["deploy", "DeployError", "wait_ready"]
