"""Labels are declared, checked, never guessed.

A dataset of its own (not the demo's names: subject key ``applicant_ref``, a text label ``risk``
with values good/bad, a bool label ``approved`` whose favourable value is ``true``), written with
its policies into a temporary project. The policy declares each label and its favourable value;
training encodes y = 1 for the unfavourable value and refuses an undeclared label, a value outside
the declared pair or a missing value — before the privacy ledger is touched.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import open_copy

from governance.errors import PolicyError
from governance.ledger import PrivacyLedger
from governance.policy import load_policies
from governance.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]

LOANS = """\
kind: dataset
dataset: loans
description: Loan applications of a test lender (fictional).
subject_key: applicant_ref
columns:
  applicant_ref: {class: subject_key, type: string, required: true}
  gender:        {class: sensitive, type: string, protection: encrypt}
  salary:        {class: public, type: double}
  tenure_years:  {class: public, type: int}
  branch:        {class: public, type: string}
  risk:          {class: public, type: string}
  approved:      {class: public, type: bool}
purposes:
  lending: {description: Risk model inputs.}
  fairness_evaluation: {description: Fairness across groups., sensitive: true}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [lending]}
  data_scientist: {layers: [silver], purposes: [lending, fairness_evaluation]}
privacy: {epsilon_per_run: 5.0, epsilon_total: 50.0, delta: 1.0e-5}
fairness:
  sensitive_attributes: [gender]
  disparate_impact_min: 0.01
  equal_opportunity_max_diff: 1.0
  predictive_parity_max_diff: 1.0
labels:
  risk: {favourable: good, unfavourable: bad}
  approved: {favourable: true}
features:
  applicant:
    columns: [salary, tenure_years, branch]
"""
CONFIG = """\
version: 1
name: labels
storage: {root: .lakewarden/tables}
keys:
  store: .lakewarden/keys/keystore.db
  kek: {provider: env, var: LAKEWARDEN_KEK}
