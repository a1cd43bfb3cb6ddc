"""Drift monitoring: how far live traffic has moved from the training data.

The predictor appends one JSON line per scored entity to
``<workspace>/serving/requests/<model>.jsonl``::

    {"ts": "2025-01-02T03:04:05Z", "model": "credit", "version": 1, "token": "sub_...",
     "features": {"income": 51234.5, "region": "north"}, "score": 0.12}

This module compares those lines with the training data's :class:`Profile` using the
Population Stability Index, per feature and for the score, and reports the result three ways:
the audit log (``monitor.drift``, plus ``monitor.alert`` for every feature in alert), an
optional webhook, and Prometheus gauges (:class:`DriftMetrics`, :func:`render_textfile`)
that ``infra/prometheus/alerts.yml`` turns into alerts.

PSI::

    PSI = sum over bins  (c_i - r_i) * ln(c_i / r_i)

with ``r_i``/``c_i`` the profile's (training) and current share of bin ``i``; a share of 0 counts as
``epsilon`` (1e-4) so an empty bin gives a large finite term rather than infinity. Numeric
features use the profile's quantiles as bin edges (ties merged, so a feature with few
distinct values gets fewer bins; the outer bins are open-ended, so values beyond the
profile's range land in them — except that a point mass at the profile's maximum
gets a bin of its own, so a shift above it shows); categorical features use one bin per category seen in
either sample. ``None`` and NaN are dropped. Statuses: ``ok``; ``warn`` when PSI > 0.1;
``alert`` when PSI > 0.25 (the usual reading: small / moderate / significant shift);
``no_data`` when fewer than ``min_records`` values were seen.

Example::

    ref = Profile.from_table(training_table, score=training_scores)   # stored with the model
    report = monitor(ws, ws.actor("mel"), model="credit", profile=ref,
                     since=datetime.now(timezone.utc) - timedelta(hours=1))
    DriftMetrics(REGISTRY).observe(report)                              # the predictor's /metrics

Privacy: a :class:`Profile` keeps only a summary of each feature (bin edges and shares,
category shares), never the training rows: the model's ε does not cover raw training values
stored next to it. Reports, audit events and metrics carry counts and PSI values — never
tokens or feature values. Webhook URLs can hold secrets; the audit log records only their
scheme and host.

Errors: caller mistakes raise ``ValueError``/``TypeError``; a denied gate decision raises
:class:`governance.errors.AccessDenied`; a missing ``log_path`` raises ``FileNotFoundError``.
Webhook failures are audited (outcome ``error``), never raised.
"""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal


from governance.errors import LakewardenError
from governance.gate import Actor, Resource
from governance.policy import IDENT, Stage

if TYPE_CHECKING:
    import pyarrow as pa
    from prometheus_client import CollectorRegistry

    from governance.workspace import Workspace

__all__ = [
    "DEFAULT_THRESHOLDS",
    "PROFILE_FORMAT",
    "CategoricalProfile",
    "DriftMetrics",
    "DriftReport",
    "FeatureDrift",
    "NumericProfile",
    "Profile",
    "RequestRecords",
    "drift_report",
    "monitor",
    "psi",
    "psi_categorical",
    "read_request_log",
    "render_textfile",
    "request_log_path",
]

from training.registry import (  # noqa: F401  (re-exported: the drift profile is the monitor's vocabulary)
    EPSILON,
    PROFILE_FORMAT,
    CategoricalProfile,
    FeatureProfile,
    NumericProfile,
    Profile,
    psi,
    psi_categorical,
)

DEFAULT_THRESHOLDS: Mapping[str, float] = MappingProxyType({"warn": 0.1, "alert": 0.25})
Status = Literal["ok", "warn", "alert", "no_data"]
_RANK = {"ok": 0, "no_data": 1, "warn": 2, "alert": 3}
_NAME = re.compile(IDENT)
_PSI_DIGITS = 6  # rounded in reports: stable JSON, and no long digit runs for the PII detectors to trip on


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))

def request_log_path(ws: "Workspace", model: str) -> Path:
    """Where the predictor writes ``model``'s request log: ``<workspace>/serving/requests/<model>.jsonl``."""
    _check_model(model)
    return ws.config.workspace_dir / "serving" / "requests" / f"{model}.jsonl"


