"""The reference pipeline's steps, as ``dvc repro`` runs them (see dvc.yaml and params.yaml).

Each step is one function here (``step_<name>``, in :data:`STEPS`) and one DVC stage in dvc.yaml,
whose command is ``lakewarden pipeline stage <name>`` (DVC's word). Every step asks the policy
gate for its stage(s) before it touches data (a deny raises AccessDenied, the command exits 3
naming the rule, and ``dvc repro`` stops there; the audit log holds the decision).

Which data: params.yaml names the datasets and each one's source (``synthetic``, or files and
globs of CSV, Parquet, JSON Lines), and the model (features, label, purpose). Nothing here names
a dataset or a column: the subject key comes from the dataset's policy, the model's dataset from
its features. dvc.yaml follows from params.yaml and the policies (:mod:`lakewarden.pipeline.dvcyaml`); a
stage run by DVC refuses a stale one. The ``sources`` stage runs on every ``dvc repro`` and
rewrites its record only when a landing file is new or changed, so nothing downstream reruns
when none is (see :func:`step_sources`).

What DVC versions. The Delta tables are *not* DVC outputs: each stage writes a small
manifest (``pipeline/<stage>.json``: table URI, Delta version, the version's data files with
their sizes, row counts, the lineage run id, the git commit) and DVC caches that. Why:

* reproduction — a Delta version is already an immutable snapshot; the manifest pins it,
  and ``lakewarden pipeline checkout`` (after ``git checkout <rev> && dvc checkout``) reads
  the tables back as of those versions. A directory output would be rehashed and copied
  whole on every run, and ``dvc repro`` deletes non-``persist`` outputs before a stage runs,
  which an appending Delta table cannot survive;
* erasure — DVC's cache and remotes cannot forget one record (``dvc gc`` works on whole
  objects). Manifests hold no personal data, so nothing DVC keeps ever needs erasing; the
  tables stay under the lakehouse's own erasure (row deletes, crypto-shredding, VACUUM).
  Time travel to a manifest's version shows no erased subject: the checkout drops rows
  whose subject key is shredded, and their encrypted values could not be opened anyway.

Model artifacts are real DVC outputs (``pipeline/candidate/``): weights, encoder, drift
reference — no rows, no identifiers. Metrics (ε, utility, fairness) and the privacy–utility
curve (ε spent vs holdout AUC per epoch) are DVC metrics and plots under ``reports/``.
"""

from __future__ import annotations

import glob as globmod
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from governance.errors import LakewardenError
from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace
from lakewarden.pipeline.manifests import (
    SOURCES, already_ingested, file_sha256, ingested, read_json, remember_ingested, require_pinned, step_manifest,
    table_manifest, write_json,
)
from lakewarden.pipeline.params import (
    GLOB_CHARS, OUT, PARAMS, REPORTS, SYNTHETIC, Params, PipelineError, TrainParams, kafka_source, load_params,
    params_error,
)
from lakewarden.pipeline.smoke import free_port, smoke_test


def _shown(params: Params, path: Path) -> str:
    """How manifests name a landing file: its path relative to the repository, PII-redacted."""
    from governance.pii import redact

    return redact(os.path.relpath(path, params.root))[0]


def _synthetic_file(ws: Workspace, params: Params, ds: str) -> Path:
    return ws.config.path(params.synthetic.landing) / f"{ds}.csv"  # generate()'s default format


def _match(params: Params, ds: str, *, known: bool) -> list[Path]:
    """The files ``ds``'s source names now, globs in sorted order. A pattern that matches nothing is
    an error unless files of ``ds`` were ingested before (``landing: remove`` deletes them)."""
    from governance.pii import redact
    from lakehouse.errors import IngestError
    from lakehouse.readers import detect_format

    out: list[Path] = []
    spec = params.sources[ds]
    for i, pattern in enumerate(params.patterns(ds)):
        loc = ("sources", ds) if isinstance(spec, str) else ("sources", ds, i)
        full = Path(pattern) if os.path.isabs(pattern) else params.root / pattern
        if GLOB_CHARS & set(pattern):
            hits = sorted(Path(m) for m in globmod.glob(str(full), recursive=True) if Path(m).is_file())
        elif full.is_dir():
            raise params_error(params, loc, f"'{pattern}' is a folder: name its files or a glob such as '{pattern}/*.csv'")
        else:
            hits = [full] if full.is_file() else []
        if not hits and not known:
            raise params_error(params, loc, f"'{pattern}' matches no file (paths are relative to {params._path.name}'s folder)")
        for h in hits:
            try:
                detect_format(h)
            except IngestError as exc:
                raise params_error(params, loc, f"'{pattern}' matches {_shown(params, h)}, which ingest cannot read "
                                                f"({redact(exc.message)[0]})") from None
        out.extend(hits)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def _tracked(root: Path, files: list[Path]) -> list[Path]:
    """Those of ``files`` that git tracks (landing files hold personal data: never in git)."""
    import subprocess

    inside = [f.resolve() for f in files if f.resolve().is_relative_to(root)]
    if not inside:
        return []
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--", *(str(f.relative_to(root)) for f in inside)],
                           cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [root / x for x in r.stdout.split("\0") if x] if r.returncode == 0 else []


