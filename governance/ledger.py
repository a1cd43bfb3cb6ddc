"""The privacy ledger: differential-privacy budgets that compose across runs.

Opacus accounts for one training run; nothing in it remembers what earlier runs on the same
data spent. The ledger does: every private run on a dataset is recorded, and runs compose
by basic sequential composition (ε and δ add up) — a bound that holds whatever the
mechanisms were, so it never overstates what is left.

A run goes through three states, each an append to an append-only Delta table:

``reserved``  before training starts: the gate checks the run's target ε against what is
              left (``<dataset>/privacy/epsilon_total`` names the rule and says how much is
              left); a reservation counts as spent, so two runs started together cannot
              both pass on the same remaining budget (reservations are serialized by a lock).
``spent``     after training: the ε the accountant actually reports (≤ the target).
``released``  the run ended before it touched any data; its reservation stops counting.

A run may name the model **build** it belongs to (``reserve(..., model=, build=)``): one call of
``train_model`` — its first run and a mitigation retrain after a failed fairness verdict — or
one pipeline candidate. :meth:`PrivacyLedger.build_cost` sums a build's runs, so the model card
states what producing the model cost of the dataset's budget, not only the released run's ε.

**Private SQL queries** (``lakehouse.private_sql``) are runs too, with purpose ``query`` and
accountant ``opendp``: :meth:`PrivacyLedger.reserve_query` checks, under the same lock, the
dataset's ``epsilon_total`` (so queries and training compose in one budget), the policy's
``private_queries.epsilon_per_query`` and the analyst's own ``epsilon_per_analyst``
(``<dataset>/privacy/epsilon_per_analyst``: the runs the analyst reserved, whoever committed
them). A refusal is a gate decision (``gate.decide``, deny, the rule named) raised as
:class:`~governance.errors.AccessDenied` before the query touches data.

Example::

    ledger = PrivacyLedger(ws)
    res = ledger.reserve(actor, "customers", purpose="credit_scoring", epsilon=3.0, delta=1e-5)
    ... train with Opacus, target ε = 3 ...
    ledger.commit(res.run_id, epsilon=2.97)
    ledger.status("customers")   # spent, reserved, left
    ledger.build_cost(build)     # ε and δ of every run of one model build
"""

from __future__ import annotations

import contextlib
import re
import uuid

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from governance.errors import LakewardenError
from governance.errors import AccessDenied
from governance.gate import Actor, Decision, Resource
from governance.locks import file_lock
from governance.policy import Stage
from governance.workspace import Workspace

LEDGER_TABLE = "_privacy/ledger"
SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("epsilon", pa.float64(), nullable=False),
        pa.field("delta", pa.float64(), nullable=False),
        pa.field("purpose", pa.string()),
        pa.field("accountant", pa.string()),
        pa.field("actor", pa.string(), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        # The model build the run belongs to (added later: NULL in older ledgers and for runs of no build).
        pa.field("model", pa.string()),
        pa.field("build", pa.string()),
    ]
)
BUILD_RE = re.compile(r"^[0-9a-f]{32}$")


def new_build_id() -> str:
    """A fresh model build id (32 hex digits) to record with each of the build's runs."""
    return uuid.uuid4().hex


class LedgerError(LakewardenError):
    """A ledger operation is invalid (unknown run, wrong state, ε above the reservation)."""

    exit_code = 2


@dataclass(frozen=True)
class Reservation:
    run_id: str
    dataset: str
    epsilon: float
    delta: float
    decision: Any = None  # the gate's Decision that allowed it


@dataclass(frozen=True)
class LedgerRun:
    """One run of a build, in its latest state (``spent``, or ``reserved`` while it runs)."""

    run_id: str
    state: str
    epsilon: float
    delta: float


@dataclass(frozen=True)
class BuildCost:
    """What one model build spent of its dataset's budget: its runs composed (ε and δ add up).

    Released runs never touched data and are left out; a run still reserved counts at its
    reservation, as in :meth:`PrivacyLedger.status`.
    """

    build: str
    dataset: str | None
    model: str | None
    runs: tuple[LedgerRun, ...]

    @property
    def epsilon(self) -> float:
        return sum(r.epsilon for r in self.runs)

    @property
    def delta(self) -> float:
        return sum(r.delta for r in self.runs)


@dataclass(frozen=True)
class BudgetStatus:
    dataset: str
    epsilon_total: float
    delta_max: float
    epsilon_spent: float
    epsilon_reserved: float
    delta_spent: float
    runs: int

    @property
    def epsilon_left(self) -> float:
        return max(self.epsilon_total - self.epsilon_spent - self.epsilon_reserved, 0.0)