class RequestRecords(list):  # type: ignore[type-arg]
    """The records read from a request log (a list of dicts), with what was left out.

    Attributes: ``lines`` (non-blank lines read), ``malformed`` (lines that are not a JSON
    object with a parseable ``ts`` and a ``features`` object), ``filtered`` (other models,
    or older than ``since``).
    """

    def __init__(self, records: Iterable[dict[str, Any]] = (), *, lines: int = 0, malformed: int = 0, filtered: int = 0) -> None:
        super().__init__(records)
        self.lines = lines
        self.malformed = malformed
        self.filtered = filtered


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


def _utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def read_request_log(
    path: str | Path, *, since: datetime | None = None, model: str | None = None, tail_bytes: int | None = None
) -> RequestRecords:
    """Read a request log line by line, skipping (and counting) lines that cannot be used.

    Args:
        path: the JSON Lines file.
        since: keep records with ``ts >= since`` (naive datetimes are taken as UTC).
        model: keep records of this model only.
        tail_bytes: read only the last this many bytes (from the first whole line in them):
            a running server refreshing its gauges reads recent traffic, not the whole log.

    Returns:
        :class:`RequestRecords`: the records, oldest first as written, each with ``_ts``
        added (the parsed timestamp), and the counts of malformed and filtered lines.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    since = _utc(since) if since is not None else None
    out = RequestRecords()
    with open(path, "rb") as fh:
        if tail_bytes is not None:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - tail_bytes))
            if size > tail_bytes:
                fh.readline()  # a partial line: start at the next whole one
        for raw in fh:
            if not raw.strip():
                continue
            out.lines += 1
            try:
                rec = json.loads(raw)
            except ValueError:  # includes invalid UTF-8
                out.malformed += 1
                continue
            ts = _parse_ts(rec.get("ts")) if isinstance(rec, dict) else None
            if ts is None or not isinstance(rec.get("features"), dict):
                out.malformed += 1
                continue
            if (model is not None and rec.get("model") != model) or (since is not None and ts < since):
                out.filtered += 1
                continue
            rec["_ts"] = ts
            out.append(rec)
    return out


# -- report -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """PSI and status of one feature (or of the score) over a window of records.

    ``count`` values were used; ``missing`` records had none (absent, None, NaN);
    ``invalid`` had a value of the wrong kind (a string for a numeric feature).
    ``psi`` is None when no value was seen.
    """

    name: str
    kind: Literal["numeric", "categorical"]
    psi: float | None
    status: Status
    count: int
    missing: int = 0
    invalid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "psi": None if self.psi is None else round(self.psi, _PSI_DIGITS),
            "status": self.status,
            "count": self.count,
            "missing": self.missing,
            "invalid": self.invalid,
        }


@dataclass(frozen=True, slots=True)
class DriftReport:
    """The result of :func:`drift_report`: per-feature and score drift, with counts.

    ``status`` is the worst of all (alert > warn > no_data > ok). ``alerts`` names the
    features in alert, and ``score`` when the score is.
    """

    model: str | None
    features: Mapping[str, FeatureDrift]
    score: FeatureDrift
    records: int
    malformed: int
    thresholds: Mapping[str, float]
    computed_at: datetime
    window_start: datetime | None = None
    window_end: datetime | None = None
    versions: Mapping[str, int] = field(default_factory=dict)
    unexpected_features: tuple[str, ...] = ()

    @property
    def status(self) -> Status:
        return max((f.status for f in (*self.features.values(), self.score)), key=_RANK.__getitem__)

    @property
    def alerts(self) -> tuple[str, ...]:
        names = [n for n, f in self.features.items() if f.status == "alert"]
        return (*names, "score") if self.score.status == "alert" else tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: statuses, PSI (rounded to 6 places) and counts; no tokens, no feature values."""
        return {
            "model": self.model,
            "status": self.status,
            "computed_at": self.computed_at.isoformat(),
            "window": {
                "start": self.window_start.isoformat() if self.window_start else None,
                "end": self.window_end.isoformat() if self.window_end else None,
            },
            "records": self.records,
            "malformed": self.malformed,
            "versions": dict(self.versions),
            "thresholds": dict(self.thresholds),
            "features": {n: f.to_dict() for n, f in self.features.items()},
            "score": self.score.to_dict(),
            "alerts": list(self.alerts),
            "unexpected_features": list(self.unexpected_features),
        }


