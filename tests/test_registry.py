"""The model registry: versions, cards, integrity, approval and the deploy gate's context."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from deltalake import DeltaTable

from governance.errors import AccessDenied
from governance.gate import Resource
from governance.workspace import Workspace
from training.registry import (
    REGISTRY_TABLE,
    ApprovalRefused,
    ArtifactTampered,
    ModelCard,
    ModelNotFound,
    ModelRef,
    Registry,
    RegistryError,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
TRAIN_RUN = str(uuid.UUID(int=7))
FAIR = {  # within the customers policy: disparate impact >= 0.8, |diffs| <= 0.1
    "sex": {"disparate_impact": 0.93, "equal_opportunity_diff": 0.04, "predictive_parity_diff": -0.03},
    "ethnicity": {"disparate_impact": 0.88, "equal_opportunity_diff": -0.06, "predictive_parity_diff": 0.05},
}
EPS_SENTENCE = (
    "(ε=3, δ=1e-05)-differentially private with respect to one subject's rows in customers (accountant prv)"
)


def _clock():
    t = [T0]

    def now() -> datetime:
        t[0] += timedelta(seconds=1)
        return t[0]

    return now


def _fields(**over: Any) -> dict[str, Any]:
    f: dict[str, Any] = {
        "purpose": "credit_scoring",
        "features": ["customer_profile:income", "customer_profile:income_z", "customer_profile:region"],
        "label": "defaulted",
        "data_versions": {"silver.customers": 7},
        "privacy": {
            "epsilon": 3.0, "delta": 1e-5, "accountant": "prv", "target_epsilon": 3.0,
            "noise_multiplier": 1.1, "max_grad_norm": 1.0, "epochs": 5, "sample_rate": 0.01,
        },
        "utility": {"accuracy": 0.81, "auc": 0.86},
        "fairness": dict(FAIR),
        "lineage_run_ids": [TRAIN_RUN],
        "preprocessing": {"income": {"impute": "median", "mean": 52000.0, "std": 18000.0}},
    }
    f.update(over)
    return f


def _register(reg: Registry, ws: Workspace, weights: bytes = b"weights-v1", **over: Any) -> ModelRef:
    return reg.register(
        ws.actor("sam"), name="credit", dataset="customers",
        files={"model.pt": weights, "preprocess.json": b'{"income": [52000.0, 18000.0]}'},
        card_fields=_fields(**over),
    )


@pytest.fixture
def reg(workspace: Workspace) -> Registry:
    return Registry(workspace, clock=_clock())


def _rows(ws: Workspace) -> list[dict[str, Any]]:
    return DeltaTable(ws.config.table_uri(REGISTRY_TABLE)).to_pyarrow_table().sort_by("at").to_pylist()


def test_register_two_versions_then_list_card_and_latest(workspace: Workspace, reg: Registry):
    r1 = _register(reg, workspace, b"weights-v1")
    r2 = _register(reg, workspace, b"weights-v2")
    assert (r1, r2) == (ModelRef("credit", 1), ModelRef("credit", 2))
    assert (str(r1), ModelRef.parse("credit@2")) == ("credit@1", r2)

    assert [c.ref for c in reg.list()] == [r1, r2] == [c.ref for c in reg.list("credit")]
    assert reg.list("other") == []
    assert reg.card("credit").version == 2  # latest
    assert reg.card("credit", 1).version == 1 == reg.card(r1).version == reg.card("credit@1").version
    with pytest.raises(ModelNotFound, match=r"no model named 'nope' in the registry \(known: credit\)"):
        reg.card("nope")
    with pytest.raises(ModelNotFound, match=r"model 'credit' has no version 7 \(versions: 1, 2\)"):
        reg.card("credit", 7)

    card = reg.card(r1)
    folder = reg.path(r1)
    assert folder == workspace.config.workspace_dir / "models" / "credit" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "card.md", "model.pt", "preprocess.json"]
    assert (folder / "model.pt").read_bytes() == b"weights-v1"
    assert card.artifact_sha256["model.pt"] == hashlib.sha256(b"weights-v1").hexdigest()
    assert card.status == "registered" and card.created_by == "sam" and card.created_at == T0 + timedelta(seconds=1)
    assert card.dataset == "customers" and card.data_versions == {"silver.customers": 7}
    assert card.fairness is not None and card.fairness.passed is True and card.fairness.failures == []
    assert card.fairness.thresholds == {
        "disparate_impact_min": 0.8, "equal_opportunity_max_diff": 0.1, "predictive_parity_max_diff": 0.1,
    }
    assert card.lineage_run_ids[0] == TRAIN_RUN and len(card.lineage_run_ids) == 2
    assert [(g.stage, g.rule_ids, g.allowed) for g in card.gate_decisions] == [
        ("register", ["roles/data_scientist/stages/register", "customers/access/data_scientist"], True)
    ]

    text = (folder / "card.json").read_text()
    assert text == card.to_json() == json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    assert ModelCard.from_json(text) == card

    md = (folder / "card.md").read_text()
    assert md.startswith("# Model card: credit@1 — registered\n")
    assert f"This model is {EPS_SENTENCE}." in md
    assert "| attribute | disparate impact | equal opportunity diff | predictive parity diff | result |" in md
    assert "| sex | 0.93 (pass) | 0.04 (pass) | -0.03 (pass) | pass |" in md
    assert "| accuracy | 0.81 |" in md and "| silver.customers | 7 |" in md
    assert TRAIN_RUN in md and "None yet." in md  # lineage, approvals

    workspace.audit.flush()
    events = workspace.audit.query(action="registry.register").to_pylist()
    assert [(e["actor"], e["resource"]) for e in events] == [("sam", "model:credit@1"), ("sam", "model:credit@2")]


def test_verify_passes_then_finds_tampering(reg: Registry, workspace: Workspace):
    ref = _register(reg, workspace)
    assert reg.verify(ref).ref == ref
    folder = reg.path(ref)

    (folder / "model.pt").write_bytes(b"weights-evil")
    with pytest.raises(ArtifactTampered, match=r"credit@1 failed verification: model\.pt changed") as exc:
        reg.verify(ref)
    assert exc.value.problems == ["model.pt changed (sha256 differs from the card)"]
    with pytest.raises(ArtifactTampered):
        reg.deploy_context(ref)  # deploying verifies first
    (folder / "model.pt").write_bytes(b"weights-v1")
    reg.verify(ref)

    (folder / "extra.pkl").write_bytes(b"x")
    with pytest.raises(ArtifactTampered, match=r"extra\.pkl is not part of the registered model"):
        reg.verify(ref)
    (folder / "extra.pkl").unlink()

    md = (folder / "card.md").read_text()
    (folder / "card.md").write_text(md.replace("registered", "approved"))
    with pytest.raises(ArtifactTampered, match=r"card\.md differs from card\.json"):
        reg.verify(ref)
    (folder / "card.md").write_text(md)

    # An approval added by hand to card.json never reaches the deploy gate.
    forged = json.loads((folder / "card.json").read_text())
    forged["approvals"] = [{"actor": "carla", "role": "compliance_officer", "at": "2025-03-01T13:00:00Z"}]
    (folder / "card.json").write_text(json.dumps(forged, sort_keys=True, indent=2) + "\n")
    with pytest.raises(ArtifactTampered, match=r"card\.json differs from the registry table"):
        reg.card(ref)


def test_registry_table_is_append_only_with_one_row_per_event(reg: Registry, workspace: Workspace):
    r1 = _register(reg, workspace)
    _register(reg, workspace)
    reg.approve(workspace.actor("carla"), r1)
    rows = _rows(workspace)
    assert [(r["name"], r["version"], r["status"], r["actor"]) for r in rows] == [
        ("credit", 1, "registered", "sam"), ("credit", 2, "registered", "sam"), ("credit", 1, "approved", "carla"),
    ]
    assert set(rows[0]) == {"name", "version", "dataset", "status", "actor", "at", "card_sha256"}
    assert rows[2]["card_sha256"] == hashlib.sha256((reg.path(r1) / "card.json").read_bytes()).hexdigest()
    dt = DeltaTable(workspace.config.table_uri(REGISTRY_TABLE))
    assert dt.metadata().configuration.get("delta.appendOnly") == "true"
    with pytest.raises(Exception, match="(?i)append"):
        dt.delete("version = 1")
    assert len(_rows(workspace)) == 3


def test_analyst_cannot_register_and_nothing_is_written(reg: Registry, workspace: Workspace):
    with pytest.raises(AccessDenied, match="roles/stages/register") as exc:
        reg.register(workspace.actor("ana"), name="credit", dataset="customers",
                     files={"model.pt": b"w"}, card_fields=_fields())
    assert exc.value.decision.rule_ids == ("roles/stages/register",)
    assert not (workspace.config.workspace_dir / "models" / "credit").exists()
    assert not DeltaTable.is_deltatable(workspace.config.table_uri(REGISTRY_TABLE))


def test_approval_by_compliance_is_recorded_and_others_are_denied(reg: Registry, workspace: Workspace):
    ref = _register(reg, workspace)
    with pytest.raises(AccessDenied, match="roles/stages/approve") as exc:
        reg.approve(workspace.actor("sam"), ref)
    assert exc.value.decision.rule_ids == ("roles/stages/approve",)
    with pytest.raises(AccessDenied, match="roles/stages/approve"):
        reg.approve(workspace.actor("mel"), ref)

    card = reg.approve(workspace.actor("carla"), ref)
    assert card.status == "approved"
    assert [(a.actor, a.role, a.override_reason) for a in card.approvals] == [("carla", "compliance_officer", None)]
    assert reg.card(ref) == card
    assert card.gate_decisions[-1].stage == "approve" and "customers/deployment/approvers" in card.gate_decisions[-1].rule_ids
    md = (reg.path(ref) / "card.md").read_text()
    assert md.startswith("# Model card: credit@1 — approved\n")
    assert "| carla | compliance_officer |" in md
    reg.verify(ref)
    with pytest.raises(RegistryError, match="carla has already approved credit@1"):
        reg.approve(workspace.actor("carla"), ref)
    workspace.audit.flush()
    assert [e["actor"] for e in workspace.audit.query(action="registry.approve").to_pylist()] == ["carla"]


def test_fairness_failed_card_needs_an_override_reason(reg: Registry, workspace: Workspace):
    unfair = {**FAIR, "sex": {**FAIR["sex"], "disparate_impact": 0.7}}
    # A card may not claim a pass its own metrics contradict.
    with pytest.raises(ValueError, match=r"fairness says passed, but .*disparate impact on 'sex' is 0\.700 < 0\.8"):
        _register(reg, workspace, fairness={**unfair, "passed": True, "failures": []})

    ref = _register(reg, workspace, fairness=unfair)  # no verdict: judged by the policy's thresholds
    card = reg.card(ref)
    assert card.fairness is not None and card.fairness.passed is False
    assert card.fairness.failures == ["disparate impact on 'sex' is 0.700 < 0.8"]
    assert "| sex | 0.7 (FAIL) | 0.04 (pass) | -0.03 (pass) | FAIL |" in (reg.path(ref) / "card.md").read_text()

    carla = workspace.actor("carla")
    with pytest.raises(ApprovalRefused, match=r"credit@1 failed its fairness evaluation: disparate impact on 'sex'") as exc:
        reg.approve(carla, ref)
    assert exc.value.failures == card.fairness.failures
    assert reg.card(ref).status == "registered" and len(_rows(workspace)) == 1
    with pytest.raises(ValueError, match="override_reason must be a sentence"):
        reg.approve(carla, ref, override_reason="  ")

    reason = "Pilot on 1% of traffic while the mitigated model is retrained (ticket FAIR-12)."
    card = reg.approve(carla, ref, override_reason=reason)
    assert card.status == "approved" and card.approvals[0].override_reason == reason
    assert reason in (reg.path(ref) / "card.md").read_text()
    workspace.audit.flush()
    outcomes = [(e["outcome"], json.loads(e["details"]).get("override_reason"))
                for e in workspace.audit.query(action="registry.approve").to_pylist()]
    assert outcomes == [("refused", None), ("ok", reason)]
    # The deploy gate still holds the policy's line.
    d = workspace.gate.decide("deploy", workspace.actor("mel"), Resource.model("credit", 1), reg.deploy_context(ref))
    assert not d.allowed and d.rule_ids == ("customers/fairness/disparate_impact",)


@pytest.mark.parametrize(
    "fairness",
    [
        FAIR,
        {**FAIR, "sex": {**FAIR["sex"], "disparate_impact": 0.79}},
        {**FAIR, "ethnicity": {**FAIR["ethnicity"], "equal_opportunity_diff": -0.2, "predictive_parity_diff": 0.3}},
        {"sex": FAIR["sex"]},  # no metrics for ethnicity
        {**FAIR, "sex": {"disparate_impact": 0.9, "predictive_parity_diff": 0.0}},  # a metric missing
        {**FAIR, "sex": {**FAIR["sex"], "disparate_impact": 0.8, "equal_opportunity_diff": -0.1}},  # the limits
    ],
    ids=["pass", "disparate-impact", "ethnicity-two-rules", "no-ethnicity", "metric-missing", "limits-pass"],
)
def test_gate_trainer_and_registry_give_one_verdict(reg: Registry, workspace: Workspace, fairness):
    from training.fairness import check_fairness

    pol = workspace.policies.dataset("customers")
    trainer = check_fairness(fairness, pol)
    ref = _register(reg, workspace, fairness=dict(fairness))  # judged by the registry at registration
    card = reg.card(ref)
    d = workspace.gate.decide("deploy", workspace.actor("mel"), Resource.model("credit", ref.version),
                              {**reg.deploy_context(ref), "approvals": [{"actor": "carla"}]})
    assert card.fairness.passed is trainer.passed is d.allowed
    assert card.fairness.failures == trainer.failures
    if trainer.passed:
        assert "customers/fairness" in d.rule_ids
    else:
        assert d.rule_ids == trainer.rule_ids[:1] and d.reasons == (trainer.failures[0],)
        assert all(r.startswith("customers/fairness") for r in trainer.rule_ids)


def test_deploy_context_feeds_the_gate_denied_before_approval_allowed_after(reg: Registry, workspace: Workspace):
    ref = _register(reg, workspace)
    ctx = reg.deploy_context(ref)
    assert ctx == {"dataset": "customers", "epsilon": 3.0, "fairness": FAIR, "approvals": []}
    mel = workspace.actor("mel")
    resource = Resource.model(ref.name, ref.version)
    d = workspace.gate.decide("deploy", mel, resource, ctx)
    assert not d.allowed and d.rule_ids == ("customers/deployment/approvals",)

    reg.approve(workspace.actor("carla"), ref)
    ctx = reg.deploy_context(ref)
    assert ctx["approvals"] == [{"actor": "carla"}]
    d = workspace.gate.decide("deploy", mel, resource, ctx)
    assert d.allowed and d.rule_ids == (
        "roles/ml_engineer/stages/deploy", "customers/access/ml_engineer", "customers/deployment/max_epsilon",
        "customers/fairness", "customers/deployment/approvals",
    )

    with pytest.raises(ValueError, match="allowed deploy decision"):
        reg.mark_deployed(mel, ref, "kserve/credit", decision=workspace.gate.decide("deploy", workspace.actor("ana"), resource, ctx))
    card = reg.mark_deployed(mel, ref, "kserve/credit", decision=d)
    assert card.status == "deployed" and [(x.actor, x.target) for x in card.deployments] == [("mel", "kserve/credit")]
    assert card.gate_decisions[-1].stage == "deploy"
    assert [r["status"] for r in _rows(workspace)] == ["registered", "approved", "deployed"]
    assert reg.list()[0].status == "deployed"
    assert "## Deployments" in (reg.path(ref) / "card.md").read_text()
    reg.verify(ref)


def test_personal_data_in_a_card_is_refused_naming_the_field(reg: Registry, workspace: Workspace):
    with pytest.raises(ValueError, match=r"card field 'mitigation\.note' looks like personal data \(email\)") as exc:
        _register(reg, workspace, mitigation={"method": "reweighing", "note": "ask jane.doe@example.com"})
    assert "jane.doe" not in str(exc.value)  # never echoed
    with pytest.raises(ValueError, match=r"card field 'label' looks like personal data \(phone\)"):
        _register(reg, workspace, label="call +1 415 555 0100")
    with pytest.raises(ValueError, match=r"an artifact file name looks like personal data \(ssn\)"):
        reg.register(workspace.actor("sam"), name="credit", dataset="customers",
                     files={"123-45-6789.bin": b"w"}, card_fields=_fields())
    assert not (workspace.config.workspace_dir / "models" / "credit").exists()


@pytest.mark.parametrize("name", ["../credit", "Credit", "a/b", "", "credit model", "1credit"])
def test_bad_model_names_are_refused(reg: Registry, workspace: Workspace, name: str):
    with pytest.raises(ValueError, match="must be lower_snake_case"):
        reg.register(workspace.actor("sam"), name=name, dataset="customers", files={"m.pt": b"w"}, card_fields=_fields())
    with pytest.raises(ValueError, match="must be lower_snake_case"):
        ModelRef(name, 1)


@pytest.mark.parametrize("fn", ["../evil.pt", "a/b.pt", "..", "dir\\m.pt", ".hidden", "card.json", "CARD.md", "m..pt"])
def test_file_names_with_paths_or_reserved_names_are_refused(reg: Registry, workspace: Workspace, fn: str):
    with pytest.raises(ValueError, match="artifact file name"):
        reg.register(workspace.actor("sam"), name="credit", dataset="customers", files={fn: b"w"}, card_fields=_fields())
    assert not (workspace.config.workspace_dir / "models" / "credit").exists()


def test_bad_inputs_are_refused(reg: Registry, workspace: Workspace):
    sam = workspace.actor("sam")
    with pytest.raises(ValueError, match="dataset name '../customers'"):
        reg.register(sam, name="credit", dataset="../customers", files={"m.pt": b"w"}, card_fields=_fields())
    with pytest.raises(ValueError, match="card field\\(s\\) status, version are set by the registry"):
        _register(reg, workspace, status="deployed", version=9)
    with pytest.raises(ValueError, match="colour: Extra inputs are not permitted"):
        _register(reg, workspace, colour="blue")
    with pytest.raises(ValueError, match="purpose 'marketing' is not declared by dataset 'customers'"):
        _register(reg, workspace, purpose="marketing")
    with pytest.raises(ValueError, match=r"privacy\.epsilon: Input should be greater than 0"):
        _register(reg, workspace, privacy={"epsilon": 0, "delta": 1e-5, "accountant": "prv"})
    with pytest.raises(ValueError, match="features are 'view:feature'"):
        _register(reg, workspace, features=["income"])
    with pytest.raises(ValueError, match="a model reference looks like name@version"):
        ModelRef.parse("credit")
    with pytest.raises(ValueError, match="model version must be an int >= 1"):
        ModelRef("credit", 0)


def test_lineage_links_the_training_data_to_each_model_version(reg: Registry, workspace: Workspace):
    r1 = _register(reg, workspace)
    _register(reg, workspace, data_versions={"silver.customers": 8})
    graph = workspace.lineage.upstream("model:credit")
    assert graph.nodes["model:credit"].versions == frozenset({1, 2})
    assert graph.nodes["model:credit"].kind == "model"
    assert graph.nodes["silver.customers"].versions == frozenset({7, 8})
    one = workspace.lineage.upstream("model:credit", version=1)
    assert one.nodes["silver.customers"].versions == frozenset({7})
    runs = [e["run_id"] for e in workspace.lineage.events(job="register.credit")]
    assert runs[0] == reg.card(r1).lineage_run_ids[-1]


def test_files_can_be_copied_from_paths(reg: Registry, workspace: Workspace, tmp_path):
    src = tmp_path / "model.pt"
    src.write_bytes(b"\x00" * 3_000_000)
    ref = reg.register(workspace.actor("mel"), name="scorer", dataset="customers",
                       files={"model.pt": src}, card_fields=_fields())
    card = reg.verify(ref)
    assert card.artifact_sha256["model.pt"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert card.gate_decisions[0].rule_ids == ["roles/ml_engineer/stages/register", "customers/access/ml_engineer"]


# -- what the model cost: the build's runs, from the privacy ledger ------------------------------------
def _build(ws: Workspace, *eps: float) -> tuple[str, list[str]]:
    """A build with one committed ledger run per ε (each reserved at ε, δ = 1e-5)."""
    from governance.ledger import PrivacyLedger, new_build_id

    led, build, runs = PrivacyLedger(ws), new_build_id(), []
    for e in eps:
        r = led.reserve(ws.actor("sam"), "customers", purpose="credit_scoring", epsilon=e, delta=1e-5,
                        model="credit", build=build)
        led.commit(r.run_id, epsilon=e)
        runs.append(r.run_id)
    return build, runs


def _priv(eps: float, **cost: Any) -> dict[str, Any]:
    return {**_fields()["privacy"], "epsilon": eps, "cost": cost}


def test_card_states_the_released_guarantee_and_what_the_build_cost(reg: Registry, workspace: Workspace):
    build, (first, second) = _build(workspace, 3.0, 2.5)
    ref = _register(reg, workspace, privacy=_priv(2.5, build=build, released_run=second))
    card = reg.verify(ref)
    assert card.privacy.epsilon == 2.5 and card.privacy.delta == 1e-5  # the released model's own guarantee
    cost = card.privacy.cost
    assert cost.epsilon == pytest.approx(5.5) and cost.delta == pytest.approx(2e-5) and cost.build == build
    assert [(r.run, r.epsilon) for r in cost.runs] == [(first, 3.0), (second, 2.5)] and cost.released_run == second
    data = json.loads((reg.path(ref) / "card.json").read_text())
    assert data["privacy"]["epsilon"] == 2.5 and data["privacy"]["cost"]["epsilon"] == pytest.approx(5.5)
    md = card.to_markdown()
    assert f"Producing it cost ε=5.5, δ=2e-05 of the privacy budget of customers: 2 private runs of build `{build}`" in md
    assert f"| `{first}` | 3 | 1e-05 | not released |" in md and f"| `{second}` | 2.5 | 1e-05 | released |" in md
    from training.compliance import summarize

    s = summarize(card)
    assert (s.epsilon, s.epsilon_spent, s.runs) == (2.5, pytest.approx(5.5), 2)
    # a build of one run costs what the run did
    build1, (only,) = _build(workspace, 3.0)
    one = reg.card(_register(reg, workspace, privacy=_priv(3.0, build=build1, released_run=only)))
    assert one.privacy.cost.epsilon == one.privacy.epsilon == 3.0 and len(one.privacy.cost.runs) == 1


def test_a_cost_the_ledger_does_not_back_is_refused(reg: Registry, workspace: Workspace):
    from governance.ledger import new_build_id

    build, (first, second) = _build(workspace, 3.0, 2.5)
    with pytest.raises(ValueError, match="has no runs in the privacy ledger"):
        _register(reg, workspace, privacy=_priv(2.5, build=new_build_id(), released_run=second))
    with pytest.raises(ValueError, match="is not a run of build"):
        _register(reg, workspace, privacy=_priv(2.5, build=build, released_run="0" * 32))
    with pytest.raises(ValueError, match="not what the ledger recorded for the released run"):
        _register(reg, workspace, privacy=_priv(3.0, build=build, released_run=second))
    with pytest.raises(ValueError, match="its runs, ε and δ come from the privacy ledger"):
        _register(reg, workspace, privacy=_priv(2.5, build=build, released_run=second, epsilon=2.5))
    with pytest.raises(ValueError, match="must be a build id"):
        _register(reg, workspace, privacy=_priv(2.5, build="credit-1", released_run=second))
    assert reg.list() == []


def test_a_card_without_a_cost_loads_as_unknown_and_keeps_its_bytes(reg: Registry, workspace: Workspace):
    """Cards registered before builds were recorded: no ``cost`` in their JSON. They load (cost
    None: unknown, never 0), say so, keep their JSON bytes, and their old card.md still verifies."""
    ref = _register(reg, workspace)
    folder = reg.path(ref)
    text = (folder / "card.json").read_text()
    assert "cost" not in json.loads(text)["privacy"]
    card = reg.verify(ref)
    assert card.privacy.cost is None and card.to_json() == text  # same bytes: digests and manifests hold
    assert "of the privacy budget of customers: unknown" in card.to_markdown()
    (folder / "card.md").write_text(card.to_markdown(legacy=True))  # rendered before costs were stated
    assert "unknown" not in (folder / "card.md").read_text()
    reg.verify(ref)
    from training.compliance import summarize

    assert summarize(card).epsilon_spent is None
    (folder / "card.md").write_text(card.to_markdown(legacy=True).replace("ε=3", "ε=1"))
    with pytest.raises(ArtifactTampered, match="card.md differs"):
        reg.verify(ref)
