"""The training stage end to end: gated training set, ledger, DP training, fairness, registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_project, open_copy

from governance.errors import AccessDenied
from governance.gate import Resource
from governance.ledger import PrivacyLedger
from governance.workspace import Workspace
from features.store import Features
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import build_silver
from lakehouse.synth import generate
from training.flow import train_model
from training.registry import ApprovalRefused, Registry
from training.trainer import TrainOptions

pytestmark = pytest.mark.filterwarnings("ignore")
FEATURES = ["customer_profile:income", "customer_profile:income_log", "customer_profile:birth_date",
            "customer_profile:region"]
OPTS = TrainOptions(epochs=2, target_epsilon=2.0, accountant="rdp", batch_size=256)


@pytest.fixture(scope="module")
def biased_silver(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """1500 customers (bias 0.9) ingested and built into silver once: the project folder, closed, and
    its KEK. The lakes below are copies of it."""
    root = tmp_path_factory.mktemp("biased")
    with pytest.MonkeyPatch.context() as mp:
        proj = make_project(root / "proj", mp)
        res = generate(root / "landing", people=1500, transactions_per_person=0, seed=21, bias=0.9)
        with Workspace.open(proj / "lakewarden.yaml") as ws:
            ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
            build_silver(ws, ws.actor("dana"), "customers")
        return proj, os.environ["LAKEWARDEN_KEK"]


@pytest.fixture
def lake(biased_silver: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """A lake of its own, for a test that trains, spends budget or ingests: a copy of ``biased_silver``,
    its feature views applied in the copy."""
    ws = open_copy(*biased_silver, tmp_path / "lake", monkeypatch)
    Features(ws).apply(ws.actor("pipeline"))
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def shared_lake(biased_silver: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """One lake for the tests that only read it (nothing trained, nothing reserved in the ledger)."""
    with pytest.MonkeyPatch.context() as mp:
        ws = open_copy(*biased_silver, tmp_path_factory.mktemp("shared") / "lake", mp)
        Features(ws).apply(ws.actor("pipeline"))
        yield ws
        ws.close()


def test_train_registers_a_private_model_with_its_card(lake: Workspace, monkeypatch: pytest.MonkeyPatch):
    import numpy as np

    import training.flow as tp

    seen = []
    real = tp._prepare
    monkeypatch.setattr(tp, "_prepare", lambda table, cols, y, *a: seen.append((table, y)) or real(table, cols, y, *a))
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=False)
    c = out.card
    # The demo's label as before it was declared (labels: {defaulted: {favourable: false}}): y = defaulted.
    (table, y), = seen
    assert np.array_equal(y, np.array(table["defaulted"].to_pylist(), dtype=np.float32))
    assert c.favourable_label.model_dump() == {"column": "defaulted", "favourable": False, "unfavourable": True,
                                               "positive": True}
    assert "defaulted (favourable: false; the score is the probability of true)" in c.to_markdown()
    assert str(out.ref) == "credit@1" and c.status == "registered"
    assert 0 < c.privacy.epsilon <= 2.0 + 1e-6 and c.privacy.delta == 1e-5 and c.privacy.accountant == "rdp"
    assert c.data_versions == {"silver.customers": Catalog(lake.config).open(TableRef("silver", "customers")).version()}
    assert {"accuracy", "auc"} <= set(c.utility)
    assert set(c.fairness.attributes) == {"sex", "ethnicity"}
    u = c.fairness.uncertainty  # bootstrap of the holdout: intervals and the verdict's pass rate
    assert u["resamples"] == 500 and 0.0 <= u["pass_rate"] <= 1.0 and set(u["intervals"]) == {"sex", "ethnicity"}
    assert "resamples): the verdict passes in" in c.to_markdown()
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


def test_sensitive_features_never_reach_a_credit_model(shared_lake: Workspace):
    with pytest.raises(AccessDenied, match="customers/purposes/credit_scoring/sensitive"):
        train_model(shared_lake, shared_lake.actor("sam"), name="credit",
                    features=[*FEATURES, "customer_sensitive:sex"], label="defaulted", purpose="credit_scoring",
                    options=OPTS)
    assert PrivacyLedger(shared_lake).status("customers").runs == 0


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


@pytest.mark.slow  # two training processes: 19-25 s here
def test_two_process_training_is_accounted_once(lake: Workspace):
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=False, world_size=2)
    assert len(out.runs) == 1 and out.card.privacy.epsilon <= 2.0 + 1e-6
    assert PrivacyLedger(lake).status("customers").runs == 1


def test_encoder_matrix_does_not_depend_on_stored_key_order(shared_lake: Workspace):
    """A stored encoder (JSON with sorted keys) must rebuild the very matrix the model was trained on."""
    import json

    import numpy as np

    from training.encode import Encoder

    ts = Features(shared_lake).training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=FEATURES,
                                            label="defaulted")
    cols = ["income_log", "region", "birth_date", "income"]  # deliberately not alphabetical
    enc = Encoder.fit(ts.table, cols)
    again = Encoder.from_dict(json.loads(json.dumps(enc.to_dict(), sort_keys=True)))
    reversed_ = Encoder({k: enc.numeric[k] for k in reversed(enc.numeric)}, enc.categorical)
    X = enc.transform(ts.table)
    assert np.array_equal(X, again.transform(ts.table)) and np.array_equal(X, reversed_.transform(ts.table))
    assert enc.columns[:3] == ["birth_date", "income", "income_log"]


def test_fit_evaluate_register_as_separate_stages(lake: Workspace, tmp_path: Path):
    """The DVC pipeline's training steps: the evaluation re-derives the same holdout and scores
    it exactly as the fit did; the registered card carries both."""
    import json

    from training.flow import StageError, evaluate_candidate, fit_candidate, register_candidate

    sam = lake.actor("sam")
    cand_dir = tmp_path / "candidate"
    cand = fit_candidate(lake, sam, cand_dir, name="credit", features=FEATURES, label="defaulted",
                         purpose="credit_scoring", options=OPTS, mitigation="reweighing")
    assert [p["epoch"] for p in cand["curve"]] == [1, 2] and cand["curve"][-1]["epsilon"] == pytest.approx(cand["privacy"]["epsilon"])
    assert "sub_" not in (cand_dir / "candidate.json").read_text()  # no token in what DVC caches
    fair = evaluate_candidate(lake, sam, cand_dir, tmp_path / "evaluation.json")
    assert fair["utility"] == pytest.approx(cand["utility"])  # same holdout, same matrix, same scores
    assert set(fair["metrics"]) == {"sex", "ethnicity"} and isinstance(fair["passed"], bool)
    ref = register_candidate(lake, sam, cand_dir, tmp_path / "evaluation.json")
    card = Registry(lake).card(ref)
    assert card.privacy.epsilon == pytest.approx(cand["privacy"]["epsilon"]) and card.fairness.passed == fair["passed"]
    assert card.fairness.uncertainty == fair["uncertainty"]
    assert card.mitigation["method"].startswith("reweighing")
    # Data changed under the candidate: evaluation refuses rather than scoring another holdout.
    res = generate(tmp_path / "more", people=20, transactions_per_person=0, seed=5)
    ingest(lake, lake.actor("dana"), "customers", [res.files["customers"]])
    build_silver(lake, lake.actor("dana"), "customers")
    with pytest.raises(StageError, match="rerun the train stage"):
        evaluate_candidate(lake, sam, cand_dir, tmp_path / "e2.json")
    assert json.loads((tmp_path / "evaluation.json").read_text())["passed"] == fair["passed"]
