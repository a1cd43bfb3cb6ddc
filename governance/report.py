"""The compliance report: one self-contained HTML file a compliance officer can file or mail.

``lakewarden audit report --html report.html`` gathers, after asking the gate:

(a) data-subject requests and their SLA status (the request ledger, ``governance.erasure``);
(b) policy decisions: allow/deny counts per stage and per rule, and the latest denies with
    actor, rule and reason (from the audit log's ``gate.decide`` events);
(c) privacy budgets per dataset: ε spent and reserved of the total, with a bar;
(d) model cards: version, ε (the released model's, and what its build spent of the budget:
    "unknown" on older cards), utility, fairness metrics against the policy's thresholds,
    approvals and deployments (models live in ``training/``; the kernel never imports it,
    so the caller passes a :data:`ModelSource`, e.g. ``training.compliance.model_summaries``);
(e) a lineage picture, datasets → runs → models, as inline SVG (:mod:`governance.lineage_svg`);
(f) audit-chain integrity: the result of :meth:`AuditLog.verify` and the signed head.

Only a compliance officer may produce it: the gate decides stage ``audit`` on
``system:audit`` (``builtin/audit-table``), the decision is audited, and so is the report
itself (``audit.report``, with counts only). The file has inline CSS, no scripts and no
external references. Every value is escaped with :func:`html.escape`. Subjects never appear:
no subject tokens (anything shaped like one is replaced), and free text passes through
:func:`governance.pii.redact` as a last line of defence.

Example::

    from training.compliance import model_summaries
    rep = build_report(ws, ws.actor("carla"), models=model_summaries)
    write_report(rep, Path("report.html"))
"""

from __future__ import annotations

import html
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from governance.audit import VerifyReport
from governance.errors import LakewardenError
from governance.fairness import METRICS as FAIRNESS_METRICS
from governance.fairness import judge as judge_fairness
from governance.gate import Actor, Resource
from governance.ledger import BudgetStatus, PrivacyLedger
from governance.lineage_svg import LineagePicture, lineage_picture
from governance.pii import redact
from governance.policy import Stage
from governance.workspace import Workspace

__all__ = [
    "AuditReport",
    "DecisionCount",
    "DenyRow",
    "FairnessCheck",
    "ModelSource",
    "ModelSummary",
    "ReportError",
    "RequestRow",
    "Signoff",
    "build_report",
    "fairness_checks",
    "write_report",
]

_TOKEN = re.compile(r"sub_[a-z2-7]{26}")


class ReportError(LakewardenError):
    """The report cannot be written (bad path, unreadable inputs)."""

    exit_code = 2


# -- what the report shows --------------------------------------------------------------
@dataclass(frozen=True)
class FairnessCheck:
    """One fairness metric of one sensitive attribute against the policy's threshold."""

    attribute: str
    metric: str
    value: float | None
    threshold: str  # e.g. "≥ 0.8", "|x| ≤ 0.1"; "" when the policy sets none
    ok: bool | None  # None: no threshold applies
    measured: bool = True  # False: fewer than two groups of the policy's min_group_size
    note: str = ""  # the groups left out of this metric (too small), or why it was not measured


def fairness_checks(
    attributes: Mapping[str, Mapping[str, Any]], thresholds: Mapping[str, float]
) -> tuple[FairnessCheck, ...]:
    """Each attribute's metrics against ``thresholds``, judged by :func:`governance.fairness.judge`.

    One row per attribute (sorted) and metric of :data:`governance.fairness.METRICS`. A metric
    with groups below the policy's ``min_group_size`` says so in ``note``; one that could not be
    measured at all has ``measured`` False.
    """
    judged = judge_fairness(thresholds, attributes)
    out: list[FairnessCheck] = []
    for attr in sorted(attributes):
        small = judged.unmeasured.get(attr, {})
        for r in FAIRNESS_METRICS:
            value = attributes[attr].get(r.metric)
            limit = thresholds.get(r.threshold)
            check = judged.check(attr, r.metric)
            measured = check is None or check.measured
            left = ", ".join(f"{g} ({n})" for g, n in small.get(r.metric, {}).items())
            out.append(FairnessCheck(
                attribute=attr,
                metric=r.metric,
                value=float(value) if isinstance(value, (int, float)) else None,
                threshold="" if limit is None else f"{r.op} {limit:g}",
                ok=None if check is None else check.ok,
                measured=measured,
                note=(check.message if check is not None and not check.measured
                      else f"too small to measure, left out: {left}" if left else ""),
            ))
    return tuple(out)


@dataclass(frozen=True)
class Signoff:
    """An approval or a deployment: who, what (role or target, and a note), when."""

    who: str
    what: str
    at: datetime