def _synthetic_fingerprint(params: Params) -> dict[str, Any]:
    import lakehouse.synth

    return {"params": params.synthetic.model_dump(), "code": file_sha256(Path(lakehouse.synth.__file__))}


def _generate_if_needed(ws: Workspace, params: Params, prev: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    """Run the generator when its params or code changed since it last ran here, or when a file it
    wrote is gone without having been ingested; return the datasets it wrote (none when it did not run)."""
    synthetic = params.synthetic_datasets()
    if not synthetic:
        return []
    record = ws.config.workspace_dir / "pipeline" / "synthetic.json"
    fingerprint = _synthetic_fingerprint(params)
    last = json.loads(record.read_text()) if record.exists() else None
    prev_ds = prev.get("datasets") or {}

    def lost(ds: str) -> bool:
        f = _synthetic_file(ws, params, ds)
        return not f.exists() and not any(e["path"] == _shown(params, f) and already_ingested(seen, ds, e["sha256"])
                                          for e in (prev_ds.get(ds) or {}).get("files", []))

    if last == fingerprint and not any(lost(ds) for ds in synthetic):
        return []
    from lakehouse.synth import generate

    p = params.synthetic
    res = generate(ws.config.path(p.landing), people=p.people, transactions_per_person=p.transactions_per_person,
                   seed=p.seed, bias=p.bias, bad_rows=p.bad_rows, overwrite=True)
    write_json(record, fingerprint)
    return sorted(res.files)


def step_sources(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Each dataset's landing files, each recorded by path (PII-redacted) and sha256 in
    pipeline/sources.json: the generator's files for a ``synthetic`` source (it runs only when its
    params or code changed), the matches of each file or glob otherwise.

    DVC runs this stage every time (``always_changed``). Its output is ``persist``: the stage reads
    its last record and rewrites it only when the files changed, so ``dvc repro`` re-ingests new or
    changed landing files and runs nothing downstream when there are none. Files ingested before
    stay recorded after ingest removed them (``landing: remove``) — the record says what bronze
    holds — and an erasure's rewrite of a kept file is not a new file.
    """
    from lakehouse.landing import is_erasure_rewrite

    for ds in params.datasets:
        ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(ds))
    prev = json.loads(SOURCES.read_text()) if SOURCES.exists() else {}
    prev_ds = prev.get("datasets") or {}
    seen = ingested(ws)
    generated = _generate_if_needed(ws, params, prev, seen)
    found: dict[str, list[Path]] = {}
    known: dict[str, list[dict[str, Any]]] = {}  # recorded before and ingested since: what bronze holds
    for ds in params.datasets:
        known[ds] = [e for e in (prev_ds.get(ds) or {}).get("files", []) if already_ingested(seen, ds, e["sha256"])]
        if params.sources[ds] == SYNTHETIC:
            f = _synthetic_file(ws, params, ds)
            found[ds] = [f] if f.is_file() else []
        elif kafka_source(params.sources[ds]) is not None:
            found[ds] = []
        else:
            found[ds] = _match(params, ds, known=bool(known[ds]))
    tracked = _tracked(params.root, [f for ds in params.datasets for f in found[ds]])
    if tracked:
        raise PipelineError(f"{_shown(params, tracked[0])} is tracked by git: landing files hold personal data and stay "
                            "out of git and DVC", hint="git rm --cached it and list its folder in .gitignore")
    datasets: dict[str, Any] = {}
    for ds in params.datasets:
        topic = kafka_source(params.sources[ds])
        if topic is not None:  # a topic: its end offsets now (new records rerun ingest onwards)
            from lakehouse.stream import end_offsets

            datasets[ds] = {"stream": {"topic": topic[1], "end_offsets": end_offsets(ws, topic[1], topic[0])}}
            continue
        entries = {(e["path"], e["sha256"]): e for e in known[ds]}
        for f in found[ds]:
            sha, shown = file_sha256(f), _shown(params, f)
            if (shown, sha) in entries or is_erasure_rewrite(ws, ds, f):
                continue  # recorded already, or an erasure's rewrite of a kept file (its rows were ingested)
            entries[(shown, sha)] = {"path": shown, "sha256": sha, "bytes": f.stat().st_size}
        datasets[ds] = {"files": [entries[k] for k in sorted(entries)]}
    counts = {ds: len(d.get("files", [])) for ds, d in datasets.items()}
    if prev.get("datasets") == datasets:
        return {"changed": False, "files": counts, "generated": generated}
    run = ws.lineage.emit("pipeline.sources", outputs=[], dvc_stage="sources",
                          facets={"files": {ds: [e["sha256"] for e in d.get("files", [])] for ds, d in datasets.items()},
                                  "streams": {ds: d["stream"] for ds, d in datasets.items() if "stream" in d},
                                  "generated": generated})
    write_json(SOURCES, step_manifest(ws, "sources", run, datasets=datasets))
    return {"changed": True, "files": counts, "generated": generated}


def _find(ws: Workspace, params: Params, ds: str, entry: dict[str, Any]) -> Path | None:
    """The landing file a sources.json entry records, if it is still there with that content."""
    direct = params.root / entry["path"]
    if direct.is_file() and file_sha256(direct) == entry["sha256"]:
        return direct
    cands = ([_synthetic_file(ws, params, ds)] if params.sources[ds] == SYNTHETIC
             else _match(params, ds, known=True))  # a redacted name: find the file by its content
    return next((f for f in cands if f.is_file() and f != direct and file_sha256(f) == entry["sha256"]), None)


_COUNTS = ("rows_read", "rows_accepted", "rows_quarantined", "rows_skipped")


def step_ingest(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Ingest each landing file pipeline/sources.json records and this workspace has not ingested
    yet (by sha256) into bronze, vault and quarantine. Exactly once twice over: files already
    ingested are skipped here, and ingest's batch ledger skips any batch it has committed before."""
    from governance.lineage import DatasetRef
    from lakehouse.ingest import ingest
    from lakehouse.stream import stream

    man = read_json(SOURCES, stage="sources")
    seen = ingested(ws)
    files: dict[str, list[dict[str, Any]]] = {}
    reports: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    for ds in params.datasets:
        topic = kafka_source(params.sources[ds])
        if topic is not None:
            ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(ds))
            srep = stream(ws, actor, ds, topic[1], bootstrap=topic[0], batch_seconds=1.0, until_idle=2.0)
            reports[ds] = [srep.to_dict()]
            files[ds] = []
            summary[ds] = {"files": 0, "files_new": 0, "topic": topic[1], "rows_read": srep.rows_read,
                           "rows_accepted": srep.rows_accepted, "rows_quarantined": srep.rows_quarantined,
                           "rows_skipped": 0}
            continue
        entries = ((man.get("datasets") or {}).get(ds) or {}).get("files")
        if entries is None:
            raise PipelineError(f"{SOURCES} records no files of '{ds}': run the sources stage first (dvc repro)")
        ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(ds))
        files[ds], reports[ds] = [], []
        for e in entries:
            done = already_ingested(seen, ds, e["sha256"])
            status = "ingested earlier"
            if done is None:
                path = _find(ws, params, ds, e)
                if path is None:
                    raise PipelineError(f"{e['path']} ({ds}, sha256 {e['sha256'][:12]}…) is gone or changed since the "
                                        "sources stage recorded it, and was never ingested",
                                        hint="run dvc repro again: the sources stage records what is there now")
                rep = ingest(ws, actor, ds, [path], engine=params.engine)
                if not all(fr.balanced for fr in rep.files):
                    raise PipelineError(f"{e['path']}: rows read do not add up to accepted + quarantined + skipped")
                done = rep.to_dict()
                remember_ingested(ws, ds, e["sha256"], done)
                seen = ingested(ws)
                reports[ds].append(done)
                status = "ingested"
            files[ds].append({"path": e["path"], "sha256": e["sha256"], "status": status,
                              **{k: done.get(k) for k in _COUNTS}})
        summary[ds] = {"files": len(files[ds]), "files_new": sum(f["status"] == "ingested" for f in files[ds]),
                       **{k: sum(int(f[k] or 0) for f in files[ds]) for k in _COUNTS}}
    tables = {f"{layer}.{ds}": table_manifest(ws, layer, ds) for ds in params.datasets
              for layer in ("bronze", "quarantine", "vault") if _exists(ws, layer, ds)}
    run = ws.lineage.emit("pipeline.ingest", dvc_stage="ingest",
                          outputs=[DatasetRef(t, version=m["version"]) for t, m in tables.items()])
    write_json(REPORTS / "ingest.json", summary)
    write_json(OUT / "ingest.json", step_manifest(ws, "ingest", run, tables=tables, files=files, reports=reports))
    return summary


