"""params.yaml's sources, the sources stage's record, and dvc.yaml rendered from them (no DVC run here:
tests/test_pipeline_dvc.py and tests/test_pipeline_own_data.py run ``dvc repro``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from governance.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TRAIN = "train: {features: ['customer_profile:income'], label: defaulted}\n"


def _params(project: Path, text: str) -> Path:
    path = project / "params.yaml"
    path.write_text(text)
    return path


def test_the_repositorys_dvc_yaml_is_rendered_from_its_params(capsys):
    """The demo's dvc.yaml is what `lakewarden pipeline render` writes for params.yaml and policies/."""
    from lakewarden.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(REPO / "lakewarden.yaml"), "pipeline", "render", "--check", "--params",
              str(REPO / "params.yaml")])
    assert e.value.code == 0, capsys.readouterr().err


@pytest.mark.parametrize(("text", "said"), [
    ("data: {people: 10}\n" + TRAIN, "params.yaml:1: data: 'data:' is now 'synthetic:'"),
    ("sources:\n  customers: synthetic\n  nope: synthetic\n" + TRAIN,
     "params.yaml:3: sources.nope: no policy governs dataset 'nope'"),
    ("sources:\n  customers: in/customers.txt\n" + TRAIN,
     "params.yaml:2: sources.customers: customers.txt: unsupported file type '.txt'"),
    ("sources:\n  customers: [in/a.csv, in/b.xlsx]\n" + TRAIN, "params.yaml:2: sources.customers[1]: b.xlsx: unsupported"),
    ("sources:\n  customers: [synthetic, in/a.csv]\n" + TRAIN, "'synthetic' is a source on its own"),
    ("sources:\n  transactions: synthetic\n" + TRAIN,
     "params.yaml:3: train.features: the features read dataset 'customers', which sources does not name"),
    ("sources: {customers: synthetic}\ntrain: {features: ['customer_profile:income'], label: risk}\n",
     "params.yaml:2: train.label: 'risk' is not a column of dataset 'customers'"),
    ("sources: {customers: synthetic}\ntrain: {features: ['nowhere:income']}\n",
     "params.yaml:2: train.features: no policy defines feature view 'nowhere'"),
])
def test_params_errors_name_the_line_and_the_field(workspace, project: Path, text: str, said: str):
    from lakewarden.pipeline import load_params

    with pytest.raises(ConfigError) as e:
        load_params(_params(project, text), workspace)
    assert said in str(e.value).replace(str(project) + "/", ""), str(e.value)


