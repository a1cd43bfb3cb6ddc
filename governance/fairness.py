"""The fairness judge: the policy's fairness thresholds applied to measured metrics, in one place.

Every part of Lakewarden that decides whether a model is fair enough asks :func:`judge`:
the deploy gate (``Stage.DEPLOY``), the trainer (``training.fairness.check_fairness``), the
registry (a card's verdict at registration, its pass/fail cells) and the compliance report.
So they agree on the metrics, the comparisons, the rule ids and the wording.

The vocabulary (:data:`METRICS`), one rule per metric:

=========================  ==============================  ====================  =================
metric                     policy threshold                passes when           rule id
=========================  ==============================  ====================  =================
``disparate_impact``       ``disparate_impact_min``        ``value >= limit``    ``<ds>/fairness/disparate_impact``
``equal_opportunity_diff`` ``equal_opportunity_max_diff``  ``|value| <= limit``  ``<ds>/fairness/equal_opportunity``
``predictive_parity_diff`` ``predictive_parity_max_diff``  ``|value| <= limit``  ``<ds>/fairness/predictive_parity``
=========================  ==============================  ====================  =================

Fail closed: a required attribute with no metrics fails (``<ds>/fairness/<attr>``), no
metrics at all fail (``<ds>/fairness``), and a metric that is missing, not a number, or NaN
fails its rule. A metric whose threshold is not given (a thresholds mapping without that key)
is not judged.

Small groups. The policy's ``min_group_size`` (default 1: every group counts, as before it
existed) is the fewest rows a group needs in the subset a metric conditions on: all its holdout
rows for ``disparate_impact``, its actual positives for ``equal_opportunity_diff`` (the true
positive rate's denominator), its predicted positives for ``predictive_parity_diff`` (the
precision's). ``training.fairness.fairness_metrics`` leaves smaller groups out of that metric
and, when ``min_group_size`` is above 1, records in the attribute's metrics
``min_group_size`` and ``group_sizes`` (``{metric: {group: n}}``, every group's subset size).
The judge reads them (see :func:`left_out`):

* a group below the size is *left out*: the metric is over the other groups, and the
  verdict's :attr:`FairnessVerdict.notes` name the group and its size;
* a metric with fewer than two groups at the size has no value and is *not measured*: its
  check neither passes nor fails (``Finding.measured`` is False, ``ok`` True), and its message
  says why; the verdict passes or fails on what was measured;
* when nothing at all could be measured the verdict fails (``<ds>/fairness``): a claim of
  fairness must rest on at least one measurement.

Example:

>>> from governance.policy import Fairness
>>> v = judge(Fairness(sensitive_attributes=["sex"]),
...           {"sex": {"disparate_impact": 0.7, "equal_opportunity_diff": 0.0, "predictive_parity_diff": 0.0}},
...           dataset="customers")
>>> v.passed, v.findings[0].rule_id
(False, 'customers/fairness/disparate_impact')
>>> v.failures
["disparate impact on 'sex' is 0.700 < 0.8"]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from governance.policy import DatasetPolicy, Fairness

__all__ = ["METRICS", "FairnessVerdict", "Finding", "MetricRule", "judge", "left_out", "thresholds"]


@dataclass(frozen=True, slots=True)
class MetricRule:
    """One fairness metric: its policy threshold, its direction, its rule id and how it is named."""

    metric: str  # the key in a metrics mapping, e.g. "disparate_impact"
    threshold: str  # the policy's field, e.g. "disparate_impact_min"
    higher_is_better: bool  # True: value >= limit; False: |value| <= limit
    rule: str  # the rule id's last part, e.g. "disparate_impact" in "customers/fairness/disparate_impact"
    label: str  # how a message names it, e.g. "disparate impact"

    @property
    def op(self) -> str:
        """How the passing condition is written: ``≥`` or ``|x| ≤``."""
        return "≥" if self.higher_is_better else "|x| ≤"

    def meets(self, value: Any, limit: float) -> Any:
        """Whether ``value`` meets ``limit``; elementwise on numpy arrays. NaN never meets it."""
        return value >= limit if self.higher_is_better else abs(value) <= limit


METRICS: tuple[MetricRule, ...] = (
    MetricRule("disparate_impact", "disparate_impact_min", True, "disparate_impact", "disparate impact"),
    MetricRule("equal_opportunity_diff", "equal_opportunity_max_diff", False, "equal_opportunity",
               "equal opportunity difference"),
    MetricRule("predictive_parity_diff", "predictive_parity_max_diff", False, "predictive_parity",
               "predictive parity difference"),
)
"""The fairness metrics the policy sets thresholds for, in the order they are judged."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One judged rule: which, on what, the value against the limit, whether it passed, and why.

    ``metric`` (and ``value``, ``limit``) are ``None`` for a finding about an attribute as a
    whole (no metrics for it) or about the evaluation as a whole (no metrics at all).
    ``measured`` is False for a metric that had fewer than two groups of ``min_group_size``:
    such a check is ``ok`` (it fails nothing) and its message says it was not measured.
    """

    rule_id: str
    attribute: str | None
    metric: str | None
    value: float | None
    limit: float | None
    ok: bool
    message: str
    measured: bool = True


@dataclass(frozen=True, slots=True)
class FairnessVerdict:
    """The judge's answer: ``passed``, and every check it made (``checks``) in judging order.

    ``unmeasured``: ``{attribute: {metric: {group: n}}}``, the groups left out of a metric for
    having fewer than ``min_group_size`` rows in its subset (``n``: how many they had).
    """

    passed: bool
    checks: tuple[Finding, ...] = ()
    unmeasured: Mapping[str, Mapping[str, Mapping[str, int]]] = field(default_factory=dict)

    @property
    def findings(self) -> tuple[Finding, ...]:
        """The checks that failed, in judging order (the first is what the gate reports)."""
        return tuple(c for c in self.checks if not c.ok)

    @property
    def failures(self) -> list[str]:
        """The failed checks' messages."""
        return [f.message for f in self.findings]

    @property
    def rule_ids(self) -> tuple[str, ...]:
        """The failed checks' rule ids."""
        return tuple(f.rule_id for f in self.findings)

    @property
    def not_measured(self) -> tuple[Finding, ...]:
        """The checks of metrics that could not be measured (fewer than two groups large enough)."""
        return tuple(c for c in self.checks if not c.measured)

    @property
    def notes(self) -> list[str]:
        """What the verdict does not cover, in plain words: the metrics not measured, then the
        groups left out of a metric that was measured. Empty when every group counted."""
        out = [c.message for c in self.not_measured]
        done = {(c.attribute, c.metric) for c in self.not_measured}
        for attr, by_metric in self.unmeasured.items():
            for r in METRICS:
                groups = by_metric.get(r.metric)
                if groups and (attr, r.metric) not in done:
                    out.append(f"{r.label} on '{attr}' leaves out {_groups(groups, r)}")
        return out

    def check(self, attribute: str, metric: str) -> Finding | None:
        """The check of ``metric`` on ``attribute``; ``None`` when it was not judged."""
        return next((c for c in self.checks if c.attribute == attribute and c.metric == metric), None)

    def __bool__(self) -> bool:
        return self.passed


