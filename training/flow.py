"""The training flow: fit a private model, evaluate its fairness, register it with its card.

One flow, three steps, two ways to run them:

* :func:`train_model` runs fit → evaluate → register in one call (the CLI's ``train``), and
  decides on mitigation after seeing the fairness verdict: a failed verdict is retrained
  once with Kamiran–Calders reweighing (a second private run with its own reservation, under
  the same build id) and the mitigated model is kept with before/after metrics.
* The reference pipeline (``dvc.yaml``) runs each step as its own stage, so that each is
  gated, cached and rerun on its own: :func:`fit_candidate` → :func:`evaluate_candidate` →
  :func:`register_candidate`, passing a *candidate* folder between them.

Both call the same steps: :func:`_load` (the training set), :func:`_fit` (one private run),
:func:`_evaluate` (fairness on the holdout), :func:`_register` (the card and the registry
version).

**fit.** The label is checked against the dataset policy's ``labels:`` declaration, a
point-in-time training set is built from the feature store (gated by purpose: no sensitive
attribute reaches a ``credit_scoring`` model) and the label is encoded by the declaration —
an undeclared label, a NULL or a value outside the declared pair is refused
(:class:`~training.labels.LabelError`, exit 2) before any budget is reserved. The run's ε is
reserved in the privacy ledger (:func:`budgeted_run`: the gate refuses, before any training,
a run that would take the dataset past its total ε, and says how much is left), the MLP is
trained with Opacus DP-SGD (target ε and δ from the options, capped by policy; optionally
data-parallel across processes) and the ε the accountant reports is committed. Accuracy and
AUC are measured on a holdout.

**evaluate.** Fairness across the policy's sensitive attributes — decrypted only here, for
purpose ``fairness_evaluation``, audited — judged by :func:`governance.fairness.judge`, with a
bootstrap of the verdict's pass rate.

**register.** Weights, the feature encoder, the drift profile and a model card (data
versions, ε, δ, accountant, utility, fairness, lineage run ids, gate decisions). The card
states the released run's (ε, δ) and what the build cost in all (``privacy.cost``: every run
of the build, summed from the ledger by the registry — a failed first run included).

The stages, in more detail:

* :func:`fit_candidate` — the training set as of a fixed time ``at`` (sorted by subject, so
  every stage derives the same split), one private run (with reweighing when the params ask
  for it: a pre-processing mitigation chosen up front, not after peeking at the holdout), the
  per-epoch privacy–utility curve, and a candidate folder holding the weights, the encoder,
  the drift profile and ``candidate.json``. Nothing in the folder is personal: weights, bin
  shares, metrics and a digest of the holdout's tokens.
* :func:`evaluate_candidate` — rebuilds the same training set (same ``at``, same silver
  version, checked), re-derives the same holdout (checked by digest), scores it, and writes
  ``fairness.json`` with the policy's verdict and the favourable outcome it measured (the
  label's declaration, checked to be the one the candidate was trained on).
* :func:`register_candidate` — the model card from both files, and the registry version.

The label is encoded 1 for its unfavourable value and 0 for its favourable one, as the policy
declares them (``labels: {defaulted: {favourable: false}}`` for the demo: the score is the risk
of default). Fairness is measured on the favourable outcome: a predicted 0 is the "selected"
outcome; the card's ``favourable_label`` names the column and both values.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa

from features.store import Features, TrainingSet
from governance.errors import AccessDenied, LakewardenError
from governance.fairness import FairnessVerdict
from governance.gate import Actor
from governance.ledger import PrivacyLedger, Reservation, new_build_id
from governance.lineage import DatasetRef
from governance.policy import DatasetPolicy
from governance.workspace import Workspace
from training.encode import Encoder
from training.fairness import (
    check_fairness, decrypt_sensitive, fairness_metrics, fairness_uncertainty, gate_context, mitigation_report, reweighing,
)
from training.labels import FAVOURABLE, LabelEncoding, check_label_column, declared_label
from training.profile import Profile
from training.registry import ModelCard, ModelRef, Registry
from training.trainer import TrainOptions, TrainResult, predict_proba, train, train_distributed, train_on_ray

__all__ = [
    "FAVOURABLE_LABEL",
    "StageError",
    "TrainingOutcome",
    "budgeted_run",
    "evaluate_candidate",
    "fit_candidate",
    "load_candidate",
    "register_candidate",
    "train_model",
]

FAVOURABLE_LABEL = FAVOURABLE  # the encoded favourable outcome (0); which value it is, the policy says
PURPOSE = "fairness_evaluation"
CANDIDATE = "candidate.json"
FAIRNESS = "fairness.json"
ARTIFACTS = ("model.pt", "encoder.json", "reference.json")
REWEIGHING = "reweighing (Kamiran & Calders)"


class StageError(LakewardenError):
    """A training stage cannot go on; the message says why and what to do."""

    exit_code = 2


@dataclass
class TrainingOutcome:
    ref: ModelRef
    card: ModelCard
    epsilon_spent: float  # all private runs of this call together
    runs: list[str] = field(default_factory=list)  # ledger run ids
    build: str | None = None  # the build id its ledger runs carry


# ----------------------------------------------------------------------------- the steps


def _split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - holdout)))
    return np.sort(idx[:cut]), np.sort(idx[cut:])


@dataclass(frozen=True)
class _Prepared:
    """A training set split into training and holdout rows, encoded by an encoder fit on the training rows."""

    tr: np.ndarray
    te: np.ndarray
    train_rows: pa.Table  # the feature columns of the training rows
    enc: Encoder
    X_tr: np.ndarray
    X_te: np.ndarray
    y_tr: np.ndarray
    y_te: np.ndarray


def _prepare(table: pa.Table, cols: list[str], y_all: np.ndarray, holdout: float, seed: int) -> _Prepared:
    tr, te = _split(table.num_rows, holdout, seed)
    train_rows = table.take(pa.array(tr)).select(cols)
    enc = Encoder.fit(train_rows, cols)
    return _Prepared(tr, te, train_rows, enc, enc.transform(train_rows), enc.transform(table.take(pa.array(te))),
                     y_all[tr], y_all[te])


@dataclass(frozen=True)
class _Data:
    """A training set read for one flow: the gated set, its policy, the declared label, the split."""

    ts: TrainingSet
    table: pa.Table
    pol: DatasetPolicy
    outcome: LabelEncoding
    cols: list[str]
    tokens: list[str]
    prep: _Prepared

    def holdout_tokens(self) -> list[str]:
        return [self.tokens[i] for i in self.prep.te]

    def training_tokens(self) -> list[str]:
        return [self.tokens[i] for i in self.prep.tr]


def _training_set(ws: Workspace, actor: Actor, *, purpose: str, features: list[str], label: str,
                  at: datetime | None, sort: bool, engine: str = "local") -> tuple[TrainingSet, pa.Table]:
    """The gated training set; ``sort``: by subject (a stable order: every stage derives the same split);
    ``engine``: where the point-in-time join runs (``ray``: per subject bucket on the cluster)."""
    fs = Features(ws)
    check_label_column(ws.policies, fs.resolve(features)[0], label)  # before any data is read
    ts = fs.training_set(actor, purpose=purpose, features=features, label=label, engine=engine,
                         **({"at": at} if at is not None else {}))
    table = ts.table.sort_by(ws.policies.dataset(ts.dataset).subject_key) if sort else ts.table
    return ts, table


def _enough_rows(table: pa.Table, error: type[Exception]) -> None:
    if table.num_rows < 10:
        raise error(f"the training set has {table.num_rows} rows: too few to train on")


def _load(ws: Workspace, actor: Actor, *, purpose: str, features: list[str], label: str, holdout: float, seed: int,
          at: datetime | None = None, sort: bool = False, too_few: type[Exception] = ValueError,
          engine: str = "local") -> _Data:
    """Step 0: the training set, its label encoded by the declaration (refused before any budget), split."""
    ts, table = _training_set(ws, actor, purpose=purpose, features=features, label=label, at=at, sort=sort,
                              engine=engine)
    pol = ws.policies.dataset(ts.dataset)
    cols = [f.split(":", 1)[1] for f in features]
    outcome = declared_label(ws.policies, pol, label, values=table[label])
    y_all = outcome.encode(table[label], where=" (training set)")  # refused here: nothing reserved yet
    _enough_rows(table, too_few)
    prep = _prepare(table, cols, y_all, holdout, seed)
    return _Data(ts, table, pol, outcome, cols, table[pol.subject_key].to_pylist(), prep)


def _threshold(p_train: np.ndarray, y_train: np.ndarray) -> float:
    """The score above which the model predicts the positive label: chosen so that it predicts
    as many positives on the training rows as there are (a rare label otherwise never fires)."""
    rate = float(y_train.mean())
    if rate <= 0 or rate >= 1:
        return 0.5
    return float(np.quantile(p_train, 1 - rate))


def _utility(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    out = {"accuracy": float(((p > threshold) == (y > 0.5)).mean()), "positive_rate": float((p > threshold).mean()),
           "threshold": float(threshold)}
    if len(np.unique(y)) == 2:
        out["auc"] = float(roc_auc_score(y, p))
    return out


def budgeted_run(
    ledger: PrivacyLedger, actor: Actor, dataset: str, *, purpose: str, options: TrainOptions, columns: list[str],
    fit: Callable[[], TrainResult], model: str | None = None, build: str | None = None,
) -> tuple[TrainResult, Reservation]:
    """One private run inside the ledger: reserve its ε through the gate (refused before any
    training when the budget cannot pay), run ``fit``, commit the ε the accountant reports. A run
    that fails after touching the data is committed at its target: that privacy is spent.
    ``model`` and ``build`` are recorded with the run (what the model card's cost sums)."""
    res = ledger.reserve(actor, dataset, purpose=purpose, epsilon=options.target_epsilon, delta=options.delta,
                         accountant=options.accountant, columns=columns, model=model, build=build)
    try:
        result = fit()
    except BaseException:
        ledger.commit(res.run_id, epsilon=options.target_epsilon, actor=actor.name)
        raise
    ledger.commit(res.run_id, epsilon=float(result.epsilon), actor=actor.name)
    return result, res


@dataclass(frozen=True)
class _Fitted:
    """One private run and what it scores: the training rows' scores, the threshold, holdout utility."""

    result: TrainResult
    reservation: Reservation
    p_tr: np.ndarray
    p_te: np.ndarray
    threshold: float
    utility: dict[str, float]


def _fit(ws: Workspace, actor: Actor, data: _Data, ledger: PrivacyLedger, *, name: str, purpose: str,
         options: TrainOptions, build: str, sample_weight: np.ndarray | None = None, world_size: int = 1,
         curve: bool = False, engine: str = "local") -> _Fitted:
    """Step 1: one private run (budgeted), its threshold from the training rows only, its holdout utility.

    ``curve``: record the per-epoch privacy–utility curve on the holdout (one process only).
    """
    p = data.prep

    def fit() -> TrainResult:
        if engine == "ray" and sample_weight is None:
            return train_on_ray(ws, p.X_tr, p.y_tr, options, workers=world_size)
        if world_size > 1 and sample_weight is None:
            return train_distributed(p.X_tr, p.y_tr, options, world_size=world_size)
        return train(p.X_tr, p.y_tr, options, sample_weight=sample_weight,
                     **({"eval_set": (p.X_te, p.y_te)} if curve else {}))

    result, res = budgeted_run(ledger, actor, data.ts.dataset, purpose=purpose, options=options, columns=data.cols,
                               fit=fit, model=name, build=build)
    p_tr = predict_proba(result, p.X_tr)
    threshold = _threshold(p_tr, p.y_tr)  # from training rows only: the holdout stays unseen
    p_te = predict_proba(result, p.X_te)
    return _Fitted(result, res, p_tr, p_te, threshold, _utility(p.y_te, p_te, threshold))


@dataclass(frozen=True)
class _Evaluation:
    metrics: dict[str, dict[str, Any]]
    verdict: FairnessVerdict
    pred: np.ndarray


def _evaluate(pol: DatasetPolicy, y_te: np.ndarray, p_te: np.ndarray, threshold: float,
              sens: dict[str, list[str | None]]) -> _Evaluation:
    """Step 2: fairness of the holdout's predictions (favourable outcome "selected"), judged by the policy.

    ``sens``: the holdout's sensitive attributes, from :func:`decrypt_sensitive`.
    """
    pred = (p_te > threshold).astype(int)
    metrics = fairness_metrics(y_te.astype(int), pred, sens, pos_label=FAVOURABLE_LABEL,
                               min_group_size=pol.fairness.min_group_size if pol.fairness else 1)
    return _Evaluation(metrics, check_fairness(metrics, pol), pred)


def _fairness_fields(pol: DatasetPolicy, y_te: np.ndarray, ev: _Evaluation, sens: dict[str, list[str | None]],
                     seed: int) -> dict[str, Any]:
    """What the card and ``fairness.json`` hold of an evaluation: metrics, verdict, bootstrap."""
    return {"metrics": gate_context(ev.metrics), "passed": ev.verdict.passed, "failures": list(ev.verdict.failures),
            **({"not_measured": ev.verdict.notes} if ev.verdict.notes else {}),  # what the verdict does not cover
            "uncertainty": fairness_uncertainty(y_te.astype(int), ev.pred, sens, pol,
                                                pos_label=FAVOURABLE_LABEL, seed=seed)}


def _artifacts(result: TrainResult | bytes, enc: Encoder, rows: pa.Table, p_tr: np.ndarray,
               cols: list[str]) -> dict[str, bytes]:
    """The registered files: weights, the encoder, and the drift profile (bin shares of the
    training features and scores: summaries, never rows; stored as ``reference.json``)."""
    profile = Profile.from_table(rows, score=[float(v) for v in p_tr], columns=cols)
    weights = result.state_dict if isinstance(result, TrainResult) else result
    return {"model.pt": weights, "encoder.json": json.dumps(enc.to_dict(), sort_keys=True).encode(),
            "reference.json": profile.to_json().encode()}


def _preprocessing(enc: Encoder, threshold: float, options: TrainOptions, result: TrainResult) -> dict[str, Any]:
    return {"encoder": enc.to_dict(), "threshold": threshold, "hidden": list(options.hidden),
            "n_features": result.n_features}


def _register(ws: Workspace, actor: Actor, *, name: str, dataset: str, files: dict[str, Any],
              card_fields: dict[str, Any], fairness: dict[str, Any] | None) -> ModelRef:
    """Step 3: the registry version; ``fairness`` (metrics, verdict, bootstrap) becomes the card's."""
    if fairness is not None:
        card_fields = {**card_fields, "fairness": {
            **fairness["metrics"], "passed": fairness["passed"], "failures": fairness["failures"],
            **({"uncertainty": fairness["uncertainty"]} if fairness.get("uncertainty") else {})}}
    return Registry(ws).register(actor, name=name, dataset=dataset, files=files, card_fields=card_fields)


# ----------------------------------------------------------------------------- in one call


def train_model(
    ws: Workspace,
    actor: Actor,
    *,
    name: str,
    features: list[str],
    label: str,
    purpose: str,
    options: TrainOptions = TrainOptions(),
    holdout: float = 0.2,
    mitigate: bool = True,
    world_size: int = 1,
    engine: str = "local",
) -> TrainingOutcome:
    """Fit, evaluate (retrain with reweighing once if the verdict fails and ``mitigate``), register.

    See the module docstring. Returns the registered version, its card, the ε all private runs
    of this call spent together, their ledger run ids and their build id.
    """
    warnings.filterwarnings("ignore", module="opacus")
    data = _load(ws, actor, purpose=purpose, features=features, label=label, holdout=holdout, seed=options.seed,
                 engine=engine)
    ts, pol, prep = data.ts, data.pol, data.prep
    ledger = PrivacyLedger(ws)
    build = new_build_id()  # every private run of this call: the card's cost sums them
    decisions: list[Any] = [ts.decision]
    fits: list[_Fitted] = []

    def fit(sample_weight: np.ndarray | None) -> _Fitted:
        f = _fit(ws, actor, data, ledger, name=name, purpose=purpose, options=options, build=build,
                 sample_weight=sample_weight, world_size=world_size, engine=engine)
        decisions.append(f.reservation.decision)
        fits.append(f)
        return f

    released = fit(None)
    fairness: dict[str, Any] | None = None
    mitigation = None
    if pol.fairness is not None:
        sens = decrypt_sensitive(ws, actor, ts.dataset, data.holdout_tokens(), purpose=PURPOSE)
        ev = _evaluate(pol, prep.y_te, released.p_te, released.threshold, sens)
        if not ev.verdict.passed and mitigate:
            sens_tr = decrypt_sensitive(ws, actor, ts.dataset, data.training_tokens(), purpose=PURPOSE)
            weights = reweighing(prep.y_tr.astype(int), {a: sens_tr[a] for a in pol.fairness.sensitive_attributes})
            try:
                mitigated = fit(weights)
            except AccessDenied as exc:  # no budget left for a second run: keep the first, say why
                mitigation = {"method": REWEIGHING, "skipped": exc.message, "passed_before": ev.verdict.passed}
            else:
                ev2 = _evaluate(pol, prep.y_te, mitigated.p_te, mitigated.threshold, sens)
                mitigation = {"method": REWEIGHING, "report": mitigation_report(ev.metrics, ev2.metrics),
                              "utility_before": released.utility, "utility_after": mitigated.utility,
                              "passed_before": ev.verdict.passed, "passed_after": ev2.verdict.passed}
                released, ev = mitigated, ev2
        fairness = _fairness_fields(pol, prep.y_te, ev, sens, options.seed)

    runs = [f.reservation.run_id for f in fits]
    spent = sum(float(f.result.epsilon) for f in fits)
    train_run = ws.lineage.emit(
        f"train.{name}",
        inputs=[DatasetRef(t, version=v) for t, v in ts.sources.items()],
        outputs=[DatasetRef(f"model:{name}", kind="model")],
        facets={"purpose": purpose, "features": features, "epsilon": spent, "ledger_runs": runs, "build": build},
    )
    result = released.result
    card_fields: dict[str, Any] = {
        "purpose": purpose,
        "features": features,
        "label": label,
        "favourable_label": data.outcome.describe(),
        "data_versions": ts.sources,
        "privacy": {
            "epsilon": float(result.epsilon), "delta": options.delta, "accountant": options.accountant,
            "target_epsilon": options.target_epsilon, "noise_multiplier": result.noise_multiplier,
            "max_grad_norm": options.max_grad_norm, "epochs": options.epochs, "sample_rate": result.sample_rate,
            "cost": {"build": build, "released_run": released.reservation.run_id},  # the registry sums the build's runs
        },
        "utility": released.utility,
        "mitigation": mitigation,
        "lineage_run_ids": [r for r in (ts.run_id, train_run) if r],
        "gate_decisions": [d for d in decisions if d is not None],
        "preprocessing": _preprocessing(prep.enc, released.threshold, options, result),
    }
    files = _artifacts(result, prep.enc, prep.train_rows, released.p_tr, data.cols)
    ref = _register(ws, actor, name=name, dataset=ts.dataset, files=files, card_fields=card_fields, fairness=fairness)
    return TrainingOutcome(ref, Registry(ws).card(ref), spent, runs, build)


# ----------------------------------------------------------------------------- as three stages


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
    data = _load(ws, actor, purpose=purpose, features=features, label=label, holdout=holdout, seed=options.seed,
                 at=at, sort=True, too_few=StageError)
    ts, pol, prep = data.ts, data.pol, data.prep
    weights = None
    if mitigation == "reweighing":
        if pol.fairness is None:
            raise StageError(f"mitigation 'reweighing' needs a fairness section in policies for '{ts.dataset}'")
        sens_tr = decrypt_sensitive(ws, actor, ts.dataset, data.training_tokens(), purpose=PURPOSE)
        weights = reweighing(prep.y_tr.astype(int), {a: sens_tr[a] for a in pol.fairness.sensitive_attributes})
    build = new_build_id()
    ledger = PrivacyLedger(ws)
    fitted = _fit(ws, actor, data, ledger, name=name, purpose=purpose, options=options, build=build,
                  sample_weight=weights, curve=True)
    result, res = fitted.result, fitted.reservation
    cost = ledger.build_cost(build)
    run = ws.lineage.emit(
        f"train.{name}",
        inputs=[DatasetRef(t, version=v) for t, v in ts.sources.items()],
        outputs=[DatasetRef(f"candidate:{name}", kind="model")],
        facets={"purpose": purpose, "features": features, "epsilon": float(result.epsilon), "ledger_runs": [res.run_id],
                "mitigation": mitigation},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for fn, blob in _artifacts(result, prep.enc, prep.train_rows, fitted.p_tr, data.cols).items():
        (out_dir / fn).write_bytes(blob)
    opts = asdict(options)
    cand: dict[str, Any] = {
        "name": name, "dataset": ts.dataset, "purpose": purpose, "features": features, "label": label,
        "favourable_label": data.outcome.describe(),
        "at": at.isoformat(), "holdout": holdout, "seed": options.seed, "mitigation": mitigation,
        "data_versions": ts.sources, "rows": {"train": int(len(prep.tr)), "holdout": int(len(prep.te))},
        "holdout_digest": _digest(data.holdout_tokens()),
        "privacy": {"epsilon": float(result.epsilon), "delta": options.delta, "accountant": options.accountant,
                    "target_epsilon": options.target_epsilon, "noise_multiplier": result.noise_multiplier,
                    "max_grad_norm": options.max_grad_norm, "epochs": options.epochs,
                    "sample_rate": result.sample_rate, "ledger_run": res.run_id, "build": build},
        "cost": {"build": build, "epsilon": cost.epsilon, "delta": cost.delta, "runs": len(cost.runs)},
        "utility": fitted.utility, "curve": result.curve,
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
        "preprocessing": _preprocessing(prep.enc, fitted.threshold, options, result),
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
    """``candidate.json`` of a candidate folder, refused when the folder lacks it or an artifact."""
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
    ts, table = _training_set(ws, actor, purpose=cand["purpose"], features=cand["features"], label=cand["label"],
                              at=at, sort=True)
    _enough_rows(table, StageError)
    if ts.sources != cand["data_versions"]:
        raise StageError(f"the data changed since the candidate was trained ({cand['data_versions']} then, "
                         f"{ts.sources} now): rerun the train stage")
    pol = ws.policies.dataset(ts.dataset)
    tokens = table[pol.subject_key].to_pylist()
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
        sens = decrypt_sensitive(ws, actor, ts.dataset, [tokens[i] for i in te], purpose=PURPOSE)
        ev = _evaluate(pol, y_te, p, pre["threshold"], sens)
        res.update({**_fairness_fields(pol, y_te, ev, sens, int(cand["seed"])),
                    "thresholds": pol.fairness.model_dump(mode="json")})
    run = ws.lineage.emit(
        f"evaluate.{cand['name']}",
        inputs=[DatasetRef(t, version=v) for t, v in ts.sources.items()] + [DatasetRef(f"candidate:{cand['name']}", kind="model")],
        outputs=[],
        facets={"purpose": PURPOSE, "passed": res["passed"]},
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
        "mitigation": None if cand["mitigation"] == "none" else {"method": REWEIGHING, "applied": "before training"},
        "lineage_run_ids": cand["lineage_run_ids"] + ([fair["lineage_run_id"]] if fair.get("lineage_run_id") else []),
        "gate_decisions": cand["gate_decisions"],
        "preprocessing": cand["preprocessing"],
    }
    files = {f: cand_dir / f for f in ARTIFACTS}
    return _register(ws, actor, name=cand["name"], dataset=cand["dataset"], files=files, card_fields=card_fields,
                     fairness=fair if fair.get("passed") is not None else None)
