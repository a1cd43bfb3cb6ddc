"""Fairness evaluation: sensitive attributes decrypted under the gate, group metrics, the
policy's thresholds, and reweighing as the mitigation when they are not met.

The flow a training run follows::

    groups = decrypt_sensitive(ws, actor, "customers", tokens)          # gated, audited
    metrics = fairness_metrics(y_true, y_pred, groups)                   # per attribute
    verdict = check_fairness(metrics, ws.policies.dataset("customers"))   # governance.fairness.judge
    if not verdict.passed:                                               # retrain with weights
        w = reweighing(y_train, groups_train["ethnicity"])
        ...
    card["fairness"] = gate_context(metrics)                             # what Gate._deploy reads

Sensitive values. ``sex`` and ``ethnicity`` are stored in silver as AES-GCM ciphertexts
sealed under each subject's own key. :func:`decrypt_sensitive` asks the gate first
(stage ``evaluate``, purpose ``fairness_evaluation``, the policy's sensitive attributes as
columns), decrypts only the rows asked for, keeps the plaintext in memory only, and
audits one ``fairness.decrypt`` event that holds counts, never values. A crypto-shredded
subject reads as ``None`` (its group is unknown) and is left out of the metrics, where
the ``excluded`` count says so.

Metrics (per sensitive attribute, over rows whose group is known; "selected" means
``y_pred == pos_label``):

* ``disparate_impact`` = min over groups of the selection rate / max over groups.
  1.0 is parity; the policy's ``disparate_impact_min`` (the four-fifths rule: 0.8) is
  the floor.
* ``equal_opportunity_diff`` = max - min of the true positive rate across groups.
* ``predictive_parity_diff`` = max - min of the precision (positive predictive value).

A group with no actual positives has no true positive rate, and one with no predicted
positives has no precision: such a group is reported with ``None`` for that rate, left
out of that difference, and a line in ``notes`` says so. A metric that cannot be
computed at all (fewer than one defined group, or nobody selected) is ``None``:
:func:`check_fairness` fails it and :func:`gate_context` leaves it out, so the gate's
own fail-closed defaults deny the deployment.

Small groups (the policy's ``fairness.min_group_size``, passed as ``min_group_size``): a
group with fewer rows than that in a metric's subset (its rows for disparate impact, its
actual positives for equal opportunity, its predicted positives for predictive parity) is
left out of that metric; a metric with fewer than two groups left is ``None`` and *not
measured*. The attribute's metrics then also hold ``min_group_size`` and ``group_sizes``
(``{metric: {group: n}}``), which travel into the card and the gate's context, so the judge
(:func:`governance.fairness.judge`) reports a not-measured metric as such, not as a failure,
and names the groups left out. The default, 1, counts every group, as before.

Mitigation: reweighing (Kamiran & Calders, 2012). Each training row of group ``g`` and
label ``y`` gets the weight::

    w(g, y) = P(g) * P(y) / P(g, y)  =  n_g * n_y / (n * n_gy)

so that, weighted, the label is statistically independent of the group (weighted
P(y | g) = P(y) for every g) while the total weight stays ``n``. Train again with
``sample_weight=reweighing(y, group)`` and compare with :func:`mitigation_report`.
Reweighing only changes what a model can learn from the group: a model whose inputs
carry no group information (directly or through proxies) is unaffected by it.

Errors: caller mistakes (lengths that differ, labels that are not binary) raise
``ValueError``; a dataset with no ``fairness`` section, or no silver table yet, raises
:class:`FairnessError`; a denied request raises :class:`~governance.errors.AccessDenied`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from governance.errors import LakewardenError, SubjectShredded
from governance.fairness import METRICS, FairnessVerdict, judge, thresholds
from governance.gate import Actor, Resource
from governance.policy import DatasetPolicy, Fairness, Protection, Stage

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = [
    "FairnessError",
    "FairnessVerdict",
    "check_fairness",
    "decrypt_sensitive",
    "fairness_metrics",
    "gate_context",
    "mitigation_report",
    "reweighing",
]

PURPOSE = "fairness_evaluation"


class FairnessError(LakewardenError):
    """Fairness cannot be evaluated (no ``fairness`` section in the policy, no silver table)."""


# ----------------------------------------------------------------------------- decryption


def decrypt_sensitive(
    ws: "Workspace",
    actor: Actor,
    dataset: str,
    tokens: Sequence[str],
    *,
    purpose: str = PURPOSE,
) -> dict[str, list[str | None]]:
    """The policy's sensitive attributes of ``dataset`` for ``tokens``, decrypted.

    The gate decides first (stage ``evaluate`` on the dataset, with ``purpose`` and the
    attribute names as columns). Values come from ``silver.<dataset>`` (or from
    ``restricted.<dataset>`` for attributes with ``protection: restricted``), are opened
    with each subject's key and decoded as UTF-8. They are returned, never stored.

    Args:
        ws: the workspace (gate, key ring, audit log, table locations).
        actor: who asks (in the example policy, a data scientist: the role that runs ``evaluate``).
        dataset: the dataset whose policy names ``fairness.sensitive_attributes``.
        tokens: subject tokens (``sub_...``), e.g. the entity column of a test set.
        purpose: the purpose stated to the gate.

    Returns:
        ``{attribute: values}`` with ``values[i]`` for ``tokens[i]``; ``None`` where the
        subject is not in the table, its value is empty, or its key was shredded.

    Raises:
        AccessDenied: the gate said no (the message names the rule).
        FairnessError: the policy has no ``fairness`` section, or the table does not exist.
        DecryptionError: a ciphertext was tampered with or bound elsewhere (fail closed).
        TypeError: a token is not a string.

    Example::

        groups = decrypt_sensitive(ws, ws.actor("sam"), "customers", test_set["customer_id"])
        groups["sex"][:3]        # e.g. ['F', None, 'M'] -- None: unknown or shredded subject
    """
    tokens = _as_list(tokens)
    bad = next((t for t in tokens if not isinstance(t, str)), _MISSING)
    if bad is not _MISSING:
        raise TypeError(f"subject tokens must be str, got {type(bad).__name__}")
    policy = ws.policies.datasets.get(dataset)
    columns = list(policy.fairness.sensitive_attributes) if policy is not None and policy.fairness else []
    ws.gate.enforce(Stage.EVALUATE, actor, Resource.dataset(dataset), {"purpose": purpose, "columns": columns})
    if policy is None or policy.fairness is None:  # the gate denies an unknown dataset; this is the other case
        raise FairnessError(
            f"dataset '{dataset}' declares no fairness section",
            hint=f"add fairness.sensitive_attributes to policies/{dataset}.yaml",
        )
    by_layer: dict[str, list[str]] = {}
    for c in columns:
        layer = "restricted" if policy.columns[c].protection is Protection.RESTRICTED else "silver"
        by_layer.setdefault(layer, []).append(c)
    ring = ws.keyring
    out: dict[str, list[str | None]] = {}
    shredded: set[str] = set()
    for layer, cols in by_layer.items():
        blobs = _read_latest(ws, layer, dataset, policy.subject_key, cols, tokens)
        for c in cols:
            opened = _open_column(ring, blobs[c], tokens, dataset=dataset, column=c, shredded=shredded)
            out[c] = [None if v is None else v.decode("utf-8") for v in opened]
    found = sum(1 for i in range(len(tokens)) if any(out[c][i] is not None for c in columns))
    ws.audit.record(
        "fairness.decrypt",
        actor=actor.name,
        outcome="ok",
        stage=Stage.EVALUATE.value,
        resource=f"dataset:{dataset}",
        details={
            "columns": columns,
            "subjects": len(set(tokens)),
            "purpose": purpose,
            "decrypted": found,
            "shredded": len(shredded),
        },
    )
    return {c: out[c] for c in columns}


_MISSING = object()


def _as_list(values: Any) -> list[Any]:
    """A plain list from a list, tuple, numpy array, pandas Series or pyarrow array."""
    if hasattr(values, "to_pylist"):
        return values.to_pylist()
    if hasattr(values, "tolist"):
        return values.tolist()
    return list(values)


def _read_latest(
    ws: "Workspace", layer: str, dataset: str, key: str, columns: list[str], tokens: list[str]
) -> dict[str, list[bytes | None]]:
    """Ciphertexts of ``columns`` aligned to ``tokens`` (the latest row per subject wins)."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    uri = ws.config.table_uri(f"{layer}/{dataset}")
    try:
        dt = DeltaTable(uri, storage_options=dict(ws.config.storage.options) or None)
    except TableNotFoundError:
        raise FairnessError(
            f"table {layer}.{dataset} does not exist", hint=f"ingest '{dataset}' and build silver first"
        ) from None
    ds = dt.to_pyarrow_dataset()
    names = set(ds.schema.names)
    missing = [c for c in [key, *columns] if c not in names]
    if missing:
        raise FairnessError(f"table {layer}.{dataset} has no column(s) {', '.join(missing)}")
    order = "_ingested_at" if "_ingested_at" in names else None
    wanted = sorted(set(tokens))
    tbl = ds.to_table(
        columns=[key, *columns, *([order] if order else [])],
        filter=pc.field(key).isin(wanted) if wanted else pc.scalar(False),
    )
    if order and tbl.num_rows:
        tbl = tbl.sort_by([(order, "ascending")])
    row_of: dict[str, int] = {}
    for i, t in enumerate(tbl[key].to_pylist()):
        row_of[t] = i  # ascending time: the latest row of a subject overwrites earlier ones
    out: dict[str, list[bytes | None]] = {}
    for c in columns:
        vals = tbl[c].to_pylist()
        out[c] = [vals[row_of[t]] if t in row_of else None for t in tokens]
    return out