def thresholds(policy: DatasetPolicy | Fairness | Mapping[str, Any] | None) -> dict[str, float]:
    """The thresholds as a plain mapping (``{"disparate_impact_min": 0.8, ...}``).

    A dataset policy without a ``fairness`` section (or ``None``) has none. A mapping keeps
    only the thresholds :data:`METRICS` knows.
    """
    if isinstance(policy, DatasetPolicy):
        policy = policy.fairness
    if policy is None:
        return {}
    if isinstance(policy, Fairness):
        return {r.threshold: float(getattr(policy, r.threshold)) for r in METRICS}
    if isinstance(policy, Mapping):
        return {r.threshold: float(policy[r.threshold]) for r in METRICS if policy.get(r.threshold) is not None}
    raise TypeError(f"thresholds come from a DatasetPolicy, a Fairness or a mapping, not {type(policy).__name__}")


def left_out(metrics: Mapping[str, Any]) -> tuple[int, dict[str, dict[str, int]], dict[str, int]]:
    """One attribute's group-size record: ``(min_group_size, left out, measured)``.

    ``left out`` is ``{metric: {group: n}}`` for groups below ``min_group_size`` in the metric's
    subset, ``measured`` is ``{metric: groups at the size}``. Metrics without a record (computed
    with ``min_group_size`` 1, or a card from before it existed) have neither: every group counted.
    """
    size = _number(metrics.get("min_group_size"))
    sizes = metrics.get("group_sizes")
    if size is None or not isinstance(sizes, Mapping):
        return 1, {}, {}
    size_i = max(1, int(size))
    out: dict[str, dict[str, int]] = {}
    kept: dict[str, int] = {}
    for r in METRICS:
        groups = sizes.get(r.metric)
        if not isinstance(groups, Mapping):
            continue
        counts = {str(g): int(n) for g, n in groups.items() if _number(n) is not None}
        small = {g: n for g, n in sorted(counts.items()) if n < size_i}
        if small:
            out[r.metric] = small
        kept[r.metric] = sum(1 for n in counts.values() if n >= size_i)
    return size_i, out, kept


