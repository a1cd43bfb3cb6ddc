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
  (serving/manifests.py) and validates it. Its ``STORAGE_URI`` names the version's folder: on the
  models claim, or in the bucket when the registry keeps its versions there (``s3://``).

Either way the deployment is recorded in the registry (status ``deployed``) and audited.

**HTTPS.** With ``serving.tls_cert``/``serving.tls_key`` configured the local predictor serves
HTTPS: every probe here (readiness, identity, list, stop) goes over https to ``127.0.0.1`` and
verifies the server's certificate against ``serving.tls_ca`` (the system's trust store when it
is unset), and the deployment's URL — printed and recorded — is ``https://127.0.0.1:<port>``.
A certificate that does not verify is an error that says so (``UntrustedPredictor``), never a
server taken on trust. With ``auth.enabled`` and no certificate, a local deploy is refused before
anything starts (:class:`governance.tls.PlaintextRefused`, exit 2), and so is a k8s render.

A local predictor is also recorded in ``<workspace>/serving/deployments/<port>.json`` (model,
port, process id, when it started — nothing personal). :func:`list_deployments` reads those
records and asks each port whose server answers; :func:`stop_deployments` stops this
workspace's predictors of a model (or all of them): gated by the ``deploy`` stage (who may start
a predictor may stop one), audited per predictor, and a process is signalled only after the
predictor on its port said it is this workspace's, serving that model, with that process id.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from governance.config import ProjectConfig
from governance.errors import ConfigError, LakewardenError
from governance.gate import Actor, Resource
from governance.identity import ForeignServer, workspace_id
from governance.policy import Stage
from governance.workspace import Workspace
from serving.identity import read_identity
from training.registry import ModelRef, Registry, model_name


class DeployError(LakewardenError, RuntimeError):
    """The deployment failed: invalid manifest, a server that did not start, a port serving another model."""


class DeploymentNotFound(DeployError):
    """A stop named no recorded predictor, or named none at all (a usage mistake: exit 2)."""

    exit_code = 2


class UntrustedPredictor(DeployError):
    """The predictor's certificate does not verify against ``serving.tls_ca`` (or the system's trust
    store): it is not taken for this workspace's server (exit 2: the configuration must change)."""

    exit_code = 2


def _untrusted(url: str, exc: BaseException, config: ProjectConfig | None) -> UntrustedPredictor:
    ca = config.serving.tls_ca if config is not None else None
    trust = f"serving.tls_ca ({config.path(ca)})" if config is not None and ca else "the system's trust store"
    why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
    return UntrustedPredictor(f"the predictor at {url} presents a certificate that does not verify against {trust}: {why}",
                              hint="set serving.tls_ca to the CA file that signed serving.tls_cert (a certificate "
                                   "for 127.0.0.1)")


def client_tls(config: ProjectConfig) -> ssl.SSLContext:
    """How deploy trusts the predictor: ``serving.tls_ca``, else the system's trust store (hosts verified).

    Raises:
        ConfigError: ``serving.tls_ca`` names no file.
    """
    ca = config.serving.tls_ca
    if ca is None:
        return ssl.create_default_context()
    path = config.path(ca)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file", path=str(config.source or config.base_dir / "lakewarden.yaml"),
                          field="serving.tls_ca", hint="point it at the CA certificate (PEM) that signed serving.tls_cert")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ConfigError(f"{path} holds no PEM CA certificate ({exc.reason or exc})",
                          path=str(config.source or config.base_dir / "lakewarden.yaml"), field="serving.tls_ca") from None


def local_url(config: ProjectConfig, port: int) -> str:
    """The local predictor's URL: https when ``serving.tls_cert`` is configured."""
    return f"{'https' if config.serving.tls_cert else 'http'}://127.0.0.1:{port}"