@pytest.fixture
def sources(workspace, project: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the sources stage for ``customers: in/c-*.csv`` in the project folder; return its record."""
    import lakewarden.pipeline as pl
    from lakewarden.pipeline.steps import step_sources

    monkeypatch.chdir(project)
    path = _params(project, "sources: {customers: 'in/c-*.csv'}\n" + TRAIN)

    def run() -> tuple[dict, dict]:
        out = step_sources(workspace, workspace.actor("pipeline"), pl.load_params(path, workspace))
        return out, json.loads((project / "pipeline" / "sources.json").read_text())

    return run


def _files(record: dict) -> list[str]:
    return [f["path"] for f in record["datasets"]["customers"]["files"]]


def test_a_glob_that_matches_nothing_is_named(sources, project: Path):
    with pytest.raises(ConfigError) as e:
        sources()
    assert "params.yaml:1: sources.customers: 'in/c-*.csv' matches no file" in str(e.value).replace(str(project) + "/", "")


def test_the_record_changes_only_when_a_file_is_new_or_changed(sources, project: Path):
    (project / "in").mkdir()
    (project / "in" / "c-1.csv").write_text("customer_id\nC-1\n")
    (project / "in" / "c-2.csv").write_text("customer_id\nC-2\n")
    (project / "in" / "other.csv").write_text("customer_id\nC-3\n")
    out, rec = sources()
    assert out["changed"] and _files(rec) == ["in/c-1.csv", "in/c-2.csv"]
    assert "C-1" not in json.dumps(rec)  # paths and digests only
    before = (project / "pipeline" / "sources.json").read_bytes()
    out, _ = sources()
    assert not out["changed"] and (project / "pipeline" / "sources.json").read_bytes() == before
    (project / "in" / "c-3.csv").write_text("customer_id\nC-4\n")
    out, rec = sources()
    assert out["changed"] and _files(rec) == ["in/c-1.csv", "in/c-2.csv", "in/c-3.csv"]
    (project / "in" / "c-3.csv").unlink()  # gone before it was ingested: it was never data
    out, rec = sources()
    assert out["changed"] and _files(rec) == ["in/c-1.csv", "in/c-2.csv"]


def test_files_ingested_and_removed_stay_recorded(sources, workspace, project: Path):
    """``landing: remove`` deletes ingested files: the glob then matches nothing, and that is no error."""
    from lakewarden.pipeline.manifests import remember_ingested

    (project / "in").mkdir()
    (project / "in" / "c-1.csv").write_text("customer_id\nC-1\n")
    _, rec = sources()
    for f in rec["datasets"]["customers"]["files"]:
        remember_ingested(workspace, "customers", f["sha256"], {"rows_read": 1, "rows_accepted": 1})
    (project / "in" / "c-1.csv").unlink()
    out, again = sources()
    assert not out["changed"] and again == rec


def test_an_erasures_rewrite_of_a_kept_file_is_no_new_file(sources, workspace, project: Path):
    """Erasure rewrites kept landing files without the erased rows: nothing new to ingest."""
    from lakewarden.pipeline.manifests import remember_ingested
    from lakehouse import landing

    (project / "in").mkdir()
    f = project / "in" / "c-1.csv"
    f.write_text("customer_id\nC-1\nC-2\n")
    _, rec = sources()
    remember_ingested(workspace, "customers", rec["datasets"]["customers"]["files"][0]["sha256"], {"rows_read": 2})
    f.write_text("customer_id\nC-2\n")  # as the erasure leaves it, and records it (lakehouse/landing.py, _rewrite)
    landing._append(workspace, {"dataset": "customers", "path_digest": landing._path_digest(workspace, f), "path": b"",
                                "format": "csv", "event": "rewritten", "content_digest": landing.content_digest(workspace, f),
                                "at": landing._now(workspace), "actor": None})
    out, again = sources()
    assert not out["changed"] and again == rec
    f.write_text("customer_id\nC-2\nC-5\n")  # a change that is not the erasure's is new
    out, again = sources()
    assert out["changed"] and len(again["datasets"]["customers"]["files"]) == 2


def test_a_landing_file_tracked_by_git_is_refused(sources, project: Path):
    from lakewarden.pipeline import PipelineError

    (project / "in").mkdir()
    (project / "in" / "c-1.csv").write_text("customer_id\nC-1\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "in/c-1.csv"]):
        subprocess.run(cmd, cwd=project, check=True)
    with pytest.raises(PipelineError) as e:
        sources()
    assert "in/c-1.csv is tracked by git" in str(e.value) and "gitignore" in str(e.value)


def test_render_names_each_datasets_policy_keys(workspace, project: Path):
    from lakewarden.pipeline.dvcyaml import render_data, stale
    from lakewarden.pipeline import load_params

    params = load_params(_params(project, "sources: {customers: 'in/*.csv', transactions: 'in/t.parquet'}\n" + TRAIN),
                         workspace)
    stages = render_data(workspace, params)["stages"]
    assert "deps" not in stages["sources"]  # no generator: its code is no dependency
    assert stages["sources"]["params"] == ["sources"]
    assert stages["ingest"]["params"] == [{"policies/customers.yaml": ["columns", "contract", "landing"]},
                                          {"policies/transactions.yaml": ["columns", "landing"]}]
    assert stale(workspace, params) == ["dvc.yaml"]  # none written yet