_COUNTED = {"disparate_impact": "rows", "equal_opportunity_diff": "actual positives",
            "predictive_parity_diff": "predicted positives"}
"""What a group's size counts, per metric (the subset the metric's rate is taken over)."""


def _groups(groups: Mapping[str, int], r: MetricRule) -> str:
    """``groups too small to measure (rows): 'X' (5), 'Y' (2)``."""
    listed = ", ".join(f"'{g}' ({n})" for g, n in groups.items())
    return f"groups too small to measure ({_COUNTED[r.metric]}): {listed}"


def judge(
    policy: DatasetPolicy | Fairness | Mapping[str, Any],
    metrics: Mapping[str, Mapping[str, Any]] | None,
    required: Iterable[str] | None = None,
    *,
    dataset: str | None = None,
) -> FairnessVerdict:
    """Judge per-attribute fairness metrics by the policy's thresholds.

    Args:
        policy: the dataset's policy, its ``fairness`` section, or a thresholds mapping
            (``{"disparate_impact_min": ..., ...}``, e.g. what a model card stores).
        metrics: ``{attribute: {metric: value}}`` (other keys, such as ``by_group``, are ignored).
        required: the attributes that must have metrics, in judging order; default: the
            policy's ``sensitive_attributes`` (none for a thresholds mapping). Attributes in
            ``metrics`` that are not required are judged too, after them, in sorted order.
        dataset: names the rule ids (``<dataset>/fairness/...``); default: a dataset policy's
            own name. Without one, rule ids start at ``fairness/``.

    Returns:
        A :class:`FairnessVerdict`; its first finding is the rule the deploy gate denies by.

    Raises:
        TypeError: ``policy`` is none of the accepted kinds.
    """
    if isinstance(policy, DatasetPolicy):
        dataset = dataset or policy.dataset
        if required is None and policy.fairness is not None:
            required = policy.fairness.sensitive_attributes
    elif isinstance(policy, Fairness) and required is None:
        required = policy.sensitive_attributes
    limits = thresholds(policy)
    base = f"{dataset}/fairness" if dataset else "fairness"
    required = list(required or ())
    metrics = metrics or {}
    if not metrics:
        return FairnessVerdict(False, (Finding(base, None, None, None, None, False,
                                               "no fairness evaluation, which the policy requires"),))
    checks: list[Finding] = []
    unmeasured: dict[str, dict[str, dict[str, int]]] = {}
    for attr in required + sorted(a for a in metrics if a not in required):
        m = metrics.get(attr)
        if m is None:
            checks.append(Finding(f"{base}/{attr}", attr, None, None, None, False, f"no fairness metrics for '{attr}'"))
            continue
        size, small, kept = left_out(m)
        if small:
            unmeasured[attr] = small
        for r in METRICS:
            limit = limits.get(r.threshold)
            if limit is None:
                continue
            value = _number(m.get(r.metric))
            if value is None and kept.get(r.metric, 2) < 2:
                checks.append(Finding(
                    f"{base}/{r.rule}", attr, r.metric, None, limit, True,
                    f"{r.label} on '{attr}' not measured: {kept.get(r.metric, 0)} group(s) with at least {size} "
                    f"{_COUNTED[r.metric]}, two are needed"
                    + (f"; {_groups(small[r.metric], r)}" if small.get(r.metric) else ""), measured=False))
                continue
            if value is None:
                ok, message = False, f"{r.label} on '{attr}' is missing, so {r.op} {limit:g} cannot be met"
            else:
                ok = bool(r.meets(value, limit))
                cmp = ("≥" if ok else "<") if r.higher_is_better else ("≤" if ok else ">")
                message = f"{r.label} on '{attr}' is {value:.3f} {cmp} {limit:g}"
            checks.append(Finding(f"{base}/{r.rule}", attr, r.metric, value, limit, ok, message))
    if checks and not any(c.measured for c in checks):  # fail closed: no measurement, no claim
        checks.append(Finding(base, None, None, None, None, False,
                              "no fairness metric could be measured: every attribute has fewer than two groups "
                              "of min_group_size (see the notes); a larger holdout or a smaller min_group_size "
                              "is needed"))
    return FairnessVerdict(all(c.ok for c in checks), tuple(checks), unmeasured)


def _number(value: Any) -> float | None:
    """A finite-or-infinite float, or ``None`` for a missing, non-numeric or NaN value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return None if math.isnan(value) else value
