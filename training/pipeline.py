"""Train, evaluate and register a private model: the training stage end to end.

:func:`train_model`:

1. checks the label against the dataset policy's ``labels:`` declaration, builds a point-in-time
   training set from the feature store (gated by purpose: no sensitive attribute reaches a
   ``credit_scoring`` model) and encodes the label by the declaration — refusing an undeclared
   label, a NULL or a value outside the declared pair (:class:`~training.labels.LabelError`,
   exit 2) before any budget is reserved;
2. reserves the run's privacy budget in the ledger — the gate refuses, before any training,
   a run that would take the dataset past its total ε, and says how much is left;
3. trains the MLP with Opacus DP-SGD (target ε and δ from the options, capped by policy;
   optionally data-parallel across processes) and commits the ε the accountant reports;
4. evaluates accuracy and AUC on a holdout, and fairness across the policy's sensitive
   attributes — decrypted only here, for purpose ``fairness_evaluation``, audited;
5. if the fairness verdict fails and ``mitigate`` is on, retrains with reweighing (Kamiran &
   Calders) — a second private run, with its own reservation — and keeps the mitigated
   model with before/after metrics; both runs are recorded in the ledger under one build id;
6. registers the model: weights, the feature encoder, and a model card (data versions, ε,
   δ, accountant, utility, fairness, lineage run ids, gate decisions). The card states the
   released run's (ε, δ) and what the build cost in all (``privacy.cost``: every run of the
   build, summed from the ledger — a failed first run included).

The label is encoded 1 for its unfavourable value and 0 for its favourable one, as the policy
declares them (``labels: {defaulted: {favourable: false}}`` for the demo: the score is the risk
of default). Fairness is measured on the favourable outcome: a predicted 0 is the "selected"
outcome; the card's ``favourable_label`` names the column and both values.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from governance.errors import AccessDenied
from governance.gate import Actor
from governance.ledger import PrivacyLedger, Reservation, new_build_id
from governance.lineage import DatasetRef
from governance.workspace import Workspace
from features.store import Features
from training.encode import Encoder
from training.fairness import (
    check_fairness, decrypt_sensitive, fairness_metrics, fairness_uncertainty, gate_context, mitigation_report, reweighing,
)
from training.labels import FAVOURABLE, check_label_column, declared_label
from training.reference import Reference
from training.registry import ModelCard, ModelRef, Registry
from training.trainer import TrainOptions, TrainResult, predict_proba, train, train_distributed

FAVOURABLE_LABEL = FAVOURABLE  # the encoded favourable outcome (0); which value it is, the policy says


@dataclass
class TrainingOutcome:
    ref: ModelRef
    card: ModelCard
    epsilon_spent: float  # all private runs of this call together
    runs: list[str] = field(default_factory=list)  # ledger run ids
    build: str | None = None  # the build id its ledger runs carry


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
) -> TrainingOutcome:
    """Run the training stage and register the model (see the module docstring)."""
    warnings.filterwarnings("ignore", module="opacus")
    fs = Features(ws)
    check_label_column(ws.policies, fs._resolve(features)[0], label)  # before any data is read
    ts = fs.training_set(actor, purpose=purpose, features=features, label=label)
    pol = ws.policies.dataset(ts.dataset)
    key = pol.subject_key
    cols = [f.split(":", 1)[1] for f in features]
    table = ts.table
    outcome = declared_label(ws.policies, pol, label, values=table[label])
    y_all = outcome.encode(table[label], where=" (training set)")  # refused here: nothing reserved yet
    if table.num_rows < 10:
        raise ValueError(f"the training set has {table.num_rows} rows: too few to train on")
    prep = _prepare(table, cols, y_all, holdout, options.seed)
    tr, te, enc, X_tr, X_te, y_tr, y_te = prep.tr, prep.te, prep.enc, prep.X_tr, prep.X_te, prep.y_tr, prep.y_te
    tokens = table[key].to_pylist()
    ledger = PrivacyLedger(ws)
    build = new_build_id()  # every private run of this call: the card's cost sums them
    decisions: list[Any] = [ts.decision]
    runs: list[str] = []
    spent = 0.0

    def private_run(sample_weight: np.ndarray | None) -> TrainResult:
        nonlocal spent

        def fit() -> TrainResult:
            if world_size > 1 and sample_weight is None:
                return train_distributed(X_tr, y_tr, options, world_size=world_size)
            return train(X_tr, y_tr, options, sample_weight=sample_weight)

        result, res = budgeted_run(ledger, actor, ts.dataset, purpose=purpose, options=options, columns=cols, fit=fit,
                                   model=name, build=build)
        decisions.append(res.decision)
        runs.append(res.run_id)
        spent += float(result.epsilon)
        return result

    result = private_run(None)
    released_run = runs[-1]
    threshold = _threshold(predict_proba(result, X_tr), y_tr)  # from training rows only: holdout stays unseen
    p_te = predict_proba(result, X_te)
    utility = _utility(y_te, p_te, threshold)

    fairness_fields: dict[str, Any] | None = None
    mitigation = None
    if pol.fairness is not None:
        sens = decrypt_sensitive(ws, actor, ts.dataset, [tokens[i] for i in te], purpose="fairness_evaluation")
        pred = (p_te > threshold).astype(int)
        metrics = fairness_metrics(y_te.astype(int), pred, sens, pos_label=FAVOURABLE_LABEL)
        verdict = check_fairness(metrics, pol)
        mitigated = None
        if not verdict.passed and mitigate:
            sens_tr = decrypt_sensitive(ws, actor, ts.dataset, [tokens[i] for i in tr], purpose="fairness_evaluation")
            weights = reweighing(y_tr.astype(int), {a: sens_tr[a] for a in pol.fairness.sensitive_attributes})
            try:
                mitigated = private_run(weights)
            except AccessDenied as exc:  # no budget left for a second run: keep the first, say why
                mitigation = {"method": "reweighing (Kamiran & Calders)", "skipped": exc.message,
                              "passed_before": verdict.passed}
        if mitigated is not None:
            t2 = _threshold(predict_proba(mitigated, X_tr), y_tr)
            p2 = predict_proba(mitigated, X_te)
            m2 = fairness_metrics(y_te.astype(int), (p2 > t2).astype(int), sens, pos_label=FAVOURABLE_LABEL)
            v2 = check_fairness(m2, pol)
            mitigation = {"method": "reweighing (Kamiran & Calders)", "report": mitigation_report(metrics, m2),
                          "utility_before": utility, "utility_after": _utility(y_te, p2, t2),
                          "passed_before": verdict.passed, "passed_after": v2.passed}
            result, metrics, verdict, utility, threshold = mitigated, m2, v2, _utility(y_te, p2, t2), t2
            released_run = runs[-1]
            pred = (p2 > t2).astype(int)
        fairness_fields = {**gate_context(metrics), "passed": verdict.passed, "failures": list(verdict.failures),
                           "uncertainty": fairness_uncertainty(y_te.astype(int), pred, sens, pol.fairness,
                                                               pos_label=FAVOURABLE_LABEL, seed=options.seed)}

    train_run = ws.lineage.emit(
        f"train.{name}",
        inputs=[DatasetRef(t, version=v) for t, v in ts.sources.items()],
        outputs=[DatasetRef(f"model:{name}", kind="model")],
        facets={"purpose": purpose, "features": features, "epsilon": spent, "ledger_runs": runs, "build": build},
    )
    card_fields: dict[str, Any] = {
        "purpose": purpose,
        "features": features,
        "label": label,
        "favourable_label": outcome.describe(),
        "data_versions": ts.sources,
        "privacy": {
            "epsilon": float(result.epsilon), "delta": options.delta, "accountant": options.accountant,
            "target_epsilon": options.target_epsilon, "noise_multiplier": result.noise_multiplier,
            "max_grad_norm": options.max_grad_norm, "epochs": options.epochs, "sample_rate": result.sample_rate,
            "cost": {"build": build, "released_run": released_run},  # the registry sums the build's runs
        },
        "utility": utility,
        "mitigation": mitigation,
        "lineage_run_ids": [r for r in (ts.run_id, train_run) if r],
        "gate_decisions": [d for d in decisions if d is not None],
        "preprocessing": {"encoder": enc.to_dict(), "threshold": threshold,
                          "hidden": list(options.hidden), "n_features": result.n_features},
    }
    if fairness_fields is not None:
        card_fields["fairness"] = fairness_fields
    # The drift reference: bin shares of the training features and scores (summaries, never rows).
    train_rows = prep.train_rows
    reference = Reference.from_table(train_rows, score=[float(v) for v in predict_proba(result, X_tr)], columns=cols)
    files = {"model.pt": result.state_dict, "encoder.json": json.dumps(enc.to_dict(), sort_keys=True).encode(),
             "reference.json": reference.to_json().encode()}
    ref = Registry(ws).register(actor, name=name, dataset=ts.dataset, files=files, card_fields=card_fields)
    card = Registry(ws).card(ref)
    return TrainingOutcome(ref, card, spent, runs, build)


def options_with(options: TrainOptions, **changes: Any) -> TrainOptions:
    return replace(options, **changes)


__all__ = ["train_model", "TrainingOutcome", "FAVOURABLE_LABEL"]