def wait_ready(url: str, name: str, *, timeout: float = 120, proc: subprocess.Popen | None = None,
               context: ssl.SSLContext | None = None, config: ProjectConfig | None = None) -> None:
    """Poll ``<url>/v2/models/<name>/ready`` until it answers 200 (``context``: the trust for https).

    Raises:
        UntrustedPredictor: the server's certificate does not verify (at once: waiting changes nothing).
        DeployError: the process exited first, or the time ran out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{name}/ready", timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(url, exc, config) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise _untrusted(url, exc.reason, config) from None
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"the predictor for {url} exited (status {proc.returncode}) before it was ready")
        time.sleep(0.2)
    raise DeployError(f"the predictor at {url} did not become ready within {timeout:.0f}s")


def predictor_identity(ws: Workspace, port: int, *, https: bool | None = None, timeout: float = 10) -> dict[str, Any] | None:
    """:func:`serving.identity.read_identity` over https when the predictor serves it (``https``; None:
    as configured), verified against :func:`client_tls`: None if nothing listens, ``{}`` if what
    answers is not a Lakewarden predictor.

    Raises:
        UntrustedPredictor: an https server whose certificate does not verify.
    """
    if not (ws.config.serving.tls_cert is not None if https is None else https):
        return read_identity(port, timeout=timeout)
    try:
        return read_identity(port, timeout=timeout, tls=client_tls(ws.config))
    except ssl.SSLCertVerificationError as exc:
        raise _untrusted(f"https://127.0.0.1:{port}", exc, ws.config) from None


def check_predictor(ws: Workspace, port: int, model: str, ident: dict[str, Any] | None = None) -> dict[str, Any]:
    """The identity of the predictor on the port if it is this workspace's server of ``model``; raise otherwise."""
    ident = predictor_identity(ws, port) if ident is None else ident
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


@dataclass(frozen=True)
class Deployed:
    """Where a deployed version runs (``local``: ``url`` and the predictor's ``pid``) or what was rendered
    (``k8s``: the validated InferenceService ``manifest``), and the gate's rules that allowed it."""

    model: str  # name@version
    target: Literal["local", "k8s"]
    rules: tuple[str, ...]
    manifest: str | None = None
    url: str | None = None
    pid: int | None = None
    existing: bool = False  # local: this workspace's predictor of this version already answered on the port

    @property
    def where(self) -> str:
        return self.url or self.manifest or ""


def deploy(ws: Workspace, actor: Actor, ref: ModelRef | str, *, target: Literal["local", "k8s"], port: int = 8080,
           out_dir: Path | None = None) -> Deployed:
    """Deploy a registered model version if the gate allows it; return where it runs or what was rendered."""
    ws.gate.require_stage(Stage.DEPLOY, actor, Resource.model(model_name(ref)))
    reg = Registry(ws)
    card = reg.card(ref)
    decision = ws.gate.enforce(Stage.DEPLOY, actor, Resource.model(card.name, card.version), reg.deploy_context(card.ref))
    out: dict[str, Any] = {"model": str(card.ref), "target": target, "rules": list(decision.rule_ids)}
    if target == "k8s":
        from serving.manifests import validate, write_manifest

        # A registry in the bucket: the predictor's storage initializer reads the version from there.
        where = {"storage_uri": reg.uri(card.ref)} if reg.in_bucket else {}
        path = write_manifest(card, out_dir or ws.config.workspace_dir / "deploy", config=ws.config, **where)
        import yaml

        problems = validate(yaml.safe_load(path.read_text()))
        if problems:
            raise DeployError(f"rendered manifest {path} is invalid: {'; '.join(problems)}")
        out["manifest"] = str(path)
    else:
        url = local_url(ws.config, port)
        context = None
        if ws.config.serving.tls_cert is None:
            from governance.tls import refuse_plaintext

            refuse_plaintext(ws.config, "the predictor", f"127.0.0.1:{port}",
                             hint="set serving.tls_cert, serving.tls_key and serving.tls_ca in lakewarden.yaml "
                                  "(docs/configuration.md), or deploy with auth off")
        else:  # missing files, a key others may read, a missing tls_ca: refused here, before a server starts
            from serving.model import tls_files

            tls_files(ws.config)
            context = client_tls(ws.config)
        logs = ws.config.workspace_dir / "serving"
        logs.mkdir(parents=True, exist_ok=True)
        found = predictor_identity(ws, port)
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
                    wait_ready(url, card.name, proc=proc, context=context, config=ws.config)
                except UntrustedPredictor:
                    raise
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
        _record(ws, Deployment(model=str(card.ref), port=port, pid=int(out["pid"]), url=url,
                               started_at=_now(ws).isoformat(timespec="seconds")), replace=not out.get("existing"))
    reg.mark_deployed(actor, card.ref, target, decision=decision)
    ws.audit.record("deploy", actor=actor.name, outcome="ok", stage=Stage.DEPLOY.value, resource=f"model:{card.ref}",
                    details={k: v for k, v in out.items() if k != "pid"})
    return Deployed(model=out["model"], target=target, rules=tuple(out["rules"]), manifest=out.get("manifest"),
                    url=out.get("url"), pid=out.get("pid"), existing=bool(out.get("existing")))