def _thresholds(t: Mapping[str, float]) -> Mapping[str, float]:
    if set(t) != {"warn", "alert"}:
        raise ValueError(f"thresholds need exactly 'warn' and 'alert', got {sorted(t)}")
    warn, alert = float(t["warn"]), float(t["alert"])
    if not 0 < warn <= alert:
        raise ValueError(f"thresholds must satisfy 0 < warn <= alert, got warn={warn:g}, alert={alert:g}")
    return MappingProxyType({"warn": warn, "alert": alert})


def _status(value: float | None, count: int, min_records: int, t: Mapping[str, float]) -> Status:
    if value is None or count < min_records:
        return "no_data"
    if value > t["alert"]:
        return "alert"
    if value > t["warn"]:
        return "warn"
    return "ok"


def _drift(name: str, ref: FeatureProfile, values: list[Any], min_records: int, t: Mapping[str, float]) -> FeatureDrift:
    used: list[Any] = []
    missing = invalid = 0
    for v in values:
        if _is_missing(v):
            missing += 1
        elif ref.kind == "numeric" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            invalid += 1
        elif ref.kind == "categorical" and isinstance(v, (dict, list)):
            invalid += 1
        else:
            used.append(v)
    value = ref.psi(used) if used else None
    return FeatureDrift(name, ref.kind, value, _status(value, len(used), min_records, t), len(used), missing, invalid)


def drift_report(
    profile: Profile,
    records: Sequence[Mapping[str, Any]],
    *,
    thresholds: Mapping[str, float] = DEFAULT_THRESHOLDS,
    min_records: int = 1,
    model: str | None = None,
    now: datetime | None = None,
) -> DriftReport:
    """PSI of every profiled feature and of the score over ``records``.

    Args:
        profile: the training distribution (the model's drift profile).
        records: request-log records (``features`` dict and ``score`` each); a
            :class:`RequestRecords` also brings its malformed count.
        thresholds: ``warn`` and ``alert`` PSI levels; status is ``warn`` above ``warn``,
            ``alert`` above ``alert``.
        min_records: fewer values than this for a feature gives ``no_data`` (PSI on a
            handful of requests is noise).
        model: the model's name, carried into the report and the metrics' labels.
        now: the report's time (default: now, UTC).

    Raises:
        ValueError: bad thresholds or ``min_records`` < 1.
    """
    t = _thresholds(thresholds)
    if min_records < 1:
        raise ValueError(f"min_records must be >= 1, got {min_records}")
    cols: dict[str, list[Any]] = {n: [] for n in profile.features}
    scores: list[Any] = []
    versions: dict[str, int] = {}
    unexpected: set[str] = set()
    start = end = None
    for rec in records:
        feats = rec.get("features") or {}
        for n, vals in cols.items():
            vals.append(feats.get(n))
        unexpected.update(k for k in feats if k not in cols)
        scores.append(rec.get("score"))
        v = str(rec.get("version"))
        versions[v] = versions.get(v, 0) + 1
        ts = rec.get("_ts") or _parse_ts(rec.get("ts"))
        if ts is not None:
            start = ts if start is None or ts < start else start
            end = ts if end is None or ts > end else end
    return DriftReport(
        model=model,
        features={n: _drift(n, profile.features[n], cols[n], min_records, t) for n in profile.features},
        score=_drift("score", profile.score, scores, min_records, t),
        records=len(records),
        malformed=int(getattr(records, "malformed", 0)),
        thresholds=t,
        computed_at=_utc(now) if now is not None else datetime.now(timezone.utc),
        window_start=start,
        window_end=end,
        versions=dict(sorted(versions.items())),
        unexpected_features=tuple(sorted(unexpected)),
    )


# -- the monitoring stage -----------------------------------------------------------------
def _check_model(model: str) -> None:
    if not isinstance(model, str) or not _NAME.match(model):
        raise ValueError(f"model name {model!r} must match {IDENT}")