policies: [policies/*.yaml]
"""
FEATURES = ["applicant:salary", "applicant:tenure_years", "applicant:branch"]
HEADER = ["applicant_ref", "gender", "salary", "tenure_years", "branch", "risk", "approved"]
N = 400


def rows(n: int = N, *, odd: dict[int, str] | None = None) -> list[dict[str, str]]:
    """Applicants whose risk depends on salary; ``odd`` sets the risk of some rows to other text ('' is empty)."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        salary = float(rng.lognormal(10.5, 0.5))
        bad = rng.random() < 1 / (1 + math.exp((salary - 36000) / 8000))
        out.append({
            "applicant_ref": f"APP{i:06d}", "gender": "fm"[i % 2], "salary": f"{salary:.2f}",
            "tenure_years": str(int(rng.integers(0, 30))), "branch": ["harbour", "hill", "market"][i % 3],
            "risk": (odd or {}).get(i, "bad" if bad else "good"), "approved": "false" if bad else "true",
        })
    return out


def make_project(root: Path, monkeypatch: pytest.MonkeyPatch, loans: str = LOANS) -> Path:
    from governance.keys import generate_kek_b64

    (root / "policies").mkdir(parents=True)
    shutil.copy(REPO / "policies" / "roles.yaml", root / "policies" / "roles.yaml")
    (root / "policies" / "loans.yaml").write_text(loans)
    (root / "lakewarden.yaml").write_text(CONFIG)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    monkeypatch.delenv("LAKEWARDEN_CONFIG", raising=False)
    monkeypatch.delenv("LAKEWARDEN_USER", raising=False)
    return root


def build_lake(root: Path, data: list[dict[str, str]], *, features: bool = True) -> Workspace:
    from features.store import Features
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver

    ws = Workspace.open(root / "lakewarden.yaml")
    landing = root / "landing"
    landing.mkdir(exist_ok=True)
    path = landing / "loans.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=HEADER)
        w.writeheader()
        w.writerows(data)
    ingest(ws, ws.actor("dana"), "loans", [path])
    build_silver(ws, ws.actor("dana"), "loans")
    if features:
        Features(ws).apply(ws.actor("pipeline"))
    return ws


@pytest.fixture(scope="module")
def loans_silver(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The loans data ingested and built into silver once (the project folder, closed, and its KEK):
    ``lake`` copies it for each test."""
    with pytest.MonkeyPatch.context() as mp:
        root = make_project(tmp_path_factory.mktemp("loans") / "proj", mp)
        build_lake(root, rows(), features=False).close()
        return root, os.environ["LAKEWARDEN_KEK"]


@pytest.fixture
def lake(loans_silver: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A lake of its own for each test (they train, spend and register): a copy of ``loans_silver``,
    its feature views applied in the copy."""
    from features.store import Features

    ws = open_copy(*loans_silver, tmp_path / "proj", monkeypatch)
    Features(ws).apply(ws.actor("pipeline"))
    yield ws
    ws.close()


def opts():
    from training.trainer import TrainOptions

    return TrainOptions(epochs=2, target_epsilon=2.0, accountant="rdp", batch_size=64)


def spy_labels(monkeypatch: pytest.MonkeyPatch, module) -> list[tuple[list, np.ndarray]]:
    """Record what ``_prepare`` gets: the training set's label column and the encoded y."""
    seen: list[tuple[list, np.ndarray]] = []
    real = module._prepare

    def wrapper(table, cols, y_all, holdout, seed):
        seen.append((table, np.asarray(y_all).copy()))
        return real(table, cols, y_all, holdout, seed)

    monkeypatch.setattr(module, "_prepare", wrapper)
    return seen


def ledger_state(ws: Workspace) -> tuple[int, float]:
    st = PrivacyLedger(ws).status("loans")
    return st.runs, st.epsilon_spent


# -- the policy declares labels ------------------------------------------------------------------
def policy_error(tmp_path: Path, text: str) -> PolicyError:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    shutil.copy(REPO / "policies" / "roles.yaml", d / "roles.yaml")
    (d / "loans.yaml").write_text(text)
    with pytest.raises(PolicyError) as ei:
        load_policies(sorted(d.glob("*.yaml")))
    err = ei.value
    assert err.path == str(d / "loans.yaml") and "Traceback" not in str(err)
    return err


def line_of(text: str, start: str) -> int:
    hits = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start)]
    assert len(hits) == 1, hits
    return hits[0]


def with_labels(block: str) -> str:
    old = "labels:\n  risk: {favourable: good, unfavourable: bad}\n  approved: {favourable: true}\n"
    assert LOANS.count(old) == 1
    return LOANS.replace(old, "labels:\n" + block)


def test_declared_labels_load_and_a_bool_label_implies_its_other_value(tmp_path: Path):
    d = tmp_path / "policies"
    d.mkdir()
    shutil.copy(REPO / "policies" / "roles.yaml", d / "roles.yaml")
    (d / "loans.yaml").write_text(LOANS)
    ps = load_policies(sorted(d.glob("*.yaml")))
    labels = ps.dataset("loans").labels
    assert (labels["risk"].favourable, labels["risk"].unfavourable) == ("good", "bad")
    assert labels["approved"].favourable is True and labels["approved"].unfavourable is False
    assert ps.source("loans") == str(d / "loans.yaml")
    demo = load_policies(sorted((REPO / "policies").glob("*.yaml"))).dataset("customers").labels["defaulted"]
    assert demo.favourable is False and demo.unfavourable is True  # defaulted = false is favourable, as before


@pytest.mark.parametrize("block, field, words", [
    ("  nope: {favourable: a, unfavourable: b}\n", "labels.nope", ["unknown column 'nope'"]),
    ("  gender: {favourable: f, unfavourable: m}\n", "labels.gender", ["sensitive column", "public"]),
    ("  applicant_ref: {favourable: a, unfavourable: b}\n", "labels.applicant_ref",
     ["subject_key column"]),
    ("  salary: {favourable: 1, unfavourable: 0}\n", "labels.salary", ["double column", "bool, string or int"]),
    ("  risk: {favourable: good}\n", "labels.risk", ["needs its counterpart", "unfavourable"]),
    ("  risk: {favourable: no, unfavourable: yes}\n", "labels.risk.favourable", ["string column", "quote"]),
    ("  approved: {favourable: 'yes'}\n", "labels.approved", ["counterpart"]),
    ("  approved: {favourable: true, unfavourable: 'no'}\n", "labels.approved", ["one type", "quote"]),
    ("  risk: {favourable: good, unfavourable: good}\n", "labels.risk", ["two distinct values"]),
    ("  risk: {favourable: 1.5, unfavourable: good}\n", "labels.risk.favourable", ["true/false, a whole number or text"]),
    ("  risk: {favorable: good, unfavourable: bad}\n", "labels.risk.favourable",
     ["required field is missing", "labels.risk.favorable: unknown field"]),
])
def test_a_bad_label_declaration_names_file_field_and_line(tmp_path: Path, block, field, words):
    text = with_labels(block)
    err = policy_error(tmp_path, text)
    assert (err.field, err.line) == (field, line_of(text, block.rstrip("\n"))), str(err)
    for w in words:
        assert w in err.problem, err.problem


def test_declared_values_must_be_among_the_columns_allowed_values(tmp_path: Path):
    text = with_labels("  risk: {favourable: good, unfavourable: poor}\n").replace(
        "  risk:          {class: public, type: string}", "  risk:          {class: public, type: string, allowed: [good, bad]}")
    err = policy_error(tmp_path, text)
    assert err.field == "labels.risk.unfavourable" and "allowed does not list" in err.problem


# -- training maps the declared values -----------------------------------------------------------
def test_a_text_label_trains_with_the_declared_mapping(lake: Workspace, monkeypatch: pytest.MonkeyPatch):
    import training.flow as tp
    from training.registry import Registry

    seen = spy_labels(monkeypatch, tp)
    out = tp.train_model(lake, lake.actor("sam"), name="risk_model", features=FEATURES, label="risk",
                         purpose="lending", options=opts(), mitigate=False)
    (table, y), = seen
    risk = table["risk"].to_pylist()
    assert set(risk) == {"good", "bad"} and y.sum() == risk.count("bad") == sum(r["risk"] == "bad" for r in rows())
    assert np.array_equal(y, np.array([v == "bad" for v in risk], dtype=np.float32))  # 1 = unfavourable, row by row
    c = out.card
    assert math.isfinite(c.utility["auc"]) and 0.0 <= c.utility["auc"] <= 1.0
    assert c.favourable_label.model_dump() == {"column": "risk", "favourable": "good", "unfavourable": "bad",
                                               "positive": "bad"}
    assert c.fairness is not None and set(c.fairness.attributes) == {"gender"}
    assert "risk (favourable: 'good'; the score is the probability of 'bad')" in c.to_markdown()
    assert Registry(lake).card(out.ref).favourable_label == c.favourable_label  # stored and read back
    assert ledger_state(lake)[0] == 1


def test_a_bool_label_whose_favourable_value_is_true(lake: Workspace, monkeypatch: pytest.MonkeyPatch):
    import training.flow as tp

    seen = spy_labels(monkeypatch, tp)
    out = tp.train_model(lake, lake.actor("sam"), name="approval", features=FEATURES, label="approved",
                         purpose="lending", options=opts(), mitigate=False)
    (table, y), = seen
    approved = table["approved"].to_pylist()
    assert y.sum() == approved.count(False) and np.array_equal(y, np.array([not v for v in approved], np.float32))
    assert out.card.favourable_label.model_dump() == {"column": "approved", "favourable": True, "unfavourable": False,
                                                      "positive": False}
    assert math.isfinite(out.card.utility["auc"])


def test_fairness_selects_the_declared_favourable_outcome(lake: Workspace, monkeypatch: pytest.MonkeyPatch):
    """The fairness metrics count a predicted 0 — the encoded favourable value — as "selected"."""
    import training.flow as tp

    calls = []
    real = tp.fairness_metrics

    def spy(y_true, y_pred, groups, *, pos_label=1, **kw):
        calls.append(pos_label)
        return real(y_true, y_pred, groups, pos_label=pos_label, **kw)

    monkeypatch.setattr(tp, "fairness_metrics", spy)
    tp.train_model(lake, lake.actor("sam"), name="risk_model", features=FEATURES, label="risk", purpose="lending",
                   options=opts(), mitigate=False)
    assert calls == [0]


def test_separate_stages_carry_the_declaration_to_the_evaluation_and_the_card(lake: Workspace, tmp_path: Path):
    import json

    from training.registry import Registry
    from training.flow import evaluate_candidate, fit_candidate, register_candidate

    sam = lake.actor("sam")
    cand = fit_candidate(lake, sam, tmp_path / "cand", name="risk_model", features=FEATURES, label="risk",
                         purpose="lending", options=opts())
    want = {"column": "risk", "favourable": "good", "unfavourable": "bad", "positive": "bad"}
    assert cand["favourable_label"] == want and "favourable_label" not in cand["preprocessing"]
    fair = evaluate_candidate(lake, sam, tmp_path / "cand", tmp_path / "evaluation.json")
    assert fair["favourable_label"] == want and json.loads((tmp_path / "evaluation.json").read_text())["favourable_label"] == want
    assert fair["utility"] == pytest.approx(cand["utility"])
    ref = register_candidate(lake, sam, tmp_path / "cand", tmp_path / "evaluation.json")
    assert Registry(lake).card(ref).favourable_label.model_dump() == want


# -- refusals, before the ledger is touched ------------------------------------------------------
@pytest.fixture(scope="module")
def odd_lake(tmp_path_factory: pytest.TempPathFactory):
    """The loans data with 'unknown' in 7 rows and no risk at all in 3.

    One lake for the module: every test using it is refused before anything is written, and checks
    that the ledger and the registry are still empty (a test that trains or spends must not use it).
    """
    odd = {**{i: "unknown" for i in range(0, 70, 10)}, **{i: "" for i in range(5, 35, 10)}}
    with pytest.MonkeyPatch.context() as mp:
        ws = build_lake(make_project(tmp_path_factory.mktemp("odd") / "proj", mp), rows(odd=odd))
        yield ws
        ws.close()


@pytest.mark.parametrize("how", ["train_model", "fit_candidate"])
def test_values_outside_the_declaration_are_refused_before_any_budget(odd_lake: Workspace, tmp_path: Path, how: str):
    from training.labels import LabelError
    from training.flow import train_model
    from training.registry import Registry
    from training.flow import fit_candidate

    before = ledger_state(odd_lake)
    with pytest.raises(LabelError) as ei:
        if how == "train_model":
            train_model(odd_lake, odd_lake.actor("sam"), name="risk_model", features=FEATURES, label="risk",
                        purpose="lending", options=opts())
        else:
            fit_candidate(odd_lake, odd_lake.actor("sam"), tmp_path / "cand", name="risk_model", features=FEATURES,
                          label="risk", purpose="lending", options=opts())
    e = ei.value
    assert e.exit_code == 2
    assert "label 'risk'" in e.message and "10 row(s) outside its declared values" in e.message
    assert "'unknown' (7 rows)" in e.message and "null (3 rows)" in e.message
    assert "labels: {risk: {favourable: good, unfavourable: bad}}" in e.hint and "loans.yaml" in e.hint
    assert "APP0" not in str(e)  # no subject key, no other column's value
    assert ledger_state(odd_lake) == before == (0, 0.0)  # nothing reserved, nothing spent
    assert Registry(odd_lake).list() == [] and not (tmp_path / "cand").exists()


def test_an_undeclared_label_is_refused_with_the_yaml_to_add(lake: Workspace):
    from training.labels import LabelError
    from training.flow import train_model
    from training.registry import Registry

    with pytest.raises(LabelError) as ei:
        train_model(lake, lake.actor("sam"), name="branch_model", features=FEATURES[:2], label="branch",
                    purpose="lending", options=opts())
    e = ei.value
    assert e.exit_code == 2 and "label 'branch' is not declared in" in e.message and "never guessed" in e.message
    assert "'harbour' (134 rows)" in e.message and "'market' (133 rows)" in e.message
    assert "labels: {branch: {favourable: F, unfavourable: U}}" in e.hint and "exactly two values" in e.hint
    with pytest.raises(LabelError, match="'gender' cannot be a label of dataset 'loans': it is a sensitive column"):
        train_model(lake, lake.actor("sam"), name="m", features=FEATURES, label="gender", purpose="lending",
                    options=opts())
    assert ledger_state(lake) == (0, 0.0) and Registry(lake).list() == []


def test_the_cli_refuses_with_exit_2_and_no_traceback(odd_lake: Workspace):
    from cli_helpers import lw_in

    # in this process: the refusal is the command's; exit codes through the installed entry point
    # are tests/test_cli.py's
    root = odd_lake.config.base_dir
    p = lw_in(root, "train", "--name", "risk_model", "--features", ",".join(FEATURES), "--label", "risk",
              "--purpose", "lending", "--epsilon", "1", "--epochs", "1", user="sam",
              env={"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]})
    assert p.returncode == 2, p.stdout + p.stderr
    err = " ".join(p.stderr.split())
    assert "label 'risk'" in err and "'unknown' (7 rows)" in err and "null (3 rows)" in err
    assert "labels: {risk: {favourable: good, unfavourable: bad}}" in err
    assert ledger_state(odd_lake) == (0, 0.0)
