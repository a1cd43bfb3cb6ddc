"""The training stage end to end: gated training set, ledger, DP training, fairness, registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from governance.errors import AccessDenied
from governance.gate import Resource
from governance.ledger import PrivacyLedger
from governance.workspace import Workspace
from features.store import Features
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import build_silver
from lakehouse.synth import generate
from training.pipeline import train_model
from training.registry import ApprovalRefused, Registry
from training.trainer import TrainOptions

pytestmark = pytest.mark.filterwarnings("ignore")
FEATURES = ["customer_profile:income", "customer_profile:income_log", "customer_profile:birth_date",
            "customer_profile:region"]
OPTS = TrainOptions(epochs=2, target_epsilon=2.0, accountant="rdp", batch_size=256)


@pytest.fixture
def lake(workspace: Workspace, tmp_path: Path) -> Workspace:
    res = generate(tmp_path / "landing", people=1500, transactions_per_person=0, seed=21, bias=0.9)
    ingest(workspace, workspace.actor("dana"), "customers", [res.files["customers"]])
    build_silver(workspace, workspace.actor("dana"), "customers")
    Features(workspace).apply(workspace.actor("pipeline"))
    return workspace


def test_train_registers_a_private_model_with_its_card(lake: Workspace):
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=False)
    c = out.card
    assert str(out.ref) == "credit@1" and c.status == "registered"
    assert 0 < c.privacy.epsilon <= 2.0 + 1e-6 and c.privacy.delta == 1e-5 and c.privacy.accountant == "rdp"
    assert c.data_versions == {"silver.customers": Catalog(lake.config).open(TableRef("silver", "customers")).version()}
    assert {"accuracy", "auc"} <= set(c.utility)
    assert set(c.fairness.attributes) == {"sex", "ethnicity"}
    assert c.lineage_run_ids and any(d.stage == "train" and d.allowed for d in c.gate_decisions)
    assert (Registry(lake).path(out.ref) / "model.pt").exists()
    Registry(lake).verify(out.ref)
    st = PrivacyLedger(lake).status("customers")
    assert st.runs == 1 and st.epsilon_spent == pytest.approx(c.privacy.epsilon)


def test_budget_exhaustion_is_refused_before_training(lake: Workspace):
    led = PrivacyLedger(lake)
    for _ in range(2):
        r = led.reserve(lake.actor("sam"), "customers", purpose="credit_scoring", epsilon=8.0, delta=1e-6)
        led.commit(r.run_id, epsilon=8.0)
    with pytest.raises(AccessDenied) as exc:
        train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                    purpose="credit_scoring", options=TrainOptions(epochs=1, target_epsilon=5.0, accountant="rdp"))
    assert exc.value.decision.rule_ids == ("customers/privacy/epsilon_total",)
    assert "4 left" in str(exc.value)
    assert led.status("customers").runs == 2  # nothing reserved for the refused run
    assert Registry(lake).list() == []


def test_sensitive_features_never_reach_a_credit_model(lake: Workspace):
    with pytest.raises(AccessDenied, match="customers/purposes/credit_scoring/sensitive"):
        train_model(lake, lake.actor("sam"), name="credit", features=[*FEATURES, "customer_sensitive:sex"],
                    label="defaulted", purpose="credit_scoring", options=OPTS)
    assert PrivacyLedger(lake).status("customers").runs == 0


def test_a_biased_model_fails_the_fairness_gate(lake: Workspace):
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=False)
    assert out.card.fairness.passed is False and out.card.fairness.failures
    with pytest.raises(ApprovalRefused):
        Registry(lake).approve(lake.actor("carla"), out.ref)
    d = lake.gate.decide("deploy", lake.actor("mel"), Resource.model("credit", 1), Registry(lake).deploy_context(out.ref))
    assert not d.allowed and d.rule_ids[0].startswith("customers/")


def test_mitigation_is_recorded_with_before_and_after(lake: Workspace):
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=True)
    m = out.card.mitigation
    assert m is not None and m["method"].startswith("reweighing")
    assert "report" in m and m["passed_before"] is False
    assert len(out.runs) == 2 and out.epsilon_spent <= 4.0 + 1e-6  # two private runs, both in the ledger
    assert PrivacyLedger(lake).status("customers").runs == 2


def test_two_process_training_is_accounted_once(lake: Workspace):
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=False, world_size=2)
    assert len(out.runs) == 1 and out.card.privacy.epsilon <= 2.0 + 1e-6
    assert PrivacyLedger(lake).status("customers").runs == 1