def _check_webhook(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook must be an http(s) URL with a host")
    return parts


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would become a GET without the report: treat redirects as failures."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post_json(url: str, body: bytes, timeout: float) -> int:
    """POST ``body`` to ``url``; the HTTP status. Raises on network errors and non-2xx statuses."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(_NoRedirect)  # non-2xx (redirects included) raise HTTPError
    with opener.open(req, timeout=timeout) as resp:
        return int(resp.status)


def monitor_model(
    ws: "Workspace",
    actor: Actor,
    model: str,
    *,
    since: datetime | None = None,
    webhook: str | None = None,
    min_records: int = 1,
) -> DriftReport:
    """``lakewarden monitor``: drift of a registered model's traffic against the profile stored with it.

    ``model`` is ``name`` (the latest version) or ``name@version``. An actor who may not run
    ``serve`` is refused (and audited) before the registry is read; then :func:`monitor` decides
    on the model and reports.

    Raises:
        AccessDenied: the gate denied ``serve``.
        ModelNotFound: no such model or version.
        MonitorError: the version has no stored drift profile (trained before profiles were kept).
    """
    from training.registry import Registry, model_name

    ws.gate.require_stage(Stage.SERVE, actor, Resource.model(model_name(model)))
    reg = Registry(ws)
    card = reg.card(model)
    profile = reg.profile(card.ref)
    if profile is None:
        raise MonitorError(f"{card.ref} has no drift profile (it was trained before profiles were stored)",
                           hint="retrain it, or monitor a newer version")
    return monitor(ws, actor, model=card.name, profile=profile, since=since, webhook=webhook, min_records=min_records)


class MonitorError(LakewardenError):
    """Monitoring cannot start for a reason the user can fix (exit 2)."""

    exit_code = 2


def monitor(
    ws: "Workspace",
    actor: Actor,
    *,
    model: str,
    profile: Profile,
    log_path: str | Path | None = None,
    since: datetime | None = None,
    webhook: str | None = None,
    timeout: float = 5,
    thresholds: Mapping[str, float] = DEFAULT_THRESHOLDS,
    min_records: int = 1,
    now: datetime | None = None,
) -> DriftReport:
    """Compute drift for ``model`` from its request log and report it: audit, webhook.

    The gate decides first (``serve`` on ``model:<name>``: the roles that run serving run its
    monitoring). Then one ``monitor.drift`` event (outcome = the report's status; details:
    PSI, status and counts per feature and for the score), one ``monitor.alert`` event
    (outcome ``alert``) per feature in alert (and for the score), and, with ``webhook``, a
    POST of :meth:`DriftReport.to_dict` as JSON audited as ``monitor.webhook`` (``ok`` or
    ``error``; a failure is never raised). The audit log is flushed before returning.

    Args:
        log_path: the request log; default ``<workspace>/serving/requests/<model>.jsonl``,
            which may not exist yet (no traffic: every feature ``no_data``).
        since: only records at or after this time.
        webhook: an http(s) URL; redirects count as failures.
        timeout: seconds for the webhook call.

    Raises:
        AccessDenied: the gate denied ``serve`` on the model.
        ValueError: a bad model name, webhook URL or thresholds.
        FileNotFoundError: an explicit ``log_path`` does not exist.
    """
    _check_model(model)
    hook = _check_webhook(webhook) if webhook is not None else None
    _thresholds(thresholds)
    resource = Resource.model(model)
    decision = ws.gate.enforce(Stage.SERVE, actor, resource)
    if log_path is None:
        path = request_log_path(ws, model)
        records = read_request_log(path, since=since, model=model) if path.exists() else RequestRecords()
    else:
        records = read_request_log(log_path, since=since, model=model)
    report = drift_report(profile, records, thresholds=thresholds, min_records=min_records, model=model, now=now)

    audit = ws.audit
    d = report.to_dict()
    audit.record(
        "monitor.drift",
        actor=actor.name,
        outcome=report.status,
        stage=Stage.SERVE.value,
        resource=str(resource),
        rule_ids=decision.rule_ids,
        details={
            "records": report.records,
            "malformed": report.malformed,
            "filtered": records.filtered,
            "since": _utc(since).isoformat() if since is not None else None,
            "window": d["window"],
            "versions": d["versions"],
            "thresholds": d["thresholds"],
            "features": d["features"],
            "score": d["score"],
            "unexpected_features": d["unexpected_features"],
        },
    )
    in_alert = [("feature", n, f) for n, f in report.features.items() if f.status == "alert"]
    if report.score.status == "alert":
        in_alert.append(("score", "score", report.score))
    for target, name, f in in_alert:
        audit.record(
            "monitor.alert",
            actor=actor.name,
            outcome="alert",
            stage=Stage.SERVE.value,
            resource=str(resource),
            details={
                "target": target,
                "feature": name,
                "psi": f.to_dict()["psi"],
                "threshold": report.thresholds["alert"],
                "count": f.count,
            },
        )
    if hook is not None:
        extra: dict[str, Any]
        where = f"{hook.scheme}://{hook.hostname}" + (f":{hook.port}" if hook.port else "")
        try:
            status = _post_json(webhook, json.dumps(d, sort_keys=True).encode(), timeout)  # type: ignore[arg-type]
            outcome, extra = "ok", {"http_status": status}
        except Exception as e:  # any failure is audited, never raised: drift was already recorded
            outcome = "error"
            extra = {"error": type(e).__name__}
            if isinstance(e, urllib.error.HTTPError):
                extra["http_status"] = e.code
        audit.record(
            "monitor.webhook",
            actor=actor.name,
            outcome=outcome,
            stage=Stage.SERVE.value,
            resource=str(resource),
            details={"endpoint": where, "status": report.status, **extra},
        )
    audit.flush()
    return report


# -- Prometheus ---------------------------------------------------------------------------
class _Gauges:
    def __init__(self, registry: "CollectorRegistry") -> None:
        from prometheus_client import Gauge

        self.feature = Gauge(
            "lakewarden_feature_psi",
            "Population Stability Index of a model input feature against its training profile.",
            ["model", "feature"],
            registry=registry,
        )
        self.score = Gauge(
            "lakewarden_score_psi",
            "Population Stability Index of the model's score against its training profile.",
            ["model"],
            registry=registry,
        )
        self.records = Gauge(
            "lakewarden_drift_records",
            "Request-log records in the latest drift window.",
            ["model"],
            registry=registry,
        )
        self.timestamp = Gauge(
            "lakewarden_drift_last_run_timestamp_seconds",
            "Unix time of the latest drift computation.",
            ["model"],
            registry=registry,
        )
        self.features: dict[str, set[str]] = {}


# One set of gauges per registry: a second DriftMetrics on the same registry (the global
# REGISTRY in a predictor that reloads) reuses them instead of failing on duplicate names.
_GAUGES: "weakref.WeakKeyDictionary[CollectorRegistry, _Gauges]" = weakref.WeakKeyDictionary()


class DriftMetrics:
    """Prometheus gauges for drift, in ``registry`` (default: a new one).

    ``lakewarden_feature_psi{model,feature}``, ``lakewarden_score_psi{model}``,
    ``lakewarden_drift_records{model}`` and
    ``lakewarden_drift_last_run_timestamp_seconds{model}``. A feature or score without data
    (``no_data`` and no PSI) has its series removed rather than left at a stale value.

    Example::

        from prometheus_client import REGISTRY
        metrics = DriftMetrics(REGISTRY)       # served on KServe's /metrics
        metrics.observe(report)
    """

    def __init__(self, registry: "CollectorRegistry | None" = None) -> None:
        if registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
        self.registry = registry
        g = _GAUGES.get(registry)
        if g is None:
            g = _GAUGES[registry] = _Gauges(registry)
        self._g = g

    def observe(self, report: DriftReport) -> None:
        """Set the gauges from ``report`` (which must name its model)."""
        if not report.model:
            raise ValueError("the report names no model: pass model= to drift_report")
        g, m = self._g, report.model
        seen = set()
        for name, f in report.features.items():
            if f.psi is None or f.status == "no_data":
                _remove(g.feature, m, name)
            else:
                g.feature.labels(m, name).set(f.psi)
                seen.add(name)
        for name in g.features.get(m, set()) - seen:
            _remove(g.feature, m, name)
        g.features[m] = seen
        if report.score.psi is None or report.score.status == "no_data":
            _remove(g.score, m)
        else:
            g.score.labels(m).set(report.score.psi)
        g.records.labels(m).set(report.records)
        g.timestamp.labels(m).set(report.computed_at.timestamp())


def _remove(gauge: Any, *labels: str) -> None:
    try:
        gauge.remove(*labels)
    except KeyError:
        pass


def render_textfile(report: DriftReport) -> str:
    """The report's gauges in Prometheus text exposition format, for node_exporter's textfile collector.

    Write it atomically (temp file + rename) to ``<textfile dir>/lakewarden_drift_<model>.prom``.
    """
    from prometheus_client import generate_latest

    metrics = DriftMetrics()
    metrics.observe(report)
    return generate_latest(metrics.registry).decode("utf-8")
