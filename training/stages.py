"""The training side of the reference pipeline as three separate steps: fit, evaluate, register.

:func:`training.pipeline.train_model` does all three in one call (and decides on mitigation
after seeing the fairness verdict). The DVC pipeline runs them as separate stages so that
each is gated, cached and rerun on its own:

* :func:`fit_candidate` — a point-in-time training set as of a fixed time ``at``, its label
  encoded by the policy's declaration (``labels:``; an undeclared label or a value outside the
  declared pair is refused before anything is reserved), a budget reservation in the privacy
  ledger, one DP-SGD run (with Kamiran–Calders reweighing when
  the params ask for it: a pre-processing mitigation chosen up front, not after peeking at
  the holdout), the per-epoch privacy–utility curve, and a *candidate* folder holding the
  weights, the encoder, the drift reference and ``candidate.json``. Nothing in the folder
  is personal: weights, bin shares, metrics and a digest of the holdout's tokens.
* :func:`evaluate_candidate` — rebuilds the same training set (same ``at``, same silver
  version, checked), re-derives the same holdout (checked by digest), scores it, decrypts
  the sensitive attributes of the holdout only (gated, purpose ``fairness_evaluation``,
  audited) and writes ``fairness.json`` with the policy's verdict and the favourable outcome
  it measured (the label's declaration, checked to be the one the candidate was trained on).
* :func:`register_candidate` — the model card from both files, and the registry version. The
  candidate's run is recorded in the ledger with a build id; the card's ``privacy.cost`` is that
  build's runs, summed from the ledger by the registry.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from features.store import Features, TrainingSet
from governance.errors import LakewardenError
from governance.gate import Actor
from governance.ledger import PrivacyLedger, new_build_id
from governance.lineage import DatasetRef
from governance.workspace import Workspace
from training.encode import Encoder
from training.fairness import (
    check_fairness, decrypt_sensitive, fairness_metrics, fairness_uncertainty, gate_context, reweighing,
)
from training.labels import FAVOURABLE, check_label_column, declared_label
from training.pipeline import _prepare, _split, _threshold, _utility, budgeted_run
from training.reference import Reference
from training.registry import ModelRef, Registry
from training.trainer import TrainOptions, predict_proba, train

CANDIDATE = "candidate.json"
FAIRNESS = "fairness.json"
ARTIFACTS = ("model.pt", "encoder.json", "reference.json")


class StageError(LakewardenError):
    """A training stage cannot go on; the message says why and what to do."""

    exit_code = 2


def _training_set(ws: Workspace, actor: Actor, *, purpose: str, features: list[str], label: str,
                  at: datetime) -> tuple[TrainingSet, pa.Table]:
    fs = Features(ws)
    check_label_column(ws.policies, fs._resolve(features)[0], label)  # before any data is read
    ts = fs.training_set(actor, purpose=purpose, features=features, label=label, at=at)
    key = ws.policies.dataset(ts.dataset).subject_key
    table = ts.table.sort_by(key)  # a stable order: the split must be the same in every stage
    if table.num_rows < 10:
        raise StageError(f"the training set has {table.num_rows} rows: too few to train on")
    return ts, table


def _digest(tokens: list[str]) -> str:
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def fit_candidate(
    ws: Workspace,
    actor: Actor,
    out_dir: Path,
    *,
    name: str,
    features: list[str],
    label: str,
    purpose: str,
    options: TrainOptions,
    holdout: float = 0.2,
    mitigation: Literal["none", "reweighing"] = "none",
    at: datetime | None = None,
) -> dict[str, Any]:
    """Train one private candidate into ``out_dir``; return the contents of ``candidate.json``."""
    warnings.filterwarnings("ignore", module="opacus")
    at = at or datetime.now(timezone.utc)
    ts, table = _training_set(ws, actor, purpose=purpose, features=features, label=label, at=at)
    pol = ws.policies.dataset(ts.dataset)
    key = pol.subject_key
    cols = [f.split(":", 1)[1] for f in features]
    outcome = declared_label(ws.policies, pol, label, values=table[label])
    prep = _prepare(table, cols, outcome.encode(table[label], where=" (training set)"), holdout, options.seed)
    tr, te, enc, X_tr, X_te, y_tr, y_te = prep.tr, prep.te, prep.enc, prep.X_tr, prep.X_te, prep.y_tr, prep.y_te
    tokens = table[key].to_pylist()
    weights = None
    if mitigation == "reweighing":
        if pol.fairness is None:
            raise StageError(f"mitigation 'reweighing' needs a fairness section in policies for '{ts.dataset}'")
        sens_tr = decrypt_sensitive(ws, actor, ts.dataset, [tokens[i] for i in tr], purpose="fairness_evaluation")
        weights = reweighing(y_tr.astype(int), {a: sens_tr[a] for a in pol.fairness.sensitive_attributes})
    build = new_build_id()
    ledger = PrivacyLedger(ws)
    result, res = budgeted_run(ledger, actor, ts.dataset, purpose=purpose, options=options, columns=cols,
                               fit=lambda: train(X_tr, y_tr, options, sample_weight=weights, eval_set=(X_te, y_te)),
                               model=name, build=build)
    cost = ledger.build_cost(build)
    p_tr = predict_proba(result, X_tr)
    threshold = _threshold(p_tr, y_tr)
    utility = _utility(y_te, predict_proba(result, X_te), threshold)
    run = ws.lineage.emit(
        f"train.{name}",
        inputs=[DatasetRef(t, version=v) for t, v in ts.sources.items()],
        outputs=[DatasetRef(f"candidate:{name}", kind="model")],
        facets={"purpose": purpose, "features": features, "epsilon": float(result.epsilon), "ledger_runs": [res.run_id],
                "mitigation": mitigation},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = Reference.from_table(prep.train_rows, score=[float(v) for v in p_tr], columns=cols)
    (out_dir / "model.pt").write_bytes(result.state_dict)
    (out_dir / "encoder.json").write_text(json.dumps(enc.to_dict(), sort_keys=True))
    (out_dir / "reference.json").write_text(reference.to_json())
    opts = asdict(options)
    cand: dict[str, Any] = {
        "name": name, "dataset": ts.dataset, "purpose": purpose, "features": features, "label": label,
        "favourable_label": outcome.describe(),
        "at": at.isoformat(), "holdout": holdout, "seed": options.seed, "mitigation": mitigation,
        "data_versions": ts.sources, "rows": {"train": int(len(tr)), "holdout": int(len(te))},
        "holdout_digest": _digest([tokens[i] for i in te]),
        "privacy": {"epsilon": float(result.epsilon), "delta": options.delta, "accountant": options.accountant,
                    "target_epsilon": options.target_epsilon, "noise_multiplier": result.noise_multiplier,
                    "max_grad_norm": options.max_grad_norm, "epochs": options.epochs,
                    "sample_rate": result.sample_rate, "ledger_run": res.run_id, "build": build},
        "cost": {"build": build, "epsilon": cost.epsilon, "delta": cost.delta, "runs": len(cost.runs)},
        "utility": utility, "curve": result.curve,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
        "preprocessing": {"encoder": enc.to_dict(), "threshold": threshold,
                          "hidden": list(options.hidden), "n_features": result.n_features},
        "lineage_run_ids": [r for r in (ts.run_id, run) if r],
        "gate_decisions": [{"stage": d.stage.value, "rule_ids": list(d.rule_ids), "allowed": d.allowed}
                           for d in (ts.decision, res.decision) if d is not None],
        "device": result.device,
    }
    (out_dir / CANDIDATE).write_text(json.dumps(cand, indent=2, sort_keys=True, default=_json_default))
    return json.loads((out_dir / CANDIDATE).read_text())


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, datetime):
        return o.isoformat()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_candidate(cand_dir: Path) -> dict[str, Any]:
    path = cand_dir / CANDIDATE
    if not path.exists():
        raise StageError(f"{path} does not exist: run the train stage first")
    missing = [f for f in ARTIFACTS if not (cand_dir / f).exists()]
    if missing:
        raise StageError(f"{cand_dir} lacks {', '.join(missing)}: rerun the train stage")
    return json.loads(path.read_text())


def evaluate_candidate(ws: Workspace, actor: Actor, cand_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Fairness of the candidate on its holdout, judged by the policy; writes it to ``out``
    (default ``<cand_dir>/fairness.json``) and returns it."""
    cand = load_candidate(cand_dir)
    at = datetime.fromisoformat(cand["at"])
    ts, table = _training_set(ws, actor, purpose=cand["purpose"], features=cand["features"], label=cand["label"], at=at)
    if ts.sources != cand["data_versions"]:
        raise StageError(f"the data changed since the candidate was trained ({cand['data_versions']} then, "
                         f"{ts.sources} now): rerun the train stage")
    pol = ws.policies.dataset(ts.dataset)
    key = pol.subject_key
    tokens = table[key].to_pylist()
    _, te = _split(table.num_rows, cand["holdout"], cand["seed"])
    if _digest([tokens[i] for i in te]) != cand["holdout_digest"]:
        raise StageError("the holdout differs from the one the candidate was trained beside: rerun the train stage")
    cols = [f.split(":", 1)[1] for f in cand["features"]]
    outcome = declared_label(ws.policies, pol, cand["label"])
    if cand.get("favourable_label") != outcome.describe():
        raise StageError(f"the declaration of label '{outcome.column}' is not the one the candidate was trained with "
                         f"(then {cand.get('favourable_label')}, now {outcome.describe()}): rerun the train stage")
    enc = Encoder.from_dict(cand["preprocessing"]["encoder"])
    holdout_rows = table.take(pa.array(te))
    X_te = enc.transform(holdout_rows)
    y_te = outcome.encode(holdout_rows[cand["label"]], where=" (holdout)")
    pre = cand["preprocessing"]
    p = predict_proba((cand_dir / "model.pt").read_bytes(), X_te, n_features=pre["n_features"], hidden=tuple(pre["hidden"]))
    utility = _utility(y_te, p, pre["threshold"])
    res: dict[str, Any] = {"model": cand["name"], "utility": utility, "columns": cols,
                           "favourable_label": outcome.describe()}
    if pol.fairness is None:
        res.update({"passed": None, "note": f"policies for '{ts.dataset}' set no fairness thresholds"})
    else:
        sens = decrypt_sensitive(ws, actor, ts.dataset, [tokens[i] for i in te], purpose="fairness_evaluation")
        y_hat = (p > pre["threshold"]).astype(int)
        metrics = fairness_metrics(y_te.astype(int), y_hat, sens, pos_label=FAVOURABLE)
        verdict = check_fairness(metrics, pol)
        res.update({"metrics": gate_context(metrics), "passed": verdict.passed, "failures": list(verdict.failures),
                    "thresholds": pol.fairness.model_dump(mode="json"),
                    "uncertainty": fairness_uncertainty(y_te.astype(int), y_hat, sens, pol.fairness,
                                                        pos_label=FAVOURABLE, seed=int(cand["seed"]))})
    run = ws.lineage.emit(
        f"evaluate.{cand['name']}",
        inputs=[DatasetRef(t, version=v) for t, v in ts.sources.items()] + [DatasetRef(f"candidate:{cand['name']}", kind="model")],
        outputs=[],
        facets={"purpose": "fairness_evaluation", "passed": res["passed"]},
    )
    res["lineage_run_id"] = run
    out = out or cand_dir / FAIRNESS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True))
    return res