# -- local deployments: list and stop -------------------------------------------------------------
@dataclass(frozen=True)
class Deployment:
    """A local predictor this workspace started (``deploy --target local``), as recorded."""

    model: str  # name@version
    port: int
    pid: int
    url: str
    started_at: str  # ISO 8601, UTC

    @property
    def name(self) -> str:
        return self.model.split("@", 1)[0]


@dataclass(frozen=True)
class DeploymentStatus:
    """A recorded deployment and what answers on its port now.

    ``state``: ``running`` (the predictor there says it is this workspace's, this model, this
    process), ``stopped`` (nothing listens), ``replaced`` (something else answers: another
    process, model or workspace — never signalled by :func:`stop_deployments`).
    """

    deployment: Deployment
    state: Literal["running", "stopped", "replaced"]
    detail: str = ""

    @property
    def alive(self) -> bool:
        return self.state == "running"


def _folder(ws: Workspace) -> Path:
    return ws.config.workspace_dir / "serving" / "deployments"


def _now(ws: Workspace) -> datetime:
    clock = getattr(ws, "_clock", None)
    now = clock() if clock is not None else datetime.now(timezone.utc)
    return now.astimezone(timezone.utc)


def _record(ws: Workspace, d: Deployment, *, replace: bool = True) -> None:
    folder = _folder(ws)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{d.port}.json"
    if path.exists() and not replace:
        try:
            if json.loads(path.read_text()).get("pid") == d.pid:
                return  # the same server, recorded when it was started: keep its start time
        except (OSError, ValueError):
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(d), sort_keys=True) + "\n")
    os.replace(tmp, path)


