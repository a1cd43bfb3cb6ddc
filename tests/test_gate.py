"""The policy gate: allow and deny with exact rule ids, obligations, and auditing of every decision."""

from __future__ import annotations

import pytest

from governance.errors import AccessDenied
from governance.gate import Actor, Gate, Resource
from governance.policy import Stage

FAIR_OK = {
    "sex": {"disparate_impact": 0.91, "equal_opportunity_diff": 0.03, "predictive_parity_diff": 0.02},
    "ethnicity": {"disparate_impact": 0.85, "equal_opportunity_diff": -0.05, "predictive_parity_diff": 0.04},
}
APPROVED = [{"actor": "carla"}]
DS = Resource.dataset("customers")

# (stage, user, resource, context) -> (allowed, rule ids). A known-answer table: any change in
# how policy is read shows up here as a diff.
CASES = [
    ("query", "ana", Resource.table("customers", "silver"), {},
     (True, ("roles/analyst/stages/query", "customers/access/analyst", "customers/access/analyst/masks",
             "customers/access/analyst/row_filter"))),
    ("query", "ana", Resource.table("customers", "bronze"), {},
     (False, ("customers/access/analyst/layers",))),
    ("query", "ana", Resource.table("customers", "silver"), {"columns": ["income", "email"]},
     (False, ("customers/access/analyst/columns",))),
    ("ingest", "ana", DS, {}, (False, ("roles/stages/ingest",))),
    ("ingest", "dana", DS, {}, (True, ("roles/data_engineer/stages/ingest", "customers/access/data_engineer"))),
    ("ingest", "dana", Resource.dataset("payroll"), {}, (False, ("builtin/unknown-dataset",))),
    ("ingest", "mallory", DS, {}, (False, ("roles/stages/ingest",))),
    ("features", "sam", DS, {"columns": ["income"]}, (False, ("builtin/purpose-required",))),
    ("features", "sam", DS, {"purpose": "marketing"}, (False, ("customers/purposes",))),
    ("features", "mel", DS, {"purpose": "fairness_evaluation"}, (False, ("customers/access/ml_engineer/purposes",))),
    ("features", "sam", DS, {"purpose": "credit_scoring", "columns": ["income", "sex"]},
     (False, ("customers/purposes/credit_scoring/sensitive",))),
    ("features", "sam", DS, {"purpose": "credit_scoring", "columns": ["income", "email"]},
     (False, ("customers/columns/email/direct_identifier",))),
    ("features", "sam", DS, {"purpose": "fairness_evaluation", "columns": ["income", "sex"]},
     (True, ("roles/data_scientist/stages/features", "customers/access/data_scientist",
             "customers/purposes/fairness_evaluation"))),
    ("train", "sam", DS, {"purpose": "credit_scoring", "epsilon": 3.0},
     (True, ("roles/data_scientist/stages/train", "customers/access/data_scientist",
             "customers/purposes/credit_scoring", "customers/privacy/budget"))),
    ("train", "sam", DS, {"purpose": "credit_scoring", "epsilon": 9.0}, (False, ("customers/privacy/epsilon_per_run",))),
    ("train", "sam", DS, {"purpose": "credit_scoring", "epsilon": 3.0, "epsilon_spent": 18.5},
     (False, ("customers/privacy/epsilon_total",))),
    ("train", "sam", DS, {"purpose": "credit_scoring", "epsilon": 3.0, "delta": 1e-3}, (False, ("customers/privacy/delta",))),
    ("train", "sam", DS, {"purpose": "credit_scoring"}, (False, ("builtin/epsilon-required",))),
    ("audit", "ana", Resource.system("audit"), {}, (False, ("roles/stages/audit",))),
    ("audit", "carla", Resource.system("audit"), {},
     (True, ("roles/compliance_officer/stages/audit", "builtin/audit-table"))),
    ("approve", "carla", Resource.model("credit", 1), {"dataset": "customers"},
     (True, ("roles/compliance_officer/stages/approve", "customers/deployment/approvers"))),
    ("approve", "sam", Resource.model("credit", 1), {"dataset": "customers"}, (False, ("roles/stages/approve",))),
    ("deploy", "mel", Resource.model("credit", 1),
     {"dataset": "customers", "epsilon": 3.0, "fairness": FAIR_OK, "approvals": APPROVED},
     (True, ("roles/ml_engineer/stages/deploy", "customers/access/ml_engineer", "customers/deployment/max_epsilon",
             "customers/fairness", "customers/deployment/approvals"))),
    ("deploy", "mel", Resource.model("credit", 1), {"epsilon": 3.0}, (False, ("builtin/dataset-required",))),
    ("deploy", "mel", Resource.model("credit", 1),
     {"dataset": "customers", "epsilon": 3.0, "fairness": FAIR_OK, "approvals": []},
     (False, ("customers/deployment/approvals",))),
    ("deploy", "mel", Resource.model("credit", 1),
     {"dataset": "customers", "epsilon": 12.0, "fairness": FAIR_OK, "approvals": APPROVED},
     (False, ("customers/deployment/max_epsilon",))),
    ("deploy", "mel", Resource.model("credit", 1),
     {"dataset": "customers", "epsilon": 3.0, "approvals": APPROVED,
      "fairness": {**FAIR_OK, "sex": {**FAIR_OK["sex"], "disparate_impact": 0.6}}},
     (False, ("customers/fairness/disparate_impact",))),
    ("deploy", "mel", Resource.model("credit", 1),
     {"dataset": "customers", "epsilon": 3.0, "approvals": APPROVED,
      "fairness": {**FAIR_OK, "ethnicity": {**FAIR_OK["ethnicity"], "equal_opportunity_diff": -0.2}}},
     (False, ("customers/fairness/equal_opportunity",))),
    ("deploy", "mel", Resource.model("credit", 1),
     {"dataset": "customers", "epsilon": 3.0, "approvals": APPROVED, "fairness": {"sex": FAIR_OK["sex"]}},
     (False, ("customers/fairness/ethnicity",))),
]


