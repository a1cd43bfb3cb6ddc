"""What a model cost: the card states the released run's (ε, δ) and every private run of its build
(a failed first run and its mitigation retrain, or one pipeline candidate), summed from the ledger."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from governance.ledger import PrivacyLedger
from governance.workspace import Workspace
from training.flow import train_model
from training.registry import Registry

# The same biased lake as test_training_pipeline (bias 0.9: the first run fails the fairness gate, so
# mitigate retrains), its fixture and options shared rather than copied.
from test_training_pipeline import FEATURES, OPTS, biased_silver, lake  # noqa: E402,F401 - pytest fixtures

pytestmark = pytest.mark.filterwarnings("ignore")


def _ledger(ws: Workspace, build: str) -> dict[str, dict]:
    """The ledger's rows of one build, read from its Delta table: the latest row per run."""
    t = DeltaTable(PrivacyLedger(ws).uri).to_pyarrow_table()
    t = t.filter(pc.equal(t["build"], build)).sort_by("recorded_at")
    return {r["run_id"]: r for r in t.to_pylist()}


def test_a_mitigation_retrain_is_in_the_cost_and_a_plain_run_costs_itself(lake: Workspace):
    out = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=OPTS, mitigate=True)
    card = Registry(lake).verify(out.ref)
    assert card.mitigation["passed_before"] is False and len(out.runs) == 2  # failed fairness, retrained
    rows = _ledger(lake, out.build)
    assert list(rows) == out.runs and all(r["state"] == "spent" and r["model"] == "credit" for r in rows.values())
    cost = card.privacy.cost
    # the released model's own guarantee: the retrain's ε as the ledger recorded it
    assert cost.released_run == out.runs[-1] and card.privacy.epsilon == rows[out.runs[-1]]["epsilon"]
    # what producing it cost: every run of the build
    assert cost.build == out.build and [r.run for r in cost.runs] == out.runs
    assert cost.epsilon == pytest.approx(sum(r["epsilon"] for r in rows.values())) == pytest.approx(out.epsilon_spent)
    assert cost.delta == pytest.approx(sum(r["delta"] for r in rows.values()))
    assert cost.epsilon > card.privacy.epsilon
    assert json.loads((Registry(lake).path(out.ref) / "card.json").read_text())["privacy"]["cost"]["epsilon"] == \
        pytest.approx(cost.epsilon)
    assert f"Producing it cost ε={cost.epsilon:g}" in card.to_markdown()
    from cli_helpers import lw_in

    shown = lw_in(lake.config.base_dir, "models", "show", str(out.ref), user="carla",
                  env={"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"], "COLUMNS": "300"})
    assert shown.returncode == 0, shown.stderr
    assert f"ε={card.privacy.epsilon:g}, δ=1e-05)-differentially private" in shown.stdout
    assert f"Producing it cost ε={cost.epsilon:g}, δ={cost.delta:g}" in shown.stdout and "not released" in shown.stdout
    # the next build on the same dataset: one run, its own cost only
    plain = train_model(lake, lake.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                        purpose="credit_scoring", options=OPTS, mitigate=False)
    c2 = plain.card.privacy
    (only,) = _ledger(lake, plain.build).values()
    assert plain.build != out.build and [r.run for r in c2.cost.runs] == plain.runs == [only["run_id"]]
    assert c2.cost.epsilon == c2.epsilon == only["epsilon"] and c2.cost.released_run == only["run_id"]
    assert PrivacyLedger(lake).status("customers").epsilon_spent == pytest.approx(cost.epsilon + c2.epsilon)


def test_a_pipeline_candidate_is_one_build(lake: Workspace, tmp_path: Path):
    from training.flow import evaluate_candidate, fit_candidate, register_candidate

    sam = lake.actor("sam")
    cand = fit_candidate(lake, sam, tmp_path / "c", name="credit", features=FEATURES, label="defaulted",
                         purpose="credit_scoring", options=OPTS, mitigation="reweighing")
    evaluate_candidate(lake, sam, tmp_path / "c", tmp_path / "evaluation.json")
    card = Registry(lake).card(register_candidate(lake, sam, tmp_path / "c", tmp_path / "evaluation.json"))
    (row,) = _ledger(lake, cand["privacy"]["build"]).values()
    assert card.privacy.cost.released_run == row["run_id"] == cand["privacy"]["ledger_run"]
    assert card.privacy.epsilon == card.privacy.cost.epsilon == row["epsilon"] == cand["cost"]["epsilon"]