def _exists(ws: Workspace, layer: str, ds: str) -> bool:
    from lakehouse.catalog import Catalog, TableRef

    return Catalog(ws.config).exists(TableRef(layer, ds))  # type: ignore[arg-type]


def step_silver(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Rebuild silver (dedupe, impute, standardize, derive) from the bronze versions just pinned."""
    from governance.lineage import DatasetRef
    from lakehouse.silver import build_silver

    require_pinned(ws, read_json(OUT / "ingest.json", stage="ingest")["tables"], stage="ingest")
    out = {}
    for ds in params.datasets:
        rep = build_silver(ws, actor, ds, engine=params.engine)
        out[f"silver.{ds}"] = {**table_manifest(ws, "silver", ds), "bronze_version": rep.bronze_version}
    run = ws.lineage.emit("pipeline.silver", dvc_stage="silver",
                          outputs=[DatasetRef(t, version=m["version"]) for t, m in out.items()])
    write_json(OUT / "silver.json", step_manifest(ws, "silver", run, tables=out))
    return out


def _dataset_of(ws: Workspace, features: list[str]) -> tuple[str, list[str]]:
    from features.store import Features

    pol, cols = Features(ws).resolve(features)
    return pol.dataset, cols


def step_features(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Register the feature views with Feast, materialize the online store, and check that the
    training features are allowed for the training purpose (the gate, before any training)."""
    from features.store import Features
    from governance.lineage import DatasetRef

    silver = read_json(OUT / "silver.json", stage="silver")
    require_pinned(ws, silver["tables"], stage="silver")
    t = params.train
    dataset, cols = _dataset_of(ws, t.features)
    decision = ws.gate.enforce(Stage.FEATURES, actor, Resource.dataset(dataset),
                               {"purpose": t.purpose, "columns": [*cols, t.label]})
    fs = Features(ws)
    names = fs.apply(actor)
    versions = fs.materialize(actor)
    run = ws.lineage.emit("pipeline.features", dvc_stage="features",
                          inputs=[DatasetRef(k, version=v["version"]) for k, v in silver["tables"].items()],
                          outputs=[DatasetRef(f"feature_view:{v}", version=n, kind="feature_view") for v, n in versions.items()])
    body = {"objects": names, "materialized": versions, "purpose": t.purpose, "dataset": dataset, "features": t.features,
            "gate": {"allowed": decision.allowed, "rules": list(decision.rule_ids)}}
    write_json(OUT / "features.json", step_manifest(ws, "features", run, **body))
    return body


def _options(t: TrainParams):  # noqa: ANN202
    from training.trainer import TrainOptions

    return TrainOptions(hidden=tuple(t.hidden), epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                        max_grad_norm=t.max_grad_norm, target_epsilon=t.epsilon, delta=t.delta, seed=t.seed)


CANDIDATE_DIR = OUT / "candidate"


def step_train(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """One DP-SGD run into the candidate folder; ε and utility as DVC metrics, the curve as a plot."""
    from training.flow import fit_candidate

    read_json(OUT / "features.json", stage="features")
    t = params.train
    cand = fit_candidate(ws, actor, CANDIDATE_DIR, name=t.model, features=t.features, label=t.label, purpose=t.purpose,
                         options=_options(t), holdout=t.holdout, mitigation=t.mitigation)
    write_json(CANDIDATE_DIR / "stage.json", step_manifest(ws, "train", cand["lineage_run_ids"][-1], model=t.model,
                                                        data_versions=cand["data_versions"]))
    metrics = {"epsilon": cand["privacy"]["epsilon"], "delta": cand["privacy"]["delta"],
               "target_epsilon": t.epsilon, **{k: v for k, v in cand["utility"].items()},
               "rows_train": cand["rows"]["train"], "rows_holdout": cand["rows"]["holdout"]}
    if cand.get("cost"):  # what the build cost of the dataset's budget, from the ledger (the card states it too)
        metrics |= {"epsilon_spent": cand["cost"]["epsilon"], "delta_spent": cand["cost"]["delta"]}
    write_json(REPORTS / "train.json", metrics)
    write_json(REPORTS / "privacy_utility.json",
               [{"epoch": p["epoch"], "epsilon": round(p["epsilon"], 4), "auc": p["auc"], "log_loss": p["log_loss"]}
                for p in cand["curve"]])
    return metrics


def step_evaluate(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Fairness of the candidate on its holdout, against the policy's thresholds (a DVC metric)."""
    from training.flow import evaluate_candidate

    fair = evaluate_candidate(ws, actor, CANDIDATE_DIR, OUT / "evaluation.json")
    write_json(OUT / "evaluation.json", {**fair, **step_manifest(ws, "evaluate", fair.get("lineage_run_id"))})
    flat: dict[str, Any] = {"passed": fair["passed"], "failures": fair.get("failures", []),
                            "favourable_label": fair["favourable_label"]}  # which outcome "selected" means
    if fair.get("uncertainty"):
        flat["pass_rate"] = fair["uncertainty"]["pass_rate"]  # share of bootstrap resamples that pass
    for attr, ms in (fair.get("metrics") or {}).items():
        for m, v in ms.items():
            flat[f"{attr}.{m}"] = v
    write_json(REPORTS / "fairness.json", flat)
    return flat


def step_register(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Register the evaluated candidate; its card holds ε, utility, fairness and lineage."""
    from governance.lineage import DatasetRef
    from training.registry import Registry
    from training.flow import register_candidate

    ref = register_candidate(ws, actor, CANDIDATE_DIR, OUT / "evaluation.json")
    card = Registry(ws).card(ref)
    run = ws.lineage.emit("pipeline.register", dvc_stage="register",
                          outputs=[DatasetRef(f"model:{ref.name}", version=ref.version, kind="model")],
                          facets={"model": str(ref)})
    body = {"model": ref.name, "version": ref.version, "ref": str(ref), "dataset": card.dataset,
            "data_versions": card.data_versions,
            "fairness_passed": card.fairness.passed if card.fairness else None, "epsilon": card.privacy.epsilon}
    write_json(OUT / "register.json", step_manifest(ws, "register", run, **body))
    return body


def step_deploy(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """The deploy gate (approval, ε cap, fairness), then: render and validate the KServe
    InferenceService, start the predictor locally, send smoke requests, stop it."""
    import signal

    from governance.lineage import DatasetRef
    from serving.deploy import deploy
    from training.registry import Registry

    reg = read_json(OUT / "register.json", stage="register")
    ref = reg["ref"]
    rendered = deploy(ws, actor, ref, target="k8s", out_dir=ws.config.base_dir / params.deploy.manifests)
    port = free_port()
    local = deploy(ws, actor, ref, target="local", port=port)
    try:
        smoke = smoke_test(ws, local.url, reg["model"], Registry(ws).card(ref).dataset, params.deploy.smoke_requests)
    finally:
        try:
            os.killpg(local.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    run = ws.lineage.emit("pipeline.deploy", dvc_stage="deploy",
                          inputs=[DatasetRef(f"model:{reg['model']}", version=reg["version"], kind="model")],
                          facets={"manifest": os.path.relpath(rendered.manifest, ws.config.base_dir), **smoke})
    body = {"model": reg["model"], "version": reg["version"], "ref": ref,
            "manifest": os.path.relpath(rendered.manifest, ws.config.base_dir), "smoke": smoke}
    write_json(REPORTS / "deploy.json", {"smoke_ok": smoke["ok"], "smoke_requests": smoke["requests"],
                                         "p50_ms": smoke["p50_ms"]})
    if smoke["ok"] != smoke["requests"]:
        raise PipelineError(f"smoke test: {smoke['requests'] - smoke['ok']} of {smoke['requests']} requests failed "
                            f"(see .lakewarden/serving/{reg['model']}-server.log)")
    write_json(OUT / "deploy.json", step_manifest(ws, "deploy", run, **body))
    return body


#: The gate stage each step asks for first: an actor none of whose roles may run it is refused
#: (and audited) before the step reads any manifest (:meth:`Gate.require_stage`).
FIRST_STAGE = {"sources": Stage.INGEST, "ingest": Stage.INGEST, "silver": Stage.INGEST, "features": Stage.FEATURES,
               "train": Stage.FEATURES, "evaluate": Stage.EVALUATE, "register": Stage.REGISTER, "deploy": Stage.DEPLOY}

STEPS = {"sources": step_sources, "ingest": step_ingest, "silver": step_silver, "features": step_features,
          "train": step_train, "evaluate": step_evaluate, "register": step_register, "deploy": step_deploy}


class StepFailed(LakewardenError):
    """A stage broke on something that is not a user error: the message names the stage, the error
    and the file holding the traceback."""


def _outcome_path(ws: Workspace, stage: str) -> Path:
    return ws.config.workspace_dir / "pipeline" / "outcomes" / f"{stage}.json"


def step_outcome(ws: Workspace, stage: str) -> dict[str, Any] | None:
    """How ``stage`` last ended: ``status`` ok, denied (by the gate: ``rule_ids``), failed (a user
    error) or crashed (``traceback`` names the file), with ``message`` and ``at``; None if never run."""
    p = _outcome_path(ws, stage)
    return json.loads(p.read_text()) if p.exists() else None


def _record_outcome(ws: Workspace, stage: str, status: str, message: str = "", **extra: Any) -> None:
    from governance.pii import redact

    write_json(_outcome_path(ws, stage), {"stage": stage, "status": status, "message": redact(message)[0],
                                          "at": datetime.now(timezone.utc).isoformat(), **extra})


def is_fairness_rule(rule_id: str) -> bool:
    """A deploy-gate rule about the fairness verdict (``<dataset>/fairness[/metric]``)."""
    parts = rule_id.split("/")
    return len(parts) >= 2 and parts[1] == "fairness"


def _refuse_stale(ws: Workspace, params: Params) -> None:
    from lakewarden.pipeline.dvcyaml import stale

    diff = stale(ws, params)
    if diff:
        where = "is missing" if diff == ["dvc.yaml"] else f"is stale (stage {', '.join(diff)})"
        raise PipelineError(f"dvc.yaml {where}: it does not match {params._path.name} and the policies",
                            hint="run `lakewarden pipeline render`, then dvc repro")


def run_step(ws: Workspace, actor: Actor, stage: str, params_path: Path = PARAMS) -> dict[str, Any]:
    """Run one stage and record how it ended (:func:`step_outcome`), so a caller of ``dvc repro`` can
    tell a gate's refusal from a failure.

    Raises:
        AccessDenied: the gate refused (exit 3). LakewardenError: a user error (its own exit code).
        StepFailed: anything else (exit 1); the traceback is saved under ``<workspace>/crash/``.
    """
    from governance.errors import AccessDenied
    from lakewarden.process import crash_dir, crash_line, save_crash

    if stage not in STEPS:
        raise PipelineError(f"unknown stage '{stage}' (stages: {', '.join(STEPS)})")
    try:
        ws.gate.require_stage(FIRST_STAGE[stage], actor, Resource.system("pipeline"))
        params = load_params(params_path, ws)
        if os.environ.get("DVC_STAGE"):  # run by dvc repro: dvc.yaml must say what this configuration needs
            _refuse_stale(ws, params)
        out = STEPS[stage](ws, actor, params)
    except AccessDenied as exc:
        rules = list(getattr(getattr(exc, "decision", None), "rule_ids", None) or [])
        _record_outcome(ws, stage, "denied", exc.message, rule_ids=rules)
        raise
    except LakewardenError as exc:
        _record_outcome(ws, stage, "failed", exc.message)
        raise
    except Exception as exc:  # a bug: one line for the user, the traceback in a file
        path = save_crash(exc, crash_dir(ws.config.workspace_dir), command=f"lakewarden pipeline stage {stage}")
        line = crash_line(exc, path)
        _record_outcome(ws, stage, "crashed", line, traceback=str(path))
        raise StepFailed(f"stage {stage} failed: {line}") from None
    _record_outcome(ws, stage, "ok")
    return out


# -- after dvc repro: lineage ties and checkout -------------------------------------------