def _recorded(ws: Workspace) -> list[tuple[Path, Deployment]]:
    out = []
    folder = _folder(ws)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            raw = json.loads(path.read_text())
            d = Deployment(model=str(raw["model"]), port=int(raw["port"]), pid=int(raw["pid"]), url=str(raw["url"]),
                           started_at=str(raw["started_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise DeployError(f"{path}: not a deployment record (model, port, pid, url, started_at)",
                              hint="remove the file if no predictor runs on that port") from None
        out.append((path, d))
    return sorted(out, key=lambda pd: (pd[1].name, pd[1].model, pd[1].port))


def _status(ws: Workspace, d: Deployment) -> DeploymentStatus:
    try:
        ident = predictor_identity(ws, d.port, https=d.url.startswith("https://"))
    except UntrustedPredictor as exc:  # never signalled: it cannot prove it is ours
        return DeploymentStatus(d, "replaced", exc.message)
    if ident is None:
        return DeploymentStatus(d, "stopped", "nothing listens on the port")
    if not ident:
        return DeploymentStatus(d, "replaced", "something that is not a Lakewarden predictor answers")
    if ident.get("workspace_id") != workspace_id(ws.config):
        return DeploymentStatus(d, "replaced", f"a predictor of workspace {ident.get('workspace_id')} answers")
    if ident.get("model") != d.model or ident.get("pid") != d.pid:
        return DeploymentStatus(d, "replaced", f"process {ident.get('pid')} serves {ident.get('model')} there now")
    return DeploymentStatus(d, "running")


def list_deployments(ws: Workspace) -> list[DeploymentStatus]:
    """The local predictors this workspace started, each with what answers on its port now.

    Not gated: it shows model versions, ports and process ids, which ``models list`` and the
    process table show anyway — no data.
    """
    return [_status(ws, d) for _, d in _recorded(ws)]


def stop_deployments(ws: Workspace, actor: Actor, model: str | None = None, *, all_models: bool = False,
                     timeout: float = 20.0) -> list[DeploymentStatus]:
    """Stop this workspace's local predictors of ``model`` (``name`` or ``name@version``), or all.

    The gate decides first (``deploy`` on ``system:deployments``: a role that may start
    predictors may stop them). A predictor is signalled (SIGTERM to its process group, SIGKILL
    after ``timeout``) only when the server on its port says it is this workspace's, serving the
    recorded model, with the recorded process id; a record whose port is silent or answered by
    something else is removed and nothing is signalled. Each one is audited
    (``deployments.stop``). Returns the statuses found before stopping.

    Raises:
        DeployError: neither a model nor ``all_models``, both, or no recorded predictor matches.
        AccessDenied: the actor may not run the deploy stage.
    """
    if (model is None) == (not all_models):
        raise DeploymentNotFound("name a model (name or name@version) or --all, not both" if model else
                                 "name a model (name or name@version) or --all")
    ws.gate.enforce(Stage.DEPLOY, actor, Resource.system("deployments"))
    found = [(p, d) for p, d in _recorded(ws) if all_models or model in (d.model, d.name)]
    if not found:
        known = ", ".join(sorted({d.model for _, d in _recorded(ws)})) or "none"
        raise DeploymentNotFound(f"no local predictor of {model or 'any model'} was started by this workspace "
                          f"(recorded: {known})", hint="`lakewarden deployments list` shows them")
    out = []
    for path, d in found:
        st = _status(ws, d)
        if st.state == "running":
            _terminate(d, timeout)
        path.unlink(missing_ok=True)
        ws.audit.record("deployments.stop", actor=actor.name, outcome="ok",
                        stage=Stage.DEPLOY.value, resource=f"model:{d.model}",
                        details={"port": d.port, "state_before": st.state})
        out.append(st)
    return out


def _terminate(d: Deployment, timeout: float) -> None:
    """SIGTERM the predictor's process group (deploy starts it in a session of its own), then wait
    for the port to close; SIGKILL the group if it does not. Reaps it when it is our child."""
    def gone() -> bool:
        try:
            if os.waitpid(d.pid, os.WNOHANG)[0] == d.pid:
                return True
        except ChildProcessError:  # not our child: its parent reaps it
            pass
        return read_identity(d.port, timeout=0.5) is None

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            try:
                os.killpg(d.pid, sig)
            except ProcessLookupError:  # not a group leader (a predictor deploy adopted): the process alone
                os.kill(d.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            raise DeployError(f"cannot stop process {d.pid} on port {d.port}: {exc.strerror}") from None
        deadline = time.monotonic() + (timeout if sig is signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if gone():
                return
            time.sleep(0.2)
    raise DeployError(f"the predictor {d.model} (process {d.pid}) on port {d.port} did not stop")


__all__ = ["deploy", "Deployed", "DeployError", "DeploymentNotFound", "Deployment", "DeploymentStatus", "UntrustedPredictor",
           "check_predictor", "client_tls", "list_deployments", "local_url", "predictor_identity", "stop_deployments",
           "wait_ready"]