@dataclass(frozen=True)
class ModelSummary:
    """What the report shows of one model version (filled in by the training layer)."""

    name: str
    version: int
    dataset: str
    purpose: str
    epsilon: float
    delta: float
    utility: Mapping[str, float]
    fairness: tuple[FairnessCheck, ...]
    fairness_passed: bool | None
    status: str
    approvals: tuple[Signoff, ...] = ()
    deployments: tuple[Signoff, ...] = ()
    # What producing the model cost of the dataset's budget (its build's ledger runs); None: unknown
    # (a card registered before builds were recorded).
    epsilon_spent: float | None = None
    delta_spent: float | None = None
    runs: int | None = None


ModelSource = Callable[[Workspace], Iterable[ModelSummary]]
"""Gives the report its models; called only after the gate has allowed the report."""


@dataclass(frozen=True)
class RequestRow:
    request_id: str
    kind: str
    regime: str
    filed_at: datetime | None
    due_at: datetime | None
    state: str
    sla: str
    completed_at: datetime | None
    late: bool = False  # done after its deadline, or still open past it


@dataclass(frozen=True)
class DecisionCount:
    stage: str
    rule: str
    allow: int
    deny: int


@dataclass(frozen=True)
class DenyRow:
    at: datetime
    seq: int
    actor: str
    stage: str
    resource: str
    rule: str
    reason: str


@dataclass
class AuditReport:
    """Everything the HTML shows; :meth:`to_html` renders it."""

    generated_at: datetime
    generated_by: str
    project: str
    policy_digest: str
    requests: list[RequestRow]
    stage_counts: dict[str, tuple[int, int]]
    rule_counts: list[DecisionCount]
    recent_denies: list[DenyRow]
    budgets: list[BudgetStatus]
    models: list[ModelSummary]
    lineage: LineagePicture
    integrity: VerifyReport
    head: dict[str, Any] | None
    counts: dict[str, int] = field(default_factory=dict)

    def to_html(self) -> str:
        return _render(self)


# -- gathering ------------------------------------------------------------------------------
def build_report(
    ws: Workspace,
    actor: Actor,
    *,
    models: ModelSource | None = None,
    recent_denies: int = 20,
    now: datetime | None = None,
) -> AuditReport:
    """Gather the report (gated: compliance officers only; audited with counts).

    Args:
        ws: the workspace.
        actor: who asks; the gate decides stage ``audit`` on ``system:audit``.
        models: gives the model summaries (``training.compliance.model_summaries``);
            None shows the section as empty.
        recent_denies: how many of the latest denies to list.
        now: the report's time (SLA states are the request ledger's own).

    Raises:
        AccessDenied: the actor is not a compliance officer.
        ValueError: ``recent_denies`` below 1.
    """
    if recent_denies < 1:
        raise ValueError(f"recent_denies must be at least 1 (got {recent_denies})")
    ws.gate.enforce(Stage.AUDIT, actor, Resource.system("audit"))
    ws.audit.flush()  # the report covers everything decided so far, including its own decision
    requests = _requests(ws)
    stage_counts, rule_counts, denies = _decisions(ws, recent_denies)
    budgets = _budgets(ws)
    model_rows = sorted(models(ws) if models else [], key=lambda m: (m.name, m.version))
    picture = lineage_picture(ws.lineage.completed_runs())
    integrity = ws.audit.verify()
    rep = AuditReport(
        generated_at=now or datetime.now(timezone.utc),
        generated_by=actor.name,
        project=ws.config.name,
        policy_digest=ws.policies.digest,
        requests=requests,
        stage_counts=stage_counts,
        rule_counts=rule_counts,
        recent_denies=denies,
        budgets=budgets,
        models=model_rows,
        lineage=picture,
        integrity=integrity,
        head=ws.audit.head(),
    )
    rep.counts = {
        "requests": len(requests or []),
        "decisions": sum(a + d for a, d in stage_counts.values()),
        "denies": sum(d for _, d in stage_counts.values()),
        "budgets": len(budgets),
        "models": len(model_rows),
        "lineage_nodes": len(picture.nodes),
        "audit_events": integrity.events,
    }
    ws.audit.record(
        "audit.report", actor=actor.name, outcome="ok", stage=Stage.AUDIT.value, resource="system:audit",
        details={**rep.counts, "audit_ok": integrity.ok, "policy_digest": rep.policy_digest[:12]},
    )
    ws.audit.flush()
    return rep