@pytest.fixture
def gate(workspace):
    return workspace.gate


@pytest.mark.parametrize("stage,user,resource,ctx,expected", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_known_answers(gate: Gate, workspace, stage, user, resource, ctx, expected):
    d = gate.decide(stage, workspace.actor(user), resource, ctx)
    assert (d.allowed, d.rule_ids) == expected, d.reasons
    assert d.reasons and all(r for r in d.reasons)


def test_query_obligations_carry_masks_filter_and_columns(gate: Gate, workspace):
    d = gate.decide("query", workspace.actor("ana"), Resource.table("customers"), {})
    assert d.obligations["columns"] == ["customer_id", "birth_date", "zip_code", "income", "region", "defaulted"]
    assert d.obligations["masks"] == {"customer_id": "hash", "income": "bucket:10000"}
    assert d.obligations["row_filter"] == "region <> 'restricted'"


def test_identifiers_and_sensitive_columns_are_masked_by_default(gate: Gate, workspace):
    d = gate.decide("query", workspace.actor("sam"), Resource.table("customers"), {})
    masks = d.obligations["masks"]
    assert masks["name"] == masks["email"] == masks["phone"] == "redact"
    assert masks["sex"] == masks["ethnicity"] == "null"
    assert "income" not in masks


def test_deny_reason_is_readable_and_says_what_is_left(gate: Gate, workspace):
    d = gate.decide("train", workspace.actor("sam"), DS, {"purpose": "credit_scoring", "epsilon": 3.0, "epsilon_spent": 18.5})
    assert d.reasons == ("epsilon 3 would exceed the total budget 20 of 'customers' (18.5 spent, 1.5 left)",)


def test_enforce_raises_access_denied_naming_the_rule(gate: Gate, workspace):
    with pytest.raises(AccessDenied) as exc:
        gate.enforce(Stage.FEATURES, workspace.actor("sam"), DS, {"purpose": "credit_scoring", "columns": ["sex"]})
    assert exc.value.exit_code == 3
    assert str(exc.value) == (
        "denied by policy rule customers/purposes/credit_scoring/sensitive: column 'sex' is sensitive and "
        "purpose 'credit_scoring' does not allow sensitive attributes"
    )
    assert exc.value.decision.allowed is False


def test_separation_of_duties_an_own_approval_does_not_count(gate: Gate):
    boss = Actor("boss", ("ml_engineer", "compliance_officer"))
    d = gate.decide(
        "deploy", boss, Resource.model("credit", 1),
        {"dataset": "customers", "epsilon": 3.0, "fairness": FAIR_OK, "approvals": [{"actor": "boss"}]},
    )
    assert not d.allowed
    assert d.rule_ids == ("customers/deployment/approvals",)
    assert "an approval by the deployer does not count" in d.reasons[0]


def test_explicit_roles_override_principals(gate: Gate):
    d = gate.decide("audit", Actor("ana", ("compliance_officer",)), Resource.system("audit"))
    assert d.allowed


def test_every_decision_is_audited_and_denies_are_flushed_at_once(workspace):
    gate, audit = workspace.gate, workspace.audit
    gate.decide("query", workspace.actor("ana"), Resource.table("customers"), {"columns": ["income"]})
    assert audit.pending == 1
    gate.decide("train", workspace.actor("sam"), DS, {"purpose": "credit_scoring", "epsilon": 50})
    assert audit.pending == 0  # a deny ends a stage: it is durable before the stage exits
    events = audit.query(action="gate.decide").to_pylist()
    assert [(e["actor"], e["stage"], e["outcome"]) for e in events] == [("ana", "query", "allow"), ("sam", "train", "deny")]
    assert events[1]["rule_ids"] == "customers/privacy/epsilon_per_run"
    assert events[1]["resource"] == "dataset:customers"
    assert '"epsilon":50' in events[1]["details"]
    assert '"masks":{"customer_id":"hash","income":"bucket:10000"}' in events[0]["details"]
    assert audit.verify().ok


def test_decision_context_keeps_only_policy_vocabulary(workspace):
    token = workspace.keyring.token_for("alice@example.com")
    workspace.gate.decide(
        "query", workspace.actor("ana"), Resource.table("customers"),
        {"subject_token": token, "note": "alice@example.com", "columns": ["income"]},
    )
    workspace.audit.flush()
    row = workspace.audit.query().to_pylist()[-1]
    assert row["subject_token"] == token
    assert "alice" not in row["details"] and "note" not in row["details"]


def test_gate_decision_is_deterministic(gate: Gate, workspace):
    args = ("features", workspace.actor("sam"), DS, {"purpose": "fairness_evaluation", "columns": ["sex"]})
    assert gate.decide(*args) == gate.decide(*args)


def test_a_role_restricted_to_some_columns_may_not_use_others_for_any_purpose(project):
    """The column list that hides a column from a role's queries also keeps it out of its
    features and training (rule: <dataset>/access/<role>/columns)."""
    import yaml

    from governance.workspace import Workspace

    path = project / "policies" / "customers.yaml"
    pol = yaml.safe_load(path.read_text())
    pol["access"]["data_scientist"]["columns"] = ["customer_id", "birth_date", "region", "defaulted"]
    path.write_text(yaml.safe_dump(pol, sort_keys=False))
    with Workspace.open(project / "lakewarden.yaml") as ws:
        sam = ws.actor("sam")
        d = ws.gate.decide("features", sam, DS, {"purpose": "credit_scoring", "columns": ["income", "region"]})
        assert (d.allowed, d.rule_ids) == (False, ("customers/access/data_scientist/columns",))
        assert "income" in d.reasons[0] and "region" not in d.reasons[0].split("(")[0]
        d = ws.gate.decide("train", sam, DS, {"purpose": "credit_scoring", "columns": ["income"], "epsilon": 1.0})
        assert not d.allowed and d.rule_ids == ("customers/access/data_scientist/columns",)
        assert ws.gate.decide("features", sam, DS, {"purpose": "credit_scoring", "columns": ["region"]}).allowed


# -- a hot path's repeated decisions: the first audited in full, the rest counted ----------------
class _Events:
    """An audit sink that keeps what it is given (the real log is checked in test_features)."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.flushes = 0

    def record(self, action, **kw):
        self.events.append({"action": action, **kw})
        return len(self.events)

    def flush(self):
        self.flushes += 1


class _Clock:
    def __init__(self) -> None:
        import datetime as dt

        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        import datetime as dt

        self.now += dt.timedelta(seconds=seconds)


SERVE_CTX = {"purpose": "credit_scoring", "columns": ["income", "region"]}


def test_repeated_allows_are_one_full_decision_and_a_count(workspace):
    sink, clock = _Events(), _Clock()
    gate = Gate(workspace.policies, audit=sink, repeat_window=2.0, clock=clock)
    mel = workspace.actor("mel")
    first = gate.enforce_repeated(Stage.SERVE, mel, DS, SERVE_CTX, tally={"entities": 1})
    for i in range(5):
        clock.advance(0.3)
        again = gate.enforce_repeated(Stage.SERVE, mel, DS, dict(SERVE_CTX), tally={"entities": 2})
        assert again == first and again.allowed
    (full,) = sink.events
    assert full["action"] == "gate.decide" and full["outcome"] == "allow"
    run = full["details"]["run"]
    assert full["details"]["purpose"] == "credit_scoring" and full["rule_ids"] == first.rule_ids
    # the window passes: the run is closed with its count, and a new one starts with a full decision
    clock.advance(1.0)
    gate.enforce_repeated(Stage.SERVE, mel, DS, SERVE_CTX, tally={"entities": 1})
    repeat, full2 = sink.events[1:]
    assert repeat["action"] == "gate.decide.repeat" and repeat["outcome"] == "allow"
    assert repeat["details"]["run"] == run and repeat["details"]["repeats"] == 5
    assert repeat["details"]["tally"] == {"entities": 1 + 5 * 2}
    assert repeat["details"]["first"] == "2026-01-01T00:00:00+00:00"
    assert repeat["details"]["last"] == "2026-01-01T00:00:01.500000+00:00"
    assert repeat["rule_ids"] == first.rule_ids and repeat["details"]["columns"] == ["income", "region"]
    assert full2["action"] == "gate.decide" and full2["details"]["run"] != run
    gate.close()  # the new run has no repeats: nothing to add
    assert len(sink.events) == 3
    gate.enforce_repeated(Stage.SERVE, mel, DS, SERVE_CTX)
    gate.enforce_repeated(Stage.SERVE, mel, DS, SERVE_CTX)
    gate.close()
    assert sink.events[-1]["action"] == "gate.decide.repeat" and sink.events[-1]["details"]["repeats"] == 1


def test_other_questions_are_other_runs_and_denies_are_never_coalesced(workspace):
    sink = _Events()
    gate = Gate(workspace.policies, audit=sink, repeat_window=60, clock=_Clock())
    mel, sam = workspace.actor("mel"), workspace.actor("sam")
    gate.enforce_repeated(Stage.SERVE, mel, DS, SERVE_CTX)
    gate.enforce_repeated(Stage.SERVE, mel, DS, {"purpose": "credit_scoring", "columns": ["income"]})
    assert [e["action"] for e in sink.events] == ["gate.decide", "gate.decide"]
    for _ in range(3):  # a role without serve: each deny evaluated, audited and flushed
        with pytest.raises(AccessDenied):
            gate.enforce_repeated(Stage.SERVE, sam, DS, SERVE_CTX)
    denies = [e for e in sink.events if e["outcome"] == "deny"]
    assert len(denies) == 3 and sink.flushes >= 3
    sensitive = {"purpose": "credit_scoring", "columns": ["sex"]}
    for _ in range(2):
        with pytest.raises(AccessDenied, match="sensitive"):
            gate.enforce_repeated(Stage.SERVE, mel, DS, sensitive)
    assert len([e for e in sink.events if e["outcome"] == "deny"]) == 5


def test_a_zero_window_audits_every_decision(workspace):
    sink = _Events()
    gate = Gate(workspace.policies, audit=sink, repeat_window=0, clock=_Clock())
    for _ in range(4):
        gate.enforce_repeated(Stage.SERVE, workspace.actor("mel"), DS, SERVE_CTX)
    gate.close()
    assert [e["action"] for e in sink.events] == ["gate.decide"] * 4


def test_a_context_that_is_not_plain_data_is_decided_every_time(workspace):
    sink = _Events()
    gate = Gate(workspace.policies, audit=sink, repeat_window=60, clock=_Clock())
    ctx = {"purpose": "credit_scoring", "columns": ["income"], "approvals": [{"actor": "carla"}]}
    for _ in range(3):
        gate.enforce_repeated(Stage.SERVE, workspace.actor("mel"), DS, ctx)
    assert len(sink.events) == 3 and all("run" not in e["details"] for e in sink.events)