def _open_column(
    ring: Any, blobs: list[bytes | None], tokens: list[str], *, dataset: str, column: str, shredded: set[str]
) -> list[bytes | None]:
    """``open_many``; if a subject was shredded, value by value with that subject's values as None."""
    live = [None if t in shredded else b for b, t in zip(blobs, tokens)]
    try:
        return ring.open_many(live, tokens, dataset=dataset, column=column)
    except SubjectShredded:
        pass
    out: list[bytes | None] = []
    for b, t in zip(live, tokens):
        if b is None or t in shredded:
            out.append(None)
            continue
        try:
            out.append(ring.open(b, token=t, dataset=dataset, column=column))
        except SubjectShredded:
            shredded.add(t)
            out.append(None)
    return out


# ----------------------------------------------------------------------------- metrics


def _binary(values: Any, what: str, pos_label: int) -> np.ndarray:
    arr = np.asarray(values.to_pylist() if hasattr(values, "to_pylist") else values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional (got shape {arr.shape})")
    if arr.dtype == bool:
        arr = arr.astype(int)
    try:
        uniq = set(np.unique(arr).tolist())
    except TypeError:
        uniq = {"<mixed types>"}
    if not uniq <= {0, 1}:
        shown = ", ".join(map(repr, sorted(uniq, key=str)[:5]))
        raise ValueError(f"{what} must be binary: 0/1 or False/True (found {shown})")
    return (arr == pos_label).astype(int)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _spread(values: dict[str, float | None]) -> float | None:
    defined = [v for v in values.values() if v is not None]
    return (max(defined) - min(defined)) if defined else None


def fairness_metrics(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    groups: Mapping[str, Sequence[Any]],
    *,
    pos_label: int = 1,
    min_group_size: int = 1,
) -> dict[str, dict[str, Any]]:
    """Group fairness metrics per sensitive attribute (see the module docstring).

    Args:
        y_true: true labels, 0/1 or bool.
        y_pred: predicted labels, 0/1 or bool (threshold scores first).
        groups: attribute name to each row's group; ``None`` (or NaN) means unknown and
            the row is excluded from that attribute's metrics.
        pos_label: the label that counts as "selected" and "positive" (1 by default).
            For a label where 1 is the unfavourable outcome (``defaulted``), pass 0 to
            measure the favourable one.
        min_group_size: the fewest rows a group needs in a metric's subset to count in it
            (the policy's ``fairness.min_group_size``); 1 counts every group.

    Returns:
        ``{attribute: {"disparate_impact", "equal_opportunity_diff",
        "predictive_parity_diff", "by_group", "excluded", "notes"}}``; ``by_group`` maps
        each group to ``count``, ``selection_rate``, ``true_positive_rate`` and
        ``precision`` (``None`` where undefined). With ``min_group_size`` above 1, also
        ``min_group_size`` and ``group_sizes`` (``{metric: {group: n}}``).

    Raises:
        ValueError: lengths differ, labels are not binary, ``pos_label`` is not 0 or 1,
            ``min_group_size`` is below 1.

    Example:

    >>> m = fairness_metrics([1, 0, 1, 0], [1, 0, 1, 1], {"sex": ["F", "F", "M", "M"]})
    >>> m["sex"]["disparate_impact"], m["sex"]["predictive_parity_diff"]
    (0.5, 0.5)
    """
    from fairlearn.metrics import MetricFrame, count, selection_rate

    if pos_label not in (0, 1):
        raise ValueError(f"pos_label must be 0 or 1 (got {pos_label!r})")
    if isinstance(min_group_size, bool) or not isinstance(min_group_size, int) or min_group_size < 1:
        raise ValueError(f"min_group_size must be a whole number of at least 1 (got {min_group_size!r})")
    yt = _binary(y_true, "y_true", pos_label)
    yp = _binary(y_pred, "y_pred", pos_label)
    if len(yt) != len(yp):
        raise ValueError(f"y_true has {len(yt)} rows but y_pred has {len(yp)}")
    groups = {attr: _as_list(g) for attr, g in groups.items()}
    for attr, g in groups.items():
        if len(g) != len(yt):
            raise ValueError(f"groups['{attr}'] has {len(g)} values but there are {len(yt)} labels")

    out: dict[str, dict[str, Any]] = {}
    for attr, g in groups.items():
        known = np.array([not _is_missing(v) for v in g], dtype=bool)
        excluded = int((~known).sum())
        notes: list[str] = []
        if excluded:
            notes.append(f"{excluded} row(s) with unknown {attr} (shredded or missing) are excluded")
        labels = np.array([str(v) for v, k in zip(g, known) if k], dtype=object)
        t, p = yt[known], yp[known]
        by_group: dict[str, dict[str, Any]] = {}
        subsets: dict[str, dict[str, int]] = {r.metric: {} for r in METRICS}  # each metric's denominators
        if len(labels):
            # fairlearn gives per-group counts and selection rates; TPR and precision are computed
            # from the confusion counts so that an undefined rate is None, not fairlearn's silent 0.
            mf = MetricFrame(
                metrics={"count": count, "selection_rate": selection_rate, "tp": _tp, "pos": _pos, "sel": _sel},
                y_true=t, y_pred=p, sensitive_features=labels,
            )
            frame = mf.by_group
            for grp, row in frame.iterrows():
                n, tp, pos, sel = int(row["count"]), int(row["tp"]), int(row["pos"]), int(row["sel"])
                by_group[str(grp)] = {
                    "count": n,
                    "selection_rate": float(row["selection_rate"]),
                    "true_positive_rate": _rate(tp, pos),
                    "precision": _rate(tp, sel),
                }
                subsets["disparate_impact"][str(grp)] = n
                subsets["equal_opportunity_diff"][str(grp)] = pos
                subsets["predictive_parity_diff"][str(grp)] = sel
        tpr = {k: v["true_positive_rate"] for k, v in by_group.items()}
        prec = {k: v["precision"] for k, v in by_group.items()}
        sel_rates = [v["selection_rate"] for v in by_group.values()]
        for k, v in tpr.items():
            if v is None:
                notes.append(f"group '{k}' has no actual positives: its true positive rate is undefined "
                             "and left out of equal_opportunity_diff")
        for k, v in prec.items():
            if v is None:
                notes.append(f"group '{k}' has no predicted positives: its precision is undefined "
                             "and left out of predictive_parity_diff")
        if len(by_group) < 2:
            notes.append(f"only {len(by_group)} group(s) of {attr} with known values: nothing to compare")
        unmeasured: set[str] = set()
        if min_group_size > 1:
            keep = {m: {g for g, n in sizes.items() if n >= min_group_size} for m, sizes in subsets.items()}
            for r in METRICS:
                small = sorted(g for g in subsets[r.metric] if g not in keep[r.metric])
                if small:
                    notes.append(f"group(s) {', '.join(map(repr, small))} have fewer than {min_group_size} "
                                 f"{_COUNTED[r.metric]} and are left out of {r.metric}")
                if len(keep[r.metric]) < 2:
                    unmeasured.add(r.metric)
                    notes.append(f"{r.metric} is not measured: fewer than two groups of {attr} have "
                                 f"{min_group_size} or more {_COUNTED[r.metric]}")
            sel_rates = [v["selection_rate"] for g, v in by_group.items() if g in keep["disparate_impact"]]
            tpr = {g: v for g, v in tpr.items() if g in keep["equal_opportunity_diff"]}
            prec = {g: v for g, v in prec.items() if g in keep["predictive_parity_diff"]}
        di: float | None = None
        if "disparate_impact" in unmeasured:
            pass
        elif sel_rates and max(sel_rates) > 0:
            di = min(sel_rates) / max(sel_rates)
        elif sel_rates:
            notes.append("no row is selected in any group: disparate impact is undefined")
        eo = None if "equal_opportunity_diff" in unmeasured else _spread(tpr)
        pp = None if "predictive_parity_diff" in unmeasured else _spread(prec)
        out[attr] = {
            "disparate_impact": di,
            "equal_opportunity_diff": eo,
            "predictive_parity_diff": pp,
            "by_group": by_group,
            "excluded": excluded,
            "notes": notes,
        }
        if min_group_size > 1:
            out[attr]["min_group_size"] = min_group_size
            out[attr]["group_sizes"] = subsets
    return out


_COUNTED = {"disparate_impact": "rows", "equal_opportunity_diff": "actual positives",
            "predictive_parity_diff": "predicted positives"}


def _tp(y_true: np.ndarray, y_pred: np.ndarray) -> int:
    return int(np.sum((np.asarray(y_true) == 1) & (np.asarray(y_pred) == 1)))


def _pos(y_true: np.ndarray, y_pred: np.ndarray) -> int:
    return int(np.sum(np.asarray(y_true) == 1))


def _sel(y_true: np.ndarray, y_pred: np.ndarray) -> int:
    return int(np.sum(np.asarray(y_pred) == 1))


# ----------------------------------------------------------------------------- policy check


def check_fairness(
    metrics: Mapping[str, Mapping[str, Any]], policy: DatasetPolicy | Fairness, *, dataset: str | None = None
) -> FairnessVerdict:
    """Judge metrics from :func:`fairness_metrics` by a policy, as the deployment gate does.

    The judge is :func:`governance.fairness.judge` (``disparate_impact >= disparate_impact_min``,
    ``|difference| <= max_diff``; a missing attribute or an undefined metric fails), so the
    verdict, its rule ids and its messages are the gate's. Pass the dataset's policy (or
    ``dataset=``) for rule ids named by the dataset.

    Example:

    >>> from governance.policy import Fairness
    >>> m = fairness_metrics([1, 0, 1, 0], [1, 0, 1, 1], {"sex": ["F", "F", "M", "M"]})
    >>> check_fairness(m, Fairness(sensitive_attributes=["sex"])).failures[0]
    "disparate impact on 'sex' is 0.500 < 0.8"
    """
    if not isinstance(policy, (DatasetPolicy, Fairness)):
        raise TypeError(f"policy must be a governance.policy.DatasetPolicy or Fairness, got {type(policy).__name__}")
    return judge(policy, metrics, dataset=dataset)


def fairness_uncertainty(
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    groups: Mapping[str, Sequence[Any]],
    policy: DatasetPolicy | Fairness,
    *,
    pos_label: int = 1,
    resamples: int = 500,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """How much the fairness verdict depends on which holdout rows were drawn (a bootstrap).

    The holdout's rows are resampled with replacement ``resamples`` times; each resample's
    metrics are computed exactly as :func:`fairness_metrics` computes them (rows with an
    unknown group left out, undefined rates left out of a spread) and judged as
    :func:`check_fairness` judges them. Returns, per attribute and gated metric, the
    percentile interval at ``level``; and ``pass_rate``, the share of resamples whose
    verdict passes. A verdict with a pass rate near 0.5 could have gone either way on
    another holdout of the same size. The gate itself still judges the point estimate;
    this is evidence for the people who approve.

    The policy's ``min_group_size`` applies to each resample as to the holdout: a group below it
    in a resample is left out of that metric there, a metric with fewer than two groups left is
    not measured there (it neither passes nor fails, and is no part of its interval), and a
    resample in which nothing is measured fails.

    Example:

    >>> from governance.policy import Fairness
    >>> u = fairness_uncertainty([1, 0] * 50, [1, 0] * 50, {"sex": ["F", "M"] * 50}, Fairness(sensitive_attributes=["sex"]))
    >>> u["resamples"], 0.0 <= u["pass_rate"] <= 1.0
    (500, True)
    """
    if not 0 < level < 1 or resamples < 1:
        raise ValueError("level must be in (0, 1) and resamples at least 1")
    yt = _binary(y_true, "y_true", pos_label).astype(np.float64)
    yp = _binary(y_pred, "y_pred", pos_label).astype(np.float64)
    n = len(yt)
    rng = np.random.default_rng(seed)
    # Row multiplicities of each resample (B × n): a resample is a multinomial draw of n rows.
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) if n else np.zeros((resamples, 0))
    f = policy.fairness if isinstance(policy, DatasetPolicy) else policy
    if f is None:
        raise FairnessError(f"dataset '{policy.dataset}' declares no fairness section")
    limits = thresholds(f)
    size = f.min_group_size
    passed = np.ones(resamples, dtype=bool)
    measured_any = np.zeros(resamples, dtype=bool)
    out: dict[str, Any] = {"resamples": resamples, "level": level, "seed": seed, "intervals": {}}
    lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    for attr in f.sensitive_attributes:
        if attr not in groups:
            passed[:] = False
            continue
        g = _as_list(groups[attr])
        if len(g) != n:
            raise ValueError(f"groups['{attr}'] has {len(g)} values but there are {n} labels")
        known = np.array([not _is_missing(v) for v in g], dtype=bool)
        labels = sorted({str(v) for v, k in zip(g, known) if k})
        codes = {v: i for i, v in enumerate(labels)}
        onehot = np.zeros((n, len(labels)))
        for r, (v, k) in enumerate(zip(g, known)):
            if k:
                onehot[r, codes[str(v)]] = 1.0
        count = weights @ onehot  # B × groups
        sel = weights @ (onehot * yp[:, None])
        pos = weights @ (onehot * yt[:, None])
        tp = weights @ (onehot * (yt * yp)[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            # NaN: the group is absent, the rate undefined, or the group under min_group_size (1: any row counts)
            sel_rate = np.where(count >= size, sel / count, np.nan)
            tpr = np.where(pos >= size, tp / pos, np.nan)
            prec = np.where(sel >= size, tp / sel, np.nan)
            (sel_hi, sel_lo), (tpr_hi, tpr_lo), (prec_hi, prec_lo) = map(_extremes, (sel_rate, tpr, prec))
            metrics = {
                "disparate_impact": np.where(sel_hi > 0, sel_lo / sel_hi, np.nan),
                "equal_opportunity_diff": np.where(np.isfinite(tpr_hi), tpr_hi - tpr_lo, np.nan),
                "predictive_parity_diff": np.where(np.isfinite(prec_hi), prec_hi - prec_lo, np.nan),
            }
        out["intervals"][attr] = {}
        groups_at_size = {"disparate_impact": sel_rate, "equal_opportunity_diff": tpr, "predictive_parity_diff": prec}
        for r in METRICS:  # judged as governance.fairness.judge judges: NaN (undefined) never meets a limit
            m, v = r.metric, metrics[r.metric]
            if size > 1:  # fewer than two groups at the size: not measured in that resample
                unmeasured = (~np.isnan(groups_at_size[m])).sum(axis=1) < 2
                v = np.where(unmeasured, np.nan, v)
                passed &= unmeasured | (~np.isnan(v) & r.meets(v, limits[r.threshold]))
                measured_any |= ~unmeasured
            else:
                passed &= ~np.isnan(v) & r.meets(v, limits[r.threshold])
            finite = v[~np.isnan(v)]
            out["intervals"][attr][m] = (
                [float(np.percentile(finite, lo_q)), float(np.percentile(finite, hi_q))] if len(finite) else None)
    if size > 1:
        passed &= measured_any  # as the judge: no measurement, no pass
    out["pass_rate"] = float(passed.mean())
    return out


def _extremes(rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (resample), the largest and smallest defined rate; -inf and inf where none is."""
    return (np.where(np.isnan(rates), -np.inf, rates).max(axis=1, initial=-np.inf),
            np.where(np.isnan(rates), np.inf, rates).min(axis=1, initial=np.inf))


def pass_rate_note(pass_rate: float) -> str:
    """How the CLI states a verdict's bootstrap pass rate (see :func:`fairness_uncertainty`)."""
    return f"passes in {100 * pass_rate:.0f} % of bootstrap resamples of the holdout"


def gate_context(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``fairness`` entry of the deployment context: ``{attr: {metric: float}}``.

    Undefined metrics are left out, so the gate applies its fail-closed defaults to them. Metrics
    computed with a ``min_group_size`` above 1 keep it and their ``group_sizes`` (group names and
    counts, never rows), from which the judge tells a metric not measured from a missing one.
    """
    out: dict[str, dict[str, Any]] = {}
    for attr, m in metrics.items():
        out[attr] = {r.metric: float(m[r.metric]) for r in METRICS if m.get(r.metric) is not None}
        if m.get("group_sizes") is not None and m.get("min_group_size") is not None:
            out[attr]["min_group_size"] = int(m["min_group_size"])
            out[attr]["group_sizes"] = {k: {str(g): int(n) for g, n in v.items()} for k, v in m["group_sizes"].items()}
    return out


# ----------------------------------------------------------------------------- mitigation


def reweighing(y_true: Sequence[Any], group: Sequence[Any] | Mapping[str, Sequence[Any]]) -> np.ndarray:
    """Kamiran-Calders sample weights ``w(g, y) = P(g) P(y) / P(g, y)``.

    Args:
        y_true: training labels, 0/1 or bool.
        group: each row's group, or ``{attribute: groups}`` to reweigh on the
            intersection of several attributes. Rows with an unknown group (``None``) get
            weight 1.0 and the probabilities are taken over the known rows.

    Returns:
        A float array, one weight per row, for ``fit(..., sample_weight=...)``; over the
        known rows the weights sum to their number.

    Raises:
        ValueError: lengths differ or labels are not binary.

    Example:

    >>> reweighing([1, 1, 0, 0, 0, 0], ["a", "a", "a", "b", "b", "b"]).round(3).tolist()
    [0.5, 0.5, 2.0, 0.667, 0.667, 0.667]
    """
    y = _binary(y_true, "y_true", 1)
    if isinstance(group, Mapping):
        cols = [(attr, _as_list(g)) for attr, g in group.items()]
        for attr, g in cols:
            if len(g) != len(y):
                raise ValueError(f"group['{attr}'] has {len(g)} values but there are {len(y)} labels")
        keys: list[Any] = [
            None if any(_is_missing(g[i]) for _, g in cols) else tuple(str(g[i]) for _, g in cols)
            for i in range(len(y))
        ]
    else:
        group = _as_list(group)
        if len(group) != len(y):
            raise ValueError(f"group has {len(group)} values but there are {len(y)} labels")
        keys = [None if _is_missing(v) else str(v) for v in group]
    w = np.ones(len(y), dtype=float)
    known = np.array([k is not None for k in keys], dtype=bool)
    n = int(known.sum())
    if n == 0:
        return w
    codes: dict[Any, int] = {}
    gi = np.array([codes.setdefault(k, len(codes)) if k is not None else -1 for k in keys])
    gk, yk = gi[known], y[known]
    n_g = np.bincount(gk, minlength=len(codes)).astype(float)
    n_y = np.bincount(yk, minlength=2).astype(float)
    n_gy = np.zeros((len(codes), 2))
    np.add.at(n_gy, (gk, yk), 1.0)
    w[known] = n_g[gk] * n_y[yk] / (n * n_gy[gk, yk])
    return w


def mitigation_report(
    before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Before/after of each gate metric per attribute.

    Returns:
        ``{attr: {metric: {"before", "after", "change", "improved"}}}``; ``improved`` is
        True when disparate impact rose or a difference shrank in absolute value, and
        ``None`` (like ``change``) when either side is undefined.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for attr in [*before, *(a for a in after if a not in before)]:
        b, a = before.get(attr, {}), after.get(attr, {})
        rows: dict[str, dict[str, Any]] = {}
        for r in METRICS:
            vb, va = b.get(r.metric), a.get(r.metric)
            change = improved = None
            if vb is not None and va is not None:
                change = va - vb
                improved = va > vb if r.higher_is_better else abs(va) < abs(vb)
            rows[r.metric] = {"before": vb, "after": va, "change": change, "improved": improved}
        out[attr] = rows
    return out