def write_report(report: AuditReport, path: str | os.PathLike[str]) -> Path:
    """Write the report's HTML to ``path`` (atomically); return the path.

    Raises:
        ReportError: the folder does not exist, or ``path`` is a folder.
    """
    p = Path(path)
    if p.is_dir():
        raise ReportError(f"{p} is a folder: name the HTML file to write, e.g. {p / 'report.html'}")
    if not p.parent.is_dir():
        raise ReportError(f"cannot write {p}: the folder {p.parent} does not exist")
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(report.to_html(), encoding="utf-8")
        os.replace(tmp, p)
    except OSError as exc:
        raise ReportError(f"cannot write {p}: {exc.strerror}") from None
    return p


def _requests(ws: Workspace) -> list[RequestRow]:
    from governance.erasure.ledger import statuses  # ungated: build_report asked the gate (stage audit)

    rows = []
    for r in statuses(ws):
        rows.append(
            RequestRow(
                request_id=str(r.request_id), kind=str(r.kind), regime=str(r.regime),
                filed_at=r.filed_at, due_at=r.due_at, state=str(getattr(r.state, "value", r.state)),
                sla=str(getattr(r.sla, "value", r.sla)), completed_at=r.completed_at,
                late=bool(getattr(r, "late", False)) or str(getattr(r.sla, "value", r.sla)) == "overdue",
            )
        )
    rows.sort(key=lambda r: (r.filed_at or datetime.min.replace(tzinfo=timezone.utc)), reverse=True)
    return rows


def _decisions(ws: Workspace, recent: int) -> tuple[dict[str, tuple[int, int]], list[DecisionCount], list[DenyRow]]:
    tbl = ws.audit.query(action="gate.decide")
    cols = ["seq", "ts", "actor", "stage", "resource", "outcome", "rule_ids", "details"]
    rows = tbl.select(cols).to_pylist() if tbl.num_rows else []
    per_stage: Counter[tuple[str, str]] = Counter()
    per_rule: Counter[tuple[str, str, str]] = Counter()
    denies: list[dict[str, Any]] = []
    for r in rows:
        stage, outcome = r["stage"] or "—", r["outcome"]
        per_stage[(stage, outcome)] += 1
        for rule in (r["rule_ids"] or "").split(","):
            if rule:
                per_rule[(stage, rule, outcome)] += 1
        if outcome == "deny":
            denies.append(r)
    stages = sorted({s for s, _ in per_stage})
    stage_counts = {s: (per_stage[(s, "allow")], per_stage[(s, "deny")]) for s in stages}
    rules = sorted({(s, rule) for s, rule, _ in per_rule})
    rule_counts = [DecisionCount(s, rule, per_rule[(s, rule, "allow")], per_rule[(s, rule, "deny")]) for s, rule in rules]
    deny_rows = [
        DenyRow(
            at=r["ts"], seq=r["seq"], actor=r["actor"], stage=r["stage"] or "", resource=r["resource"] or "",
            rule=(r["rule_ids"] or "").split(",")[0], reason=_reason(r["details"]),
        )
        for r in reversed(denies[-recent:])
    ]
    return stage_counts, rule_counts, deny_rows


def _reason(details: str | None) -> str:
    if not details:
        return ""
    try:
        reasons = json.loads(details).get("reasons") or []
    except (ValueError, AttributeError):
        return ""
    return "; ".join(str(x) for x in reasons)


def _budgets(ws: Workspace) -> list[BudgetStatus]:
    led = PrivacyLedger(ws)
    return [led.status(n) for n, p in sorted(ws.policies.datasets.items()) if p.privacy is not None]


# -- rendering ------------------------------------------------------------------------------
def _safe(value: Any) -> str:
    """Text for the page: no subject tokens, personal-looking spans redacted, then escaped."""
    text = "" if value is None else str(value)
    text = _TOKEN.sub("sub_…", text)
    return html.escape(redact(text)[0])


def _esc(value: Any) -> str:
    """System values (hashes, key ids, digests): escaped only; hex must not trip the PII detectors."""
    return html.escape(str(value))