QUERY_PURPOSE = "query"  # the purpose recorded for a private SQL query's run


@dataclass(frozen=True)
class AnalystStatus:
    """What one analyst's private queries have spent of a dataset (reservations count, as in ``status``)."""

    dataset: str
    analyst: str
    epsilon_limit: float
    epsilon_spent: float
    queries: int
    delta_limit: float = 0.0
    delta_spent: float = 0.0

    @property
    def epsilon_left(self) -> float:
        return max(self.epsilon_limit - self.epsilon_spent, 0.0)

    @property
    def delta_left(self) -> float:
        return max(self.delta_limit - self.delta_spent, 0.0)


class PrivacyLedger:
    """Per-dataset privacy budgets, recorded in an append-only Delta table."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.uri = ws.config.table_uri(LEDGER_TABLE)
        self._lock_path = ws.config.workspace_dir / "privacy" / ".lock"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self._lock_path)

    def _rows(self) -> pa.Table:
        if not DeltaTable.is_deltatable(self.uri):
            return SCHEMA.empty_table()
        return DeltaTable(self.uri).to_pyarrow_table()

    def _append(self, row: dict[str, Any]) -> None:
        # schema_mode="merge": a ledger written before the build columns gains them (older rows read NULL).
        write_deltalake(self.uri, pa.Table.from_pylist([row], schema=SCHEMA), mode="append",
                        configuration={"delta.appendOnly": "true"}, schema_mode="merge")

    def _latest(self, rows: pa.Table) -> dict[str, dict[str, Any]]:
        """The latest state of every run."""
        latest: dict[str, dict[str, Any]] = {}
        for r in rows.sort_by("recorded_at").to_pylist():
            latest[r["run_id"]] = r
        return latest

    def status(self, dataset: str) -> BudgetStatus:
        pol = self.ws.policies.dataset(dataset)
        if pol.privacy is None:
            raise LedgerError(f"'{dataset}' declares no privacy budget")
        rows = self._rows()
        rows = rows.filter(pc.equal(rows["dataset"], dataset)) if rows.num_rows else rows
        spent = reserved = dspent = 0.0
        runs = 0
        for r in self._latest(rows).values():
            if r["state"] == "spent":
                spent += r["epsilon"]
                dspent += r["delta"]
                runs += 1
            elif r["state"] == "reserved":
                reserved += r["epsilon"]
                dspent += r["delta"]
                runs += 1
        return BudgetStatus(dataset, pol.privacy.epsilon_total, pol.privacy.delta, spent, reserved, dspent, runs)

    def analyst_status(self, dataset: str, analyst: str) -> AnalystStatus:
        """ε the analyst's private queries on ``dataset`` spent or hold reserved (released ones left out).

        A query run belongs to whoever reserved it (its first row), not to whoever committed it.
        """
        pol = self.ws.policies.dataset(dataset)
        if pol.privacy is None:
            raise LedgerError(f"'{dataset}' declares no privacy budget")
        limit = pol.private_queries.epsilon_per_analyst or pol.privacy.epsilon_total
        d_limit = pol.private_queries.delta_per_analyst or pol.privacy.delta
        rows = self._rows()
        rows = rows.filter(pc.equal(rows["dataset"], dataset)) if rows.num_rows else rows
        owner: dict[str, tuple[str, str | None]] = {}
        for r in rows.sort_by("recorded_at").to_pylist():
            owner.setdefault(r["run_id"], (r["actor"], r["purpose"]))
        spent, dspent, n = 0.0, 0.0, 0
        for run_id, r in self._latest(rows).items():
            who, purpose = owner[run_id]
            if who == analyst and purpose == QUERY_PURPOSE and r["state"] in ("spent", "reserved"):
                spent += r["epsilon"]
                dspent += r["delta"]
                n += 1
        return AnalystStatus(dataset, analyst, limit, spent, n, d_limit, dspent)

    def reserve_query(self, actor: Actor, dataset: str, *, epsilon: float, delta: float = 0.0,
                      layer: str = "silver", mechanism: str = "opendp") -> Reservation:
        """Reserve one private query's ε (and δ: a thresholded key release) on ``dataset``, or refuse it
        before it runs.

        Checked in this order, under the ledger's lock, each a rule the refusal names:
        ``<dataset>/privacy/epsilon_per_query`` (the policy's cap), ``<dataset>/privacy/delta_per_query``,
        ``<dataset>/privacy/epsilon_total`` (everything spent on the dataset, training included),
        ``<dataset>/privacy/epsilon_per_analyst`` and ``<dataset>/privacy/delta_per_analyst`` (this
        analyst's queries). The decision is audited as ``gate.decide`` (stage ``query``); an allowed one
        also as ``privacy.reserve``.

        Raises:
            LedgerError: ``epsilon`` is not positive, ``delta`` not in [0, 1), or the dataset has no
                privacy budget.
            AccessDenied: over a budget (the decision names the rule and what is left).
        """
        if not epsilon > 0:
            raise LedgerError(f"epsilon must be > 0 (got {epsilon!r})")
        if not 0 <= delta < 1:
            raise LedgerError(f"delta must be in [0, 1) (got {delta!r})")
        pol = self.ws.policies.dataset(dataset)
        if pol.privacy is None:
            raise LedgerError(f"'{dataset}' declares no privacy budget: private queries need privacy.epsilon_total")
        pq, total = pol.private_queries, pol.privacy.epsilon_total
        resource = Resource.table(dataset, layer)
        with self._locked():
            st = self.status(dataset)
            mine = self.analyst_status(dataset, actor.name)
            used = st.epsilon_spent + st.epsilon_reserved
            rule, reason = f"{dataset}/privacy/budget", "allowed"
            denied = True
            if epsilon > pq.epsilon_per_query + 1e-12:
                rule, reason = (f"{dataset}/privacy/epsilon_per_query",
                                f"a query may spend at most ε={pq.epsilon_per_query:g} of '{dataset}' "
                                f"(asked {epsilon:g})")
            elif delta > 0 and (pq.delta_per_query is None or delta > pq.delta_per_query * (1 + 1e-9)):
                cap = "none: its private queries release public group keys only (δ = 0)" \
                    if pq.delta_per_query is None else f"δ={pq.delta_per_query:g}"
                rule, reason = (f"{dataset}/privacy/delta_per_query",
                                f"a query may spend at most {cap} of '{dataset}' (asked δ={delta:g})")
            elif used + epsilon > total + 1e-12:
                rule, reason = (f"{dataset}/privacy/epsilon_total",
                                f"epsilon {epsilon:g} would exceed the total budget {total:g} of '{dataset}' "
                                f"({used:g} spent by queries and training, {max(total - used, 0.0):g} left)")
            elif mine.epsilon_spent + epsilon > mine.epsilon_limit + 1e-12:
                rule, reason = (f"{dataset}/privacy/epsilon_per_analyst",
                                f"epsilon {epsilon:g} would exceed {actor.name}'s budget {mine.epsilon_limit:g} on "
                                f"'{dataset}' ({mine.epsilon_spent:g} spent, {mine.epsilon_left:g} left)")
            elif delta > 0 and mine.delta_spent + delta > mine.delta_limit * (1 + 1e-9):
                rule, reason = (f"{dataset}/privacy/delta_per_analyst",
                                f"delta {delta:g} would exceed {actor.name}'s δ budget {mine.delta_limit:g} on "
                                f"'{dataset}' ({mine.delta_spent:g} spent, {mine.delta_left:g} left)")
            else:
                denied = False
            roles = actor.roles or self.ws.policies.roles_of(actor.name)
            decision = Decision(not denied, (reason,), (rule,), Stage.QUERY, Actor(actor.name, tuple(roles)), resource)
            self.ws.audit.record("gate.decide", actor=actor.name, outcome="deny" if denied else "allow",
                                 stage=Stage.QUERY.value, resource=str(resource), rule_ids=decision.rule_ids,
                                 details={"reasons": [reason], "roles": list(roles), "epsilon": epsilon, "delta": delta,
                                          "epsilon_spent": used, "purpose": QUERY_PURPOSE})
            if denied:
                self.ws.audit.flush()
                raise AccessDenied(decision)
            run_id = self._new_run(dataset, epsilon, delta, QUERY_PURPOSE, mechanism, actor.name)
        self.ws.audit.record("privacy.reserve", actor=actor.name, outcome="ok", stage=Stage.QUERY.value,
                             resource=f"dataset:{dataset}",
                             details={"run_id": run_id, "epsilon": epsilon, "delta": delta, "purpose": QUERY_PURPOSE})
        return Reservation(run_id, dataset, float(epsilon), float(delta), decision)

    def reserve(self, actor: Actor, dataset: str, *, purpose: str, epsilon: float, delta: float,
                accountant: str = "prv", columns: list[str] | None = None, model: str | None = None,
                build: str | None = None) -> Reservation:
        """Ask the gate (with what is already spent) and reserve the run's budget; raise AccessDenied if over.

        ``model`` and ``build`` (:func:`new_build_id`) link the run to the model build it belongs to.
        """
        if not epsilon > 0 or not 0 < delta < 1:
            raise LedgerError(f"epsilon must be > 0 and delta in (0, 1) (got {epsilon!r}, {delta!r})")
        if build is not None and (not isinstance(build, str) or not BUILD_RE.match(build)):
            raise LedgerError(f"a build id is 32 lowercase hex digits (new_build_id()), got {build!r}")
        with self._locked():
            st = self.status(dataset)
            decision = self.ws.gate.enforce(
                Stage.TRAIN, actor, Resource.dataset(dataset),
                {"purpose": purpose, "epsilon": epsilon, "delta": delta, "columns": columns or [],
                 "epsilon_spent": st.epsilon_spent + st.epsilon_reserved},
            )
            run_id = self._new_run(dataset, epsilon, delta, purpose, accountant, actor.name, model=model, build=build)
        self.ws.audit.record("privacy.reserve", actor=actor.name, outcome="ok", stage=Stage.TRAIN.value,
                             resource=f"dataset:{dataset}",
                             details={"run_id": run_id, "epsilon": epsilon, "delta": delta,
                                      **({"model": model, "build": build} if build else {})})
        return Reservation(run_id, dataset, float(epsilon), float(delta), decision)

    def _new_run(self, dataset: str, epsilon: float, delta: float, purpose: str, accountant: str, actor: str, *,
                 model: str | None = None, build: str | None = None) -> str:
        """Append a new run in state ``reserved`` (under the ledger's lock, held by the caller); its id."""
        run_id = uuid.uuid4().hex
        self._append({"run_id": run_id, "dataset": dataset, "state": "reserved", "epsilon": float(epsilon),
                      "delta": float(delta), "purpose": purpose, "accountant": accountant, "actor": actor,
                      "recorded_at": datetime.now(timezone.utc), "model": model, "build": build})
        return run_id

    def _transition(self, run_id: str, state: str, epsilon: float | None, actor: str) -> dict[str, Any]:
        with self._locked():
            latest = self._latest(self._rows())
            cur = latest.get(run_id)
            if cur is None:
                raise LedgerError(f"no privacy run {run_id}")
            if cur["state"] != "reserved":
                raise LedgerError(f"privacy run {run_id} is already {cur['state']}")
            eps = cur["epsilon"] if epsilon is None else float(epsilon)
            if eps > cur["epsilon"] + 1e-9:
                raise LedgerError(
                    f"run {run_id} spent ε={eps:g}, more than its reservation ε={cur['epsilon']:g}: the accountant's "
                    "target was not honoured"
                )
            row = {**cur, "state": state, "epsilon": eps if state == "spent" else cur["epsilon"], "actor": actor,
                   "recorded_at": datetime.now(timezone.utc)}
            self._append(row)
        self.ws.audit.record(f"privacy.{state}", actor=actor, outcome="ok", resource=f"dataset:{cur['dataset']}",
                             details={"run_id": run_id, "epsilon": row["epsilon"]})
        return row

    def commit(self, run_id: str, *, epsilon: float, actor: str = "lakewarden") -> None:
        """Record what the run actually spent (the accountant's ε, at most the reservation)."""
        self._transition(run_id, "spent", epsilon, actor)

    def release(self, run_id: str, *, actor: str = "lakewarden") -> None:
        """The run never touched data: its reservation stops counting."""
        self._transition(run_id, "released", None, actor)

    def build_cost(self, build: str) -> BuildCost:
        """Every run recorded with ``build`` (latest state each, released ones left out), oldest first.

        Raises:
            LedgerError: ``build`` is not a build id.
        """
        if not isinstance(build, str) or not BUILD_RE.match(build):
            raise LedgerError(f"a build id is 32 lowercase hex digits, got {build!r}")
        rows = self._rows()
        if "build" not in rows.column_names:  # a ledger written before builds were recorded
            return BuildCost(build, None, None, ())
        rows = rows.filter(pc.equal(rows["build"], build))
        first: dict[str, datetime] = {}
        for r in rows.sort_by("recorded_at").to_pylist():
            first.setdefault(r["run_id"], r["recorded_at"])
        latest = self._latest(rows)
        runs = [r for r in latest.values() if r["state"] in ("spent", "reserved")]
        runs.sort(key=lambda r: (first[r["run_id"]], r["run_id"]))
        any_row = next(iter(latest.values()), None)
        return BuildCost(
            build, any_row["dataset"] if any_row else None, any_row["model"] if any_row else None,
            tuple(LedgerRun(r["run_id"], r["state"], float(r["epsilon"]), float(r["delta"])) for r in runs),
        )


__all__ = ["PrivacyLedger", "Reservation", "AnalystStatus", "QUERY_PURPOSE",
           "BudgetStatus", "BuildCost", "LedgerRun", "LedgerError", "LEDGER_TABLE",
           "new_build_id"]
