"""The policy gate: one narrow, fail-closed interface every stage calls.

In the spirit of Trino's ``SystemAccessControl``: a stage asks
``gate.decide(stage, actor, resource, context)`` and gets a :class:`Decision`
with ``allowed``, human-readable ``reasons`` and the ``rule_ids`` that decided.
Anything no rule allows is denied. Every decision is written to the audit log.
``gate.enforce(...)`` is the same call that raises :class:`AccessDenied` on a
deny, which the CLI turns into a non-zero exit and a message naming the rule.

Example::

    >>> d = gate.decide("train", Actor("sam"), Resource.dataset("customers"),
    ...                 {"purpose": "credit_scoring", "epsilon": 3.0, "delta": 1e-5})
    >>> d.allowed, d.rule_ids
    (True, ('roles/data_scientist/stages/train', 'customers/access/data_scientist', ...))

Rule ids are stable strings: ``roles/<role>/stages/<stage>``,
``<dataset>/access/<role>``, ``<dataset>/purposes/<purpose>/sensitive``,
``<dataset>/privacy/epsilon_total``, ``<dataset>/fairness/disparate_impact`` (and the
other fairness rules, decided by :func:`governance.fairness.judge`), ``builtin/...`` for rules the kernel
itself holds (the audit table is for compliance officers only, purposes are
required for feature use, separation of duties for deployments), and
``default-deny`` when nothing matched.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from governance.errors import AccessDenied
from governance.fairness import judge as judge_fairness
from governance.policy import ColumnClass, DatasetPolicy, PolicySet, Stage

if TYPE_CHECKING:
    from governance.workspace import Workspace

_EMPTY: Mapping[str, Any] = MappingProxyType({})
# Context keys that may be copied into the audit log: all are policy vocabulary, never personal data.
_AUDITABLE_CONTEXT = ("purpose", "columns", "epsilon", "delta", "epsilon_spent", "layer", "dataset", "request_id",
                      "role", "run")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who asks. ``roles`` empty means: look the user up in the policy's principals."""

    name: str
    roles: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Resource:
    """What is asked for: a dataset, one of its tables (layer), a model, or a system resource."""

    kind: Literal["dataset", "table", "model", "system"]
    name: str
    layer: str | None = None
    version: int | None = None

    @classmethod
    def dataset(cls, name: str) -> "Resource":
        return cls("dataset", name)

    @classmethod
    def table(cls, dataset: str, layer: str = "silver") -> "Resource":
        return cls("table", dataset, layer=layer)

    @classmethod
    def model(cls, name: str, version: int | None = None) -> "Resource":
        return cls("model", name, version=version)

    @classmethod
    def system(cls, name: str) -> "Resource":
        return cls("system", name)

    def __str__(self) -> str:
        if self.kind == "table":
            return f"table:{self.layer}.{self.name}"
        if self.kind == "model":
            return f"model:{self.name}" + (f"@{self.version}" if self.version is not None else "")
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The gate's answer. ``obligations`` carries what an allow comes with (masks, row filter, columns)."""

    allowed: bool
    reasons: tuple[str, ...]
    rule_ids: tuple[str, ...]
    stage: Stage
    actor: Actor
    resource: Resource
    obligations: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def raise_if_denied(self) -> "Decision":
        if not self.allowed:
            raise AccessDenied(self)
        return self

    def __bool__(self) -> bool:  # a Decision reads as its answer
        return self.allowed


class AuditSink(Protocol):
    def record(
        self,
        action: str,
        *,
        actor: str,
        outcome: str,
        stage: str | None = ...,
        resource: str | None = ...,
        rule_ids: tuple[str, ...] | list[str] = ...,
        subject_token: str | None = ...,
        details: Mapping[str, Any] | None = ...,
    ) -> int: ...

    def flush(self) -> None: ...


class _Verdict:
    """Collects rule ids and reasons while a decision is being made."""

    __slots__ = ("rules", "reasons", "denied", "obligations")

    def __init__(self) -> None:
        self.rules: list[str] = []
        self.reasons: list[str] = []
        self.denied = False
        self.obligations: dict[str, Any] = {}

    def allow(self, rule: str) -> None:
        self.rules.append(rule)

    def deny(self, rule: str, reason: str) -> "_Verdict":
        if not self.denied:  # the first deny decides; keep only its rule and reason
            self.rules = [rule]
            self.reasons = [reason]
            self.denied = True
        return self