def _card_privacy(privacy: dict[str, Any]) -> dict[str, Any]:
    """The card's privacy from the candidate's: its ledger run and build become ``cost`` (the registry
    sums the build's runs from the ledger); a candidate from before builds has none (unknown)."""
    out = {k: v for k, v in privacy.items() if k not in ("ledger_run", "build")}
    if privacy.get("build") and privacy.get("ledger_run"):
        out["cost"] = {"build": privacy["build"], "released_run": privacy["ledger_run"]}
    return out


def register_candidate(ws: Workspace, actor: Actor, cand_dir: Path, fairness: Path | None = None) -> ModelRef:
    """Register the evaluated candidate (its evaluation in ``fairness``) as the next version of its model."""
    cand = load_candidate(cand_dir)
    fpath = fairness or cand_dir / FAIRNESS
    if not fpath.exists():
        raise StageError(f"{fpath} does not exist: run the evaluate stage first")
    fair = json.loads(fpath.read_text())
    card_fields: dict[str, Any] = {
        "purpose": cand["purpose"], "features": cand["features"], "label": cand["label"],
        "favourable_label": cand.get("favourable_label"),
        "data_versions": cand["data_versions"], "privacy": _card_privacy(cand["privacy"]),
        "utility": cand["utility"],
        "mitigation": None if cand["mitigation"] == "none" else {"method": "reweighing (Kamiran & Calders)", "applied": "before training"},
        "lineage_run_ids": cand["lineage_run_ids"] + ([fair["lineage_run_id"]] if fair.get("lineage_run_id") else []),
        "gate_decisions": cand["gate_decisions"],
        "preprocessing": cand["preprocessing"],
    }
    if fair.get("passed") is not None:
        card_fields["fairness"] = {**fair["metrics"], "passed": fair["passed"], "failures": fair["failures"],
                                   **({"uncertainty": fair["uncertainty"]} if fair.get("uncertainty") else {})}
    files = {f: cand_dir / f for f in ARTIFACTS}
    return Registry(ws).register(actor, name=cand["name"], dataset=cand["dataset"], files=files, card_fields=card_fields)


__all__ = ["fit_candidate", "evaluate_candidate", "register_candidate", "load_candidate", "StageError"]
