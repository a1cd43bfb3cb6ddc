"""A failure is said as a failure: one line, the traceback in a file, never a gate refusal it was not.

The faults are injected (a stage or a library call replaced by one that raises), so each path is
exercised on purpose; the real gate's refusals at deploy are covered by tests/test_pipeline_dvc.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from governance.errors import AccessDenied
from governance.gate import Actor, Decision, Resource
from governance.policy import Stage

REPO = Path(__file__).resolve().parents[1]
CARD = "4111 1111 1111 1111"  # a test card number: it must not reach the screen or the crash file


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_an_unexpected_error_is_one_line_and_its_traceback_a_file(project: Path, monkeypatch, capsys):
    import governance.setup
    from lakewarden.cli import main

    def broken(*a, **k):
        raise RuntimeError(f"the disk said {CARD}")

    monkeypatch.setattr(governance.setup, "init_workspace", broken)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(project / "lakewarden.yaml"), "init", str(project)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert len(_lines(err)) == 1 and "Traceback" not in err, err
    assert "unexpected RuntimeError" in err and "[redacted:card]" in err and CARD not in err
    crashes = list((project / ".lakewarden" / "crash").glob("*.txt"))
    assert len(crashes) == 1 and crashes[0].name in " ".join(err.split()).replace(" ", "")
    body = crashes[0].read_text()
    assert "Traceback" in body and "in broken" in body and CARD not in body and "[redacted:card]" in body
    assert crashes[0].stat().st_mode & 0o777 == 0o600


def _stage(project: Path, name: str) -> list[str]:
    return ["--config", str(project / "lakewarden.yaml"), "--as", "pipeline", "pipeline", "stage", name,
            "--params", str(REPO / "params.yaml")]


def test_a_crashing_stage_says_failed_names_the_file_and_records_it(project: Path, monkeypatch, capsys):
    import lakewarden.pipeline as pl
    from lakewarden.cli import main
    from governance.workspace import Workspace

    def deploy(ws, actor, params):
        raise ValueError("label value refused")

    monkeypatch.setitem(pl.STEPS, "deploy", deploy)
    with pytest.raises(SystemExit) as e:
        main(_stage(project, "deploy"))
    assert e.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "stage deploy failed: unexpected ValueError: label value refused" in err and "refused by the gate" not in err
    with Workspace.open(project / "lakewarden.yaml") as ws:
        out = pl.step_outcome(ws, "deploy")
    assert out["status"] == "crashed" and Path(out["traceback"]).exists()
    assert pl.deploy_status(None, out).startswith("not deployed: the deploy stage crashed: unexpected ValueError")


@pytest.mark.parametrize(("rule", "said"), [
    ("customers/fairness/predictive_parity", "not deployed: fairness failed (rule customers/fairness/predictive_parity)"),
    ("customers/deployment/approvals", "not deployed: refused by the gate (rule customers/deployment/approvals)"),
])
def test_a_refused_stage_is_recorded_with_its_rule(project: Path, monkeypatch, capsys, rule: str, said: str):
    import lakewarden.pipeline as pl
    from lakewarden.cli import main
    from governance.workspace import Workspace

    def deploy(ws, actor, params):
        raise AccessDenied(Decision(False, ("why",), (rule,), Stage.DEPLOY, actor, Resource.model("credit@1")))

    monkeypatch.setitem(pl.STEPS, "deploy", deploy)
    with pytest.raises(SystemExit) as e:
        main(_stage(project, "deploy"))
    assert e.value.code == 3 and rule in capsys.readouterr().err
    with Workspace.open(project / "lakewarden.yaml") as ws:
        out = pl.step_outcome(ws, "deploy")
    assert out["status"] == "denied" and out["rule_ids"] == [rule]
    assert pl.deploy_status(None, out) == said
    assert pl.deploy_status("credit@1", out) == "credit@1"


def test_a_stage_that_succeeds_records_ok(project: Path, monkeypatch, capsys):
    import lakewarden.pipeline as pl
    from lakewarden.cli import main
    from governance.workspace import Workspace

    monkeypatch.setitem(pl.STEPS, "evaluate", lambda ws, actor, params: {"passed": True})
    with pytest.raises(SystemExit) as e:
        main(_stage(project, "evaluate"))
    assert e.value.code == 0 and "evaluate done" in capsys.readouterr().out
    with Workspace.open(project / "lakewarden.yaml") as ws:
        assert pl.step_outcome(ws, "evaluate")["status"] == "ok"
        assert pl.step_outcome(ws, "train") is None