class _Run:
    """A run of identical allow decisions: the first is audited in full, the rest are counted."""

    __slots__ = ("decision", "id", "context", "repeats", "tally", "opened", "last")

    def __init__(self, decision: Decision, run_id: str, context: Mapping[str, Any], now: datetime) -> None:
        self.decision, self.id, self.context = decision, run_id, context
        self.repeats, self.tally, self.opened, self.last = 0, {}, now, now


def _frozen(ctx: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """A hashable form of a decision context, or None when it holds something that is not plain data."""
    items = []
    for k, v in sorted(ctx.items()):
        if isinstance(v, (list, tuple)):
            if not all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
                return None
            v = ("__seq__", *v)
        elif not (isinstance(v, (str, int, float, bool)) or v is None):
            return None
        items.append((k, v))
    return tuple(items)


class Gate:
    """Decides whether an actor may run a stage on a resource, from one PolicySet.

    ``repeat_window`` (seconds) and ``clock`` govern :meth:`enforce_repeated`: a run of identical
    allow decisions is audited as its first decision plus one ``gate.decide.repeat`` event that
    counts the rest, written when the window ends, at the next differing call, or at :meth:`close`.
    """

    def __init__(
        self,
        policies: PolicySet,
        *,
        audit: AuditSink | None = None,
        repeat_window: float = 1.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.policies = policies
        self.audit = audit
        self.repeat_window = repeat_window
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._runs: dict[tuple[Any, ...], _Run] = {}
        self._runs_lock = threading.Lock()
        self._stage_roles: dict[Stage, frozenset[str]] = {
            s: frozenset(r for r, spec in policies.roles.roles.items() if s in spec.stages) for s in Stage
        }

    # -- public interface -----------------------------------------------------------
    def decide(
        self,
        stage: Stage | str,
        actor: Actor,
        resource: Resource,
        context: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Decide and audit. Never raises for a deny; see :meth:`enforce`."""
        stage = Stage(stage)
        ctx = context or _EMPTY
        roles = actor.roles or self.policies.roles_of(actor.name)
        v = self._evaluate(stage, actor, roles, resource, ctx)
        if not v.denied and not v.rules:
            v.deny("default-deny", "no rule allows it")
        if not v.denied and not v.reasons:
            v.reasons.append("allowed")
        decision = Decision(
            allowed=not v.denied,
            reasons=tuple(v.reasons),
            rule_ids=tuple(v.rules),
            stage=stage,
            actor=Actor(actor.name, tuple(roles)),
            resource=resource,
            obligations=MappingProxyType(v.obligations) if v.obligations else _EMPTY,
        )
        if self.audit is not None:
            self._audit(decision, ctx)
        return decision

    def enforce(
        self,
        stage: Stage | str,
        actor: Actor,
        resource: Resource,
        context: Mapping[str, Any] | None = None,
    ) -> Decision:
        """Like :meth:`decide`, but raise :class:`AccessDenied` on a deny."""
        return self.decide(stage, actor, resource, context).raise_if_denied()

    def enforce_repeated(
        self,
        stage: Stage | str,
        actor: Actor,
        resource: Resource,
        context: Mapping[str, Any] | None = None,
        *,
        tally: Mapping[str, int] | None = None,
    ) -> Decision:
        """:meth:`enforce` for a hot path that asks the same question again and again (an online
        feature lookup per request).

        The answer is the same as :meth:`enforce`'s, and so is what the audit log can prove, in a
        coarser grain: the first decision of a run is evaluated and audited in full (its details
        carry the run id); while the same actor, roles, stage, resource and context come back within
        ``repeat_window`` seconds, the gate returns that decision without evaluating again and counts
        the call, summing ``tally`` (what each call did, e.g. ``{"entities": 3}``). The run ends with
        one ``gate.decide.repeat`` event (run id, repeats, first and last time, the tallies) when the
        window has passed, and at :meth:`close`. Denies are never coalesced: each is evaluated,
        audited and flushed at once, as by :meth:`enforce`. A context holding anything but plain
        values is decided by :meth:`enforce`.

        What a SIGKILL can lose: the counts of the runs still open (at most ``repeat_window``
        seconds of calls per run), besides the audit log's own unflushed buffer.
        """
        stage = Stage(stage)
        ctx = context or _EMPTY
        frozen = _frozen(ctx)
        if frozen is None or self.audit is None:
            return self.enforce(stage, actor, resource, ctx)
        roles = actor.roles or self.policies.roles_of(actor.name)
        key = (stage, actor.name, tuple(roles), resource, frozen)
        now = self._clock()
        with self._runs_lock:
            run = self._runs.get(key)
            if run is not None and (now - run.opened).total_seconds() < self.repeat_window:
                run.repeats += 1
                run.last = now
                for k, n in (tally or {}).items():
                    run.tally[k] = run.tally.get(k, 0) + n
                return run.decision
            if run is not None:
                del self._runs[key]
                self._close_run(run)
        run_id = secrets.token_hex(8)
        d = self.decide(stage, actor, resource, {**ctx, "run": run_id})
        if not d.allowed:
            raise AccessDenied(d)
        new = _Run(d, run_id, ctx, now)
        new.tally = dict(tally or {})
        with self._runs_lock:
            old = self._runs.pop(key, None)
            self._runs[key] = new
        if old is not None:
            self._close_run(old)
        return d

    def close(self) -> None:
        """End every open run of repeated decisions (its ``gate.decide.repeat`` event is recorded)."""
        with self._runs_lock:
            runs, self._runs = list(self._runs.values()), {}
        for run in runs:
            self._close_run(run)

    def _close_run(self, run: _Run) -> None:
        if not run.repeats or self.audit is None:
            return
        d = run.decision
        details: dict[str, Any] = {"run": run.id, "repeats": run.repeats, "first": run.opened.isoformat(),
                                   "last": run.last.isoformat()}
        if run.tally:
            details["tally"] = dict(run.tally)
        for k in _AUDITABLE_CONTEXT:
            if k in run.context:
                val = run.context[k]
                details[k] = list(val) if isinstance(val, (list, tuple)) else val
        self.audit.record("gate.decide.repeat", actor=d.actor.name, outcome="allow", stage=d.stage.value,
                          resource=str(d.resource), rule_ids=d.rule_ids, details=details)

    def narrow(self, actor: Actor, role: str, stage: Stage | str, resource: Resource) -> Actor:
        """``actor`` acting in ``role`` only (an analyst who holds several roles and wants one's view).

        A role the actor does not hold is a deny by ``builtin/role-not-held``, audited like every
        decision, and raised as :class:`AccessDenied`.
        """
        roles = actor.roles or self.policies.roles_of(actor.name)
        if role in roles:
            return Actor(actor.name, (role,))
        d = Decision(False, (f"{actor.name} does not hold role {role}",), ("builtin/role-not-held",), Stage(stage),
                     Actor(actor.name, tuple(roles)), resource)
        if self.audit is not None:
            self._audit(d, {"role": role})
        raise AccessDenied(d)

    def require_stage(self, stage: Stage | str, actor: Actor, resource: Resource) -> None:
        """Refuse, before anything is looked up, an actor none of whose roles may run ``stage``.

        For verbs that must find something (a model, a request, a running server) before they
        can ask their full question: without this, a refused actor would learn from a "not
        found" whether it exists. The deny is the one :meth:`decide` would give
        (``roles/stages/<stage>``) and is audited like it; an actor who may run the stage passes
        silently (no event), and the verb's own decision follows.
        """
        stage = Stage(stage)
        roles = actor.roles or self.policies.roles_of(actor.name)
        if not any(r in self._stage_roles[stage] for r in roles):
            self.enforce(stage, Actor(actor.name, tuple(roles)), resource)

    # -- evaluation -----------------------------------------------------------------
    def _evaluate(
        self, stage: Stage, actor: Actor, roles: tuple[str, ...], res: Resource, ctx: Mapping[str, Any]
    ) -> _Verdict:
        v = _Verdict()
        allowed_roles = self._stage_roles[stage]
        stage_roles = [r for r in roles if r in allowed_roles]
        if not stage_roles:
            who = ", ".join(roles) if roles else "no role"
            return v.deny(f"roles/stages/{stage.value}", f"{actor.name} ({who}) may not run stage '{stage.value}'")
        v.allow(f"roles/{stage_roles[0]}/stages/{stage.value}")

        if res.kind == "system":
            return self._system(stage, stage_roles, res, v)
        ds_name = res.name if res.kind in ("dataset", "table") else ctx.get("dataset")
        if ds_name is None:
            if res.kind == "model" and stage in (Stage.REGISTER, Stage.LINEAGE, Stage.SERVE):
                return v
            return v.deny("builtin/dataset-required", f"stage '{stage.value}' on {res} must name its dataset")
        ds = self.policies.datasets.get(ds_name)
        if ds is None:
            return v.deny("builtin/unknown-dataset", f"no policy governs dataset '{ds_name}'")

        # The first of the actor's stage roles that the dataset grants access to.
        role = next((r for r in stage_roles if r in ds.access), None)
        if stage in (Stage.REQUEST, Stage.AUDIT, Stage.KEYS, Stage.LINEAGE, Stage.POLICY):
            return v  # dataset exists and the role may run the stage: enough
        if stage is Stage.APPROVE:
            return self._approve(ds, stage_roles, v)
        if role is None:
            return v.deny(f"{ds.dataset}/access", f"roles {', '.join(stage_roles)} have no access to dataset '{ds.dataset}'")
        v.allow(f"{ds.dataset}/access/{role}")
        acc = ds.access[role]

        if stage is Stage.QUERY or (stage is Stage.MAINTAIN and res.kind == "table"):
            layer = res.layer or ctx.get("layer") or "silver"
            if layer not in acc.layers:
                return v.deny(
                    f"{ds.dataset}/access/{role}/layers",
                    f"role {role} may not read the {layer} layer of '{ds.dataset}' (allowed: {', '.join(acc.layers)})",
                )
            if stage is Stage.QUERY:
                return self._query(ds, role, ctx, v)
            return v
        if stage in (Stage.FEATURES, Stage.TRAIN, Stage.EVALUATE, Stage.SERVE):
            self._purpose(ds, role, ctx, v)
            if not v.denied and stage is Stage.TRAIN:
                self._budget(ds, ctx, v)
            return v
        if stage is Stage.DEPLOY:
            return self._deploy(ds, actor, ctx, v)
        return v  # INGEST, REGISTER, MAINTAIN on a dataset: role access suffices

    def _system(self, stage: Stage, roles: list[str], res: Resource, v: _Verdict) -> _Verdict:
        if res.name == "audit":
            if "compliance_officer" not in roles:
                return v.deny("builtin/audit-table", "the audit log is readable only by compliance_officer")
            v.allow("builtin/audit-table")
        if stage is Stage.REQUEST:
            if "compliance_officer" not in roles:
                return v.deny("builtin/requests", "access and erasure requests are run only by compliance_officer")
            v.allow("builtin/requests")
        return v

    def _query(self, ds: DatasetPolicy, role: str, ctx: Mapping[str, Any], v: _Verdict) -> _Verdict:
        acc = ds.access[role]
        visible = ds.silver_columns() if acc.columns == "*" else list(acc.columns)
        wanted = ctx.get("columns")
        if wanted:
            hidden = [c for c in wanted if c not in visible]
            if hidden:
                return v.deny(
                    f"{ds.dataset}/access/{role}/columns",
                    f"role {role} may not see column(s) {', '.join(hidden)} of '{ds.dataset}'",
                )
        masks = {c: str(m) for c, m in acc.masks.items() if c in visible}
        for c in visible:
            if c not in masks and c in ds.columns:
                dm = ds.default_mask(c)
                if dm is not None:
                    masks[c] = str(dm)
        v.obligations = {"columns": visible, "masks": masks, "row_filter": acc.row_filter}
        if masks:
            v.allow(f"{ds.dataset}/access/{role}/masks")
        if acc.row_filter:
            v.allow(f"{ds.dataset}/access/{role}/row_filter")
        return v

    def _purpose(self, ds: DatasetPolicy, role: str, ctx: Mapping[str, Any], v: _Verdict) -> None:
        purpose = ctx.get("purpose")
        if not purpose:
            v.deny("builtin/purpose-required", f"a purpose is required to use data of '{ds.dataset}'")
            return
        spec = ds.purposes.get(purpose)
        if spec is None:
            v.deny(f"{ds.dataset}/purposes", f"purpose '{purpose}' is not allowed for '{ds.dataset}'")
            return
        if purpose not in ds.access[role].purposes:
            v.deny(f"{ds.dataset}/access/{role}/purposes", f"role {role} may not use '{ds.dataset}' for '{purpose}'")
            return
        v.allow(f"{ds.dataset}/purposes/{purpose}")
        derived = None
        for c in ctx.get("columns") or ():
            col = ds.columns.get(c)
            if col is None:
                derived = derived if derived is not None else set(ds.derived_columns())
                if c in derived:
                    continue  # silver's derived features are computed from public columns
                v.deny(f"{ds.dataset}/columns", f"unknown column '{c}' of '{ds.dataset}'")
                return
            if col.class_ is ColumnClass.DIRECT_IDENTIFIER:
                v.deny(
                    f"{ds.dataset}/columns/{c}/direct_identifier",
                    f"column '{c}' is a direct identifier and is never used as a feature",
                )
                return
            if col.class_ is ColumnClass.SENSITIVE and not spec.sensitive:
                v.deny(
                    f"{ds.dataset}/purposes/{purpose}/sensitive",
                    f"column '{c}' is sensitive and purpose '{purpose}' does not allow sensitive attributes",
                )
                return
        # A role that sees only some columns may use only those, for any purpose: the same
        # column list that hides a column from the role's queries keeps it out of its features.
        allowed = ds.access[role].columns
        if allowed != "*":
            hidden = [c for c in ctx.get("columns") or () if c not in allowed]
            if hidden:
                v.deny(
                    f"{ds.dataset}/access/{role}/columns",
                    f"role {role} may not use column(s) {', '.join(hidden)} of '{ds.dataset}' "
                    f"(its columns: {', '.join(allowed)})",
                )

    def _budget(self, ds: DatasetPolicy, ctx: Mapping[str, Any], v: _Verdict) -> None:
        b = ds.privacy
        if b is None:
            v.deny(f"{ds.dataset}/privacy", f"'{ds.dataset}' declares no privacy budget: training is not allowed")
            return
        eps = ctx.get("epsilon")
        if eps is None:
            v.deny("builtin/epsilon-required", "training must state its target epsilon")
            return
        eps = float(eps)
        spent = float(ctx.get("epsilon_spent", 0.0))
        delta = float(ctx.get("delta", b.delta))
        if eps > b.epsilon_per_run:
            v.deny(
                f"{ds.dataset}/privacy/epsilon_per_run",
                f"epsilon {eps:g} exceeds the per-run cap {b.epsilon_per_run:g} of '{ds.dataset}'",
            )
        elif spent + eps > b.epsilon_total + 1e-12:
            left = max(b.epsilon_total - spent, 0.0)
            v.deny(
                f"{ds.dataset}/privacy/epsilon_total",
                f"epsilon {eps:g} would exceed the total budget {b.epsilon_total:g} of '{ds.dataset}' "
                f"({spent:g} spent, {left:g} left)",
            )
        elif delta > b.delta:
            v.deny(f"{ds.dataset}/privacy/delta", f"delta {delta:g} exceeds the policy's {b.delta:g}")
        else:
            v.allow(f"{ds.dataset}/privacy/budget")

    def _approve(self, ds: DatasetPolicy, roles: list[str], v: _Verdict) -> _Verdict:
        approver = next((r for r in roles if r in ds.deployment.approvers), None)
        if approver is None:
            return v.deny(
                f"{ds.dataset}/deployment/approvers",
                f"only {', '.join(ds.deployment.approvers)} may approve models trained on '{ds.dataset}'",
            )
        v.allow(f"{ds.dataset}/deployment/approvers")
        return v

    def _deploy(self, ds: DatasetPolicy, actor: Actor, ctx: Mapping[str, Any], v: _Verdict) -> _Verdict:
        cap = ds.deployment.max_epsilon or (ds.privacy.epsilon_per_run if ds.privacy else None)
        eps = ctx.get("epsilon")
        if cap is not None:
            if eps is None:
                return v.deny("builtin/epsilon-required", "the model card states no epsilon")
            if float(eps) > cap:
                return v.deny(f"{ds.dataset}/deployment/max_epsilon", f"model epsilon {float(eps):g} exceeds the cap {cap:g}")
            v.allow(f"{ds.dataset}/deployment/max_epsilon")
        if ds.fairness is not None:
            finding = next(iter(judge_fairness(ds, ctx.get("fairness")).findings), None)
            if finding is not None:
                return v.deny(finding.rule_id, finding.message)
            v.allow(f"{ds.dataset}/fairness")
        approvals = ctx.get("approvals") or ()
        counted: set[str] = set()
        for a in approvals:
            if a.get("actor") == actor.name:
                continue  # separation of duties: nobody approves their own deployment
            a_roles = a.get("roles") or self.policies.roles_of(a.get("actor", ""))
            if any(r in ds.deployment.approvers for r in a_roles):
                counted.add(a["actor"])
        if len(counted) < ds.deployment.min_approvals:
            own = any(a.get("actor") == actor.name for a in approvals)
            extra = " (an approval by the deployer does not count)" if own else ""
            return v.deny(
                f"{ds.dataset}/deployment/approvals",
                f"{len(counted)} of {ds.deployment.min_approvals} required approval(s) by "
                f"{', '.join(ds.deployment.approvers)}{extra}",
            )
        v.allow(f"{ds.dataset}/deployment/approvals")
        return v

    # -- audit ----------------------------------------------------------------------
    def _audit(self, d: Decision, ctx: Mapping[str, Any]) -> None:
        details: dict[str, Any] = {"reasons": list(d.reasons), "roles": list(d.actor.roles)}
        for k in _AUDITABLE_CONTEXT:
            if k in ctx:
                val = ctx[k]
                details[k] = list(val) if isinstance(val, (list, tuple)) else val
        if d.obligations:
            details["masks"] = dict(d.obligations.get("masks") or {})
            if d.obligations.get("row_filter"):
                details["row_filter"] = d.obligations["row_filter"]
        self.audit.record(  # type: ignore[union-attr]
            "gate.decide",
            actor=d.actor.name,
            outcome="allow" if d.allowed else "deny",
            stage=d.stage.value,
            resource=str(d.resource),
            rule_ids=d.rule_ids,
            subject_token=ctx.get("subject_token"),
            details=details,
        )
        if not d.allowed:
            self.audit.flush()  # type: ignore[union-attr]  # a deny ends the stage: make it durable now


def check_access(
    ws: "Workspace",
    actor: Actor,
    stage: Stage | str,
    *,
    dataset: str | None = None,
    layer: str | None = None,
    model: str | None = None,
    purpose: str | None = None,
    columns: list[str] | tuple[str, ...] | None = None,
    epsilon: float | None = None,
    epsilon_spent: float | None = None,
) -> Decision:
    """Ask the gate whether ``actor`` may run ``stage`` (``lakewarden gate check``): the decision is
    audited, and a deny raises :class:`AccessDenied`.

    The resource is the model when one is named (with ``dataset`` as context), else the table
    ``layer.dataset``, else the dataset.
    """
    from governance.errors import UsageError

    if model:
        res = Resource.model(model)
    elif dataset and layer:
        res = Resource.table(dataset, layer)
    elif dataset:
        res = Resource.dataset(dataset)
    else:
        raise UsageError("name a dataset or a model to decide on")
    context: dict[str, Any] = {}
    if purpose:
        context["purpose"] = purpose
    if columns:
        context["columns"] = list(columns)
    if epsilon is not None:
        context["epsilon"] = epsilon
    if epsilon_spent is not None:
        context["epsilon_spent"] = epsilon_spent
    if model and dataset:
        context["dataset"] = dataset
    return ws.gate.enforce(stage, actor, res, context)
