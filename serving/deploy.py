"""Governed deployment: the deploy gate decides, then the model is served locally or rendered for Kubernetes.

The gate's ``deploy`` stage reads the model card: ε within the policy's cap, fairness within
its thresholds, and at least the required approvals by the policy's approvers — none of
them by the deployer (separation of duties). A deny ends here with the rule named.

* ``local`` starts ``lakewarden serve`` (KServe's ModelServer with the governed predictor)
  as a background process on loopback and waits until it is ready. A server already on the
  port is asked whose it is (``/lakewarden/identity``, serving/identity.py): this
  workspace's server of the same model is reported deployed as it is; another workspace's,
  or something that is not a Lakewarden predictor, is refused (``ForeignServer``, exit 2),
  and so is this workspace's server of another model. A new server is checked the same way
  once ready (its process id included), so a server that won the port meanwhile is never
  taken for the one started here;
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

from governance.errors import LakewardenError
from governance.gate import Actor, Resource
from governance.identity import ForeignServer, workspace_id
from governance.policy import Stage
from governance.workspace import Workspace
from serving.identity import read_identity
from training.registry import ModelRef, Registry


class DeployError(LakewardenError, RuntimeError):
    """The deployment failed: invalid manifest, a server that did not start, a port serving another model."""


def wait_ready(url: str, name: str, *, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the predictor for {url} exited (status {proc.returncode}) before it was ready")
        time.sleep(0.2)
    raise DeployError(f"the predictor at {url} did not become ready within {timeout:.0f}s")


def check_predictor(ws: Workspace, port: int, model: str, ident: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of the predictor on the port if it is this workspace's server of ``model``; raise otherwise."""
    ident = read_identity(port) if ident is None else ident
    ours, where = workspace_id(ws.config), f"127.0.0.1:{port}"
    if not ident:
        raise ForeignServer("The predictor port", where, None, ours=ours,
                            detail="something that is not a Lakewarden predictor listens there" if ident == {}
                            else "nothing answers there", hint="deploy on a free --port")
    if ident["workspace_id"] != ours:
        raise ForeignServer("The predictor", where, ident["workspace_id"], ours=ours,
                            hint="deploy on a port of this workspace's own (--port)")
    if ident.get("model") != model:
        raise DeployError(f"127.0.0.1:{port} already serves {ident.get('model')} for this workspace, not {model}",
                          hint=f"stop that server (process {ident.get('pid')}) or deploy on another --port")
    return ident


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
        url = f"http://127.0.0.1:{port}"
        found = read_identity(port)
        if found is not None:  # a server on the port already: used only if it is ours, with this model
            ident = check_predictor(ws, port, str(card.ref), found)
            out.update({"url": url, "pid": ident.get("pid"), "existing": True})
        else:
            env = {**os.environ, "LAKEWARDEN_CONFIG": str(ws.config.source or ws.config.base_dir / "lakewarden.yaml"),
                   "LAKEWARDEN_USER": actor.name}
            log_path = logs / f"{card.name}-server.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(card.ref),
                                         "--port", str(port)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                try:
                    wait_ready(url, card.name, proc=proc)
                except DeployError as exc:
                    if read_identity(port) is None:
                        raise DeployError(f"{exc.message}; see {log_path}") from None
                    # something else answers on the port: check_predictor says whose
                ident = check_predictor(ws, port, str(card.ref))
                if ident.get("pid") != proc.pid:
                    raise DeployError(f"127.0.0.1:{port} is served by process {ident.get('pid')}, not by the one "
                                      f"started here ({proc.pid}); see {log_path}")
            except LakewardenError:
                if proc.poll() is None:
                    proc.terminate()
                raise
            out.update({"url": url, "pid": proc.pid})
        (logs / f"{card.name}.pid").write_text(str(out["pid"]))
    reg.mark_deployed(actor, card.ref, target, decision=decision)
    ws.audit.record("deploy", actor=actor.name, outcome="ok", stage=Stage.DEPLOY.value, resource=f"model:{card.ref}",
                    details={k: v for k, v in out.items() if k != "pid"})
    return out


__all__ = ["deploy", "DeployError", "check_predictor", "wait_ready"]