def _ts(t: datetime | None) -> str:
    return "—" if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "", empty: str = "none") -> str:
    """An HTML table; ``rows`` cells are already safe HTML."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(head)}" class="empty">{html.escape(empty)}</td></tr>'
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{_safe(text)}</span>'


_SLA_WARN = {"due soon", "due_soon", "at_risk"}


def _sla_badge(r: RequestRow) -> str:
    if r.late:
        return _badge(r.sla if r.sla == "overdue" else f"{r.sla} (late)", "bad")
    return _badge(r.sla, "warn" if r.sla.lower() in _SLA_WARN else "ok")


def _section_requests(rep: AuditReport) -> str:
    rows = [
        (
            _safe(r.request_id), _safe(r.kind), _safe(r.regime.upper()), _ts(r.filed_at), _ts(r.due_at),
            _safe(r.state), _sla_badge(r), _ts(r.completed_at),
        )
        for r in rep.requests
    ]
    late = sum(1 for r in rep.requests if r.late)
    summary = f"<p>{len(rep.requests)} request(s); {late} past their due date.</p>"
    head = ("request", "kind", "regime", "filed", "due", "state", "SLA", "completed")
    return summary + _table(head, rows, empty="no data-subject requests filed")


def _section_decisions(rep: AuditReport) -> str:
    stage_rows = [(_safe(s), str(a), f'<span class="{"deny" if d else ""}">{d}</span>')
                  for s, (a, d) in rep.stage_counts.items()]
    rule_rows = [(_safe(c.stage), f"<code>{_safe(c.rule)}</code>", str(c.allow), str(c.deny)) for c in rep.rule_counts]
    deny_rows = [
        (_ts(d.at), str(d.seq), _safe(d.actor), _safe(d.stage), _safe(d.resource), f"<code>{_safe(d.rule)}</code>",
         _safe(d.reason))
        for d in rep.recent_denies
    ]
    return (
        "<h3>By stage</h3>" + _table(("stage", "allow", "deny"), stage_rows, cls="narrow", empty="no decisions yet")
        + "<h3>By rule</h3>" + _table(("stage", "rule", "allow", "deny"), rule_rows, empty="no decisions yet")
        + f"<h3>Latest denies ({len(rep.recent_denies)})</h3>"
        + _table(("time", "seq", "actor", "stage", "resource", "rule", "reason"), deny_rows, cls="denies",
                 empty="no denies recorded")
    )


def _bar(spent: float, reserved: float, total: float) -> str:
    s = 0.0 if total <= 0 else min(spent / total, 1.0) * 100
    r = 0.0 if total <= 0 else min(reserved / total, 1.0 - s / 100) * 100
    return (f'<div class="bar" title="{s:.0f}% spent, {r:.0f}% reserved"><div class="spent" style="width:{s:.1f}%">'
            f'</div><div class="reserved" style="width:{r:.1f}%"></div></div>')


def _section_budgets(rep: AuditReport) -> str:
    rows = [
        (
            _safe(b.dataset), f"{b.epsilon_spent:.3g} / {b.epsilon_total:g}", f"{b.epsilon_reserved:.3g}",
            f"{b.epsilon_left:.3g}", f"{b.delta_spent:.2g} (≤ {b.delta_max:.2g} a run)", str(b.runs),
            _bar(b.epsilon_spent, b.epsilon_reserved, b.epsilon_total),
        )
        for b in rep.budgets
    ]
    head = ("dataset", "ε spent / total", "ε reserved", "ε left", "δ spent", "runs", "")
    return _table(head, rows, cls="budgets", empty="no dataset declares a privacy budget") + (
        '<p class="legend"><span class="key spent"></span> spent <span class="key reserved"></span> reserved '
        "(basic sequential composition over every private run)</p>"
    )


def _section_models(rep: AuditReport) -> str:
    if not rep.models:
        return '<p class="note">No models registered.</p>'
    parts = []
    for m in rep.models:
        verdict = {True: _badge("passed", "ok"), False: _badge("failed", "bad"), None: _badge("not judged", "warn")}
        util = ", ".join(f"{_safe(k)} {v:.3f}" for k, v in sorted(m.utility.items())) or "—"
        cost = ("unknown" if m.epsilon_spent is None else
                f"{m.epsilon_spent:.3f} (δ {m.delta_spent:g}, {m.runs} run{'s' if m.runs != 1 else ''})")
        facts = _table(
            ("model", "dataset", "purpose", "ε", "δ", "ε spent to build", "utility", "fairness", "status"),
            [(f"<b>{_safe(m.name)}@{m.version}</b>", _safe(m.dataset), _safe(m.purpose), f"{m.epsilon:.3f}",
              f"{m.delta:g}", cost, util, verdict[m.fairness_passed], _safe(m.status))],
        )
        fair_rows = [
            (_safe(c.attribute), _safe(c.metric), _num(c.value), _safe(c.threshold or "—"),
             (_badge("not measured", "warn") if not c.measured else
              {True: _badge("pass", "ok"), False: _badge("FAIL", "bad"), None: "—"}[c.ok])
             + (f" {_safe(c.note)}" if c.note else ""))
            for c in m.fairness
        ]
        fair = _table(("attribute", "metric", "value", "threshold", "result"), fair_rows, cls="narrow",
                      empty="no fairness evaluation")
        appr = "; ".join(f"{_safe(a.who)} ({_safe(a.what)}) {_ts(a.at)}" for a in m.approvals) or "none"
        dep = "; ".join(f"{_safe(d.what)} by {_safe(d.who)} {_ts(d.at)}" for d in m.deployments) or "none"
        parts.append(
            f'<div class="card"><h3>{_safe(m.name)}@{m.version}</h3>{facts}{fair}'
            f"<p><b>Approvals:</b> {appr}<br><b>Deployments:</b> {dep}</p></div>"
        )
    return "".join(parts)


def _section_lineage(rep: AuditReport) -> str:
    pic = rep.lineage
    if not pic.nodes:
        return '<p class="note">No lineage recorded yet.</p>'
    runs = sum(1 for n in pic.nodes.values() if n.kind == "run")
    return (
        f"<p>{len(pic.nodes) - runs} datasets and models, {runs} run groups (runs of one job over the same "
        "datasets are drawn once). Data flows left to right; a dashed edge closes a cycle.</p>"
        f'<div class="lineage-wrap">{pic.svg}</div>'
    )


def _section_integrity(rep: AuditReport) -> str:
    v = rep.integrity
    verdict = _badge("verified", "ok") if v.ok else _badge("FAILED", "bad")
    head = rep.head or {}
    rows = [
        ("result", verdict),
        ("events", f"{v.events:,}"),
        ("signed checkpoints", f"{v.checkpoints:,}"),
        ("head", f"seq {_esc(head.get('seq', '—'))} · <code>{_esc(head.get('hash', '—'))}</code>"),
        ("head signed", f"{_esc(head.get('signed_at', '—'))} by {_esc(head.get('key_id', '—'))}"),
        ("verified in", f"{v.seconds:.2f} s"),
    ]
    out = _table(("", ""), rows, cls="narrow kv")
    if v.findings:
        out += _table(("seq", "finding", "message"),
                      [(_safe(f.seq), _safe(f.kind), _safe(f.message)) for f in v.findings], cls="denies")
    return out


_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px 32px;color:#222;
 background:#fff;font-size:14px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;border-bottom:2px solid #2f6db5;padding-bottom:4px;
 margin-top:32px}h3{font-size:15px;margin:18px 0 6px}
.meta{color:#555}.note{color:#555;font-style:italic}
table{border-collapse:collapse;margin:6px 0 12px;width:100%}table.narrow{width:auto}
th,td{border:1px solid #ccd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef2f8}tbody tr:nth-child(even){background:#fafbfd}td.empty{color:#777;font-style:italic}
code{font-family:"DejaVu Sans Mono",monospace;font-size:12px;word-break:break-all}
.deny{color:#b00020;font-weight:bold}table.denies td{color:#222}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:bold}
.badge.ok{background:#dff3e4;color:#17692f}.badge.bad{background:#fbe0e3;color:#b00020}
.badge.warn{background:#fff2cc;color:#7a5a00}
.bar{width:180px;height:14px;background:#e8e8e8;border-radius:3px;display:flex;overflow:hidden}
.bar .spent{background:#2f6db5;height:100%}.bar .reserved{background:#9fbfe6;height:100%}
.legend .key{display:inline-block;width:12px;height:12px;vertical-align:middle;margin-left:8px}
.legend .key.spent{background:#2f6db5}.legend .key.reserved{background:#9fbfe6}
.card{border:1px solid #ccd;border-radius:6px;padding:4px 14px 8px;margin:12px 0}
.lineage-wrap{overflow-x:auto;border:1px solid #ccd;border-radius:6px;padding:6px;background:#fcfcfe}
table.kv td:first-child{font-weight:bold;background:#f4f6fa}
"""


def _render(rep: AuditReport) -> str:
    sections = [
        ("requests", "Data-subject requests", _section_requests(rep)),
        ("decisions", "Policy decisions", _section_decisions(rep)),
        ("budgets", "Privacy budgets", _section_budgets(rep)),
        ("models", "Model cards", _section_models(rep)),
        ("lineage", "Lineage", _section_lineage(rep)),
        ("integrity", "Audit-chain integrity", _section_integrity(rep)),
    ]
    nav = " · ".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>' for sid, title, content in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">'
        f"<title>Lakewarden compliance report — {_safe(rep.project)}</title><style>{_CSS}</style></head><body>"
        f"<h1>Compliance report — {_safe(rep.project)}</h1>"
        f'<p class="meta">Generated {_ts(rep.generated_at)} by {_safe(rep.generated_by)} · policies '
        f"<code>{_esc(rep.policy_digest[:12])}</code> · no personal data, no subject tokens</p>"
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )
