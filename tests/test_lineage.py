"""Behaviour of governance.lineage: OpenLineage events in a Delta table, graph walks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from openlineage.client.serde import Serde
from rich.console import Console

from governance.errors import LineageError
from governance.lineage import (
    PRODUCER,
    DatasetRef,
    LineageEvent,
    LineageStore,
    render_tree,
)

requires_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

DVC_LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: python src/prepare.py data/raw/customers.csv
    deps:
    - path: data/raw/customers.csv
      hash: md5
      md5: 2f1e5e1a0f0d4c3b8a9e7d6c5b4a3f21
      size: 14445
    - path: src/prepare.py
      hash: md5
      md5: f09ea0c15980b43010257ccb9f0055e2
      size: 1576
    params:
      params.yaml:
        prepare.seed: 20170428
    outs:
    - path: data/prepared
      hash: md5
      md5: 153aad06d376b6595932470e459ef42a.dir
      size: 8437363
      nfiles: 2
  train:
    cmd: python src/train.py
    deps:
    - path: data/prepared
      hash: md5
      md5: 153aad06d376b6595932470e459ef42a.dir
      size: 8437363
      nfiles: 2
    outs:
    - path: models/credit.pt
      hash: md5
      md5: 9b2cf535f27731c974343645a3985328
      size: 20480
"""


class TickingClock:
    """Deterministic clock: each call is one second after the previous one."""

    def __init__(self, start: datetime = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(autouse=True)
def _isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No user/system git config, and never discover a repository above tmp_path.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))


@pytest.fixture
def store(tmp_path: Path) -> LineageStore:
    return LineageStore(str(tmp_path / "lineage"), clock=TickingClock())


def git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=Test", "-c", "user.email=test@example.com",
         "-c", "commit.gpgsign=false", *args],
        cwd=repo, check=True, capture_output=True, text=True,
    )
    return result.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "dvc.lock").write_text(DVC_LOCK)
    git(repo, "add", "dvc.yaml", "dvc.lock")
    git(repo, "commit", "-q", "-m", "initial")
    return repo


def build_chain(store: LineageStore) -> dict[str, str]:
    """raw -> bronze -> silver -> features -> model, one COMPLETE run per step."""
    steps = [
        ("ingest", DatasetRef("raw.customers", version=1, kind="file"), DatasetRef("bronze.customers", version=3)),
        ("refine", DatasetRef("bronze.customers", version=3), DatasetRef("silver.customers", version=7)),
        ("featurize", DatasetRef("silver.customers", version=7),
         DatasetRef("features.customer", version=2, kind="feature_view")),
        ("train", DatasetRef("features.customer", version=2, kind="feature_view"),
         DatasetRef("model:credit", version=1, kind="model")),
    ]
    return {job: store.emit(job, inputs=[src], outputs=[dst]) for job, src, dst in steps}


def text_of(tree) -> str:
    console = Console(record=True, width=200)
    console.print(tree)
    return console.export_text()


# --------------------------------------------------------------------------- events and payload


def test_emitted_event_round_trips_with_openlineage_payload(store: LineageStore) -> None:
    run_id = store.emit(
        "refine.customers",
        inputs=[DatasetRef("bronze.customers", version=3)],
        outputs=[DatasetRef("silver.customers", version=7)],
        facets={"rows_written": 120, "quarantined": 2},
    )

    [row] = store.events()
    assert row["run_id"] == run_id
    assert row["event_type"] == "COMPLETE"
    assert (row["job_namespace"], row["job_name"]) == ("lakewarden", "refine.customers")
    assert row["event_time"] == datetime(2025, 1, 2, 3, 4, 6, tzinfo=timezone.utc)
    assert row["inputs"] == [{"namespace": "lakewarden", "name": "bronze.customers", "version": 3, "kind": "table"}]
    assert row["outputs"] == [{"namespace": "lakewarden", "name": "silver.customers", "version": 7, "kind": "table"}]
    assert row["git_commit"] is None and row["dvc_stage"] is None

    payload = json.loads(row["payload"])
    assert Serde.to_json(payload) == row["payload"]  # Serde's own canonical form
    assert payload["schemaURL"].startswith("https://openlineage.io/spec/")
    assert payload["producer"] == PRODUCER
    assert payload["eventType"] == "COMPLETE"
    assert payload["eventTime"] == "2025-01-02T03:04:06+00:00"
    assert payload["run"]["runId"] == run_id
    assert payload["job"] == {"namespace": "lakewarden", "name": "refine.customers", "facets": {}}
    output = payload["outputs"][0]
    assert output["name"] == "silver.customers"
    assert output["facets"]["version"]["datasetVersion"] == "7"
    assert output["facets"]["version"]["_schemaURL"].endswith("DatasetVersionDatasetFacet")
    assert output["facets"]["datasetType"]["datasetType"] == "TABLE"
    assert payload["inputs"][0]["facets"]["version"]["datasetVersion"] == "3"
    details = payload["run"]["facets"]["lakewarden_details"]
    assert details["details"] == {"rows_written": 120, "quarantined": 2}
    assert details["_producer"] == PRODUCER
    assert details["_schemaURL"].startswith(PRODUCER) and "#/$defs/" in details["_schemaURL"]


def test_kinds_map_to_dataset_type_facet_and_unversioned_refs_have_no_version(store: LineageStore) -> None:
    store.emit(
        "build.training_set",
        inputs=[DatasetRef("features.customer", kind="feature_view")],
        outputs=[DatasetRef("ts.credit", version=0, kind="training_set")],
    )
    payload = json.loads(store.events()[0]["payload"])
    source, target = payload["inputs"][0]["facets"], payload["outputs"][0]["facets"]
    assert "version" not in source
    assert (source["datasetType"]["datasetType"], source["datasetType"]["subType"]) == ("VIEW", "FEATURE_VIEW")
    assert target["version"]["datasetVersion"] == "0"
    assert target["datasetType"]["subType"] == "TRAINING_SET"


def test_table_is_delta_with_one_version_per_emit(store: LineageStore) -> None:
    for version in range(3):
        store.emit("ingest", outputs=[DatasetRef("bronze.customers", version=version)])
    store.emit_many(
        [
            LineageEvent(job="a", outputs=[DatasetRef("x", version=1)]),
            LineageEvent(job="b", inputs=[DatasetRef("x", version=1)]),
        ]
    )

    table = DeltaTable(store.table_uri)
    assert table.version() == 3  # versions 0..3: three emits and one emit_many
    assert len(table.history()) == 4
    assert table.metadata().configuration["delta.appendOnly"] == "true"
    assert table.to_pyarrow_table().num_rows == 5
    names = [f.name for f in table.schema().fields]
    assert names == ["event_time", "run_id", "event_type", "job_namespace", "job_name",
                     "inputs", "outputs", "git_commit", "dvc_stage", "payload"]
    arrow = table.to_pyarrow_table().schema
    assert arrow.field("event_time").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("inputs").type.value_type.field("version").type == pa.int64()


def test_events_filter_by_job_dataset_and_run(store: LineageStore) -> None:
    ids = build_chain(store)

    assert [e["job_name"] for e in store.events()] == ["ingest", "refine", "featurize", "train"]
    assert [e["job_name"] for e in store.events(job="refine")] == ["refine"]
    assert [e["job_name"] for e in store.events(dataset="silver.customers")] == ["refine", "featurize"]
    assert [e["job_name"] for e in store.events(dataset="silver.customers", job="featurize")] == ["featurize"]
    assert [e["job_name"] for e in store.events(run_id=ids["train"])] == ["train"]
    assert store.events(dataset="gold.nothing") == []
    assert store.events(job="nope") == []


def test_reading_before_any_emit_is_empty(store: LineageStore) -> None:
    assert store.events() == []
    graph = store.upstream("silver.customers")
    assert list(graph.nodes) == ["silver.customers"] and graph.edges == ()


# --------------------------------------------------------------------------- git and DVC


@requires_git
def test_git_commit_is_recorded_and_matches_head(tmp_path: Path, repo: Path) -> None:
    store = LineageStore(str(tmp_path / "lineage"), repo_dir=str(repo), clock=TickingClock())
    store.emit("ingest", outputs=[DatasetRef("bronze.customers", version=1)])
    (repo / "dvc.yaml").write_text("stages: {changed: true}\n")
    store.emit("ingest", outputs=[DatasetRef("bronze.customers", version=2)])

    head = git(repo, "rev-parse", "HEAD")
    clean, dirty = store.events()
    assert clean["git_commit"] == dirty["git_commit"] == head
    facet = json.loads(clean["payload"])["run"]["facets"]["lakewarden_git"]
    assert facet["commit"] == head and facet["dirty"] is False
    assert facet["_producer"] == PRODUCER and facet["_schemaURL"].endswith("LakewardenGitRunFacet")
    assert json.loads(dirty["payload"])["run"]["facets"]["lakewarden_git"]["dirty"] is True


@requires_git
def test_outside_git_the_commit_is_none(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    git(empty, "init", "-q")  # a repository without commits

    for repo_dir in (plain, empty):
        store = LineageStore(str(tmp_path / f"lineage-{repo_dir.name}"), repo_dir=str(repo_dir))
        store.emit("ingest", outputs=[DatasetRef("bronze.customers", version=1)])
        [row] = store.events()
        assert row["git_commit"] is None
        assert "lakewarden_git" not in json.loads(row["payload"])["run"]["facets"]


@requires_git
def test_dvc_hashes_are_recorded_for_a_stage(tmp_path: Path, repo: Path) -> None:
    store = LineageStore(str(tmp_path / "lineage"), repo_dir=str(repo))
    store.emit("train", outputs=[DatasetRef("model:credit", version=1, kind="model")], dvc_stage="train")
    store.emit("prepare", dvc_stage="prepare")
    store.emit("evaluate", dvc_stage="evaluate")  # not in dvc.lock yet

    train, prepare, evaluate = store.events()
    assert train["dvc_stage"] == "train"
    facet = json.loads(train["payload"])["run"]["facets"]["lakewarden_dvc"]
    assert facet["stage"] == "train" and facet["lockFile"] == "dvc.lock"
    assert facet["deps"] == [{"path": "data/prepared", "hash": "md5",
                              "md5": "153aad06d376b6595932470e459ef42a.dir", "size": 8437363, "nfiles": 2}]
    assert facet["outs"] == [{"path": "models/credit.pt", "hash": "md5",
                              "md5": "9b2cf535f27731c974343645a3985328", "size": 20480}]
    assert facet["_schemaURL"].endswith("LakewardenDvcRunFacet")
    prepared = json.loads(prepare["payload"])["run"]["facets"]["lakewarden_dvc"]
    assert [d["md5"] for d in prepared["deps"]] == ["2f1e5e1a0f0d4c3b8a9e7d6c5b4a3f21",
                                                    "f09ea0c15980b43010257ccb9f0055e2"]
    assert evaluate["dvc_stage"] == "evaluate"
    assert "lakewarden_dvc" not in json.loads(evaluate["payload"])["run"]["facets"]


def test_dvc_stage_in_a_sub_pipeline_and_a_broken_lock(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "pipelines" / "credit").mkdir(parents=True)
    (project / "pipelines" / "credit" / "dvc.lock").write_text(DVC_LOCK)
    store = LineageStore(str(tmp_path / "lineage"), repo_dir=str(project))
    store.emit("train", dvc_stage="pipelines/credit/dvc.yaml:train")
    facet = json.loads(store.events()[0]["payload"])["run"]["facets"]["lakewarden_dvc"]
    assert facet["lockFile"] == "pipelines/credit/dvc.lock" and facet["stage"] == "train"

    (project / "dvc.lock").write_text("stages: [not, a, mapping]\n")
    with pytest.raises(LineageError, match="dvc.lock has no 'stages' mapping") as info:
        store.emit("train", dvc_stage="train")
    assert str(tmp_path / "lineage") in str(info.value)


# --------------------------------------------------------------------------- graph walks


def test_upstream_and_downstream_over_a_chain_with_depth_limits(store: LineageStore) -> None:
    ids = build_chain(store)

    up = store.upstream("model:credit")
    assert {n: node.depth for n, node in up.nodes.items()} == {
        "model:credit": 0, "features.customer": 1, "silver.customers": 2,
        "bronze.customers": 3, "raw.customers": 4,
    }
    assert up.nodes["silver.customers"].versions == frozenset({7})
    assert up.nodes["model:credit"].kind == "model"
    assert {(e.source, e.target, e.job, e.run_id) for e in up.edges} == {
        ("raw.customers", "bronze.customers", "ingest", ids["ingest"]),
        ("bronze.customers", "silver.customers", "refine", ids["refine"]),
        ("silver.customers", "features.customer", "featurize", ids["featurize"]),
        ("features.customer", "model:credit", "train", ids["train"]),
    }

    assert set(store.upstream("model:credit", depth=0).nodes) == {"model:credit"}
    assert set(store.upstream("model:credit", depth=1).nodes) == {"model:credit", "features.customer"}
    two = store.upstream("model:credit", depth=2)
    assert set(two.nodes) == {"model:credit", "features.customer", "silver.customers"}
    assert len(two.edges) == 2

    down = store.downstream("raw.customers")
    assert set(down.nodes) == set(up.nodes)
    assert set(down.edges) == set(up.edges)  # edges always point the way data flowed
    assert set(store.downstream("raw.customers", depth=2).nodes) == {
        "raw.customers", "bronze.customers", "silver.customers"}
    assert set(store.downstream("silver.customers").nodes) == {
        "silver.customers", "features.customer", "model:credit"}

    as_dict = up.to_dict()
    json.dumps(as_dict)
    assert as_dict["root"] == "model:credit" and as_dict["direction"] == "upstream"
    assert as_dict["nodes"][0] == {"name": "model:credit", "kind": "model", "versions": [1], "depth": 0}
    assert len(as_dict["edges"]) == 4


def test_only_completed_runs_link_datasets_and_run_events_merge(store: LineageStore) -> None:
    started = store.emit("refine", inputs=[DatasetRef("bronze.customers", version=3)], event_type="START")
    store.emit("refine", outputs=[DatasetRef("silver.customers", version=7)], run_id=started)
    store.emit("broken", inputs=[DatasetRef("bronze.customers", version=3)],
               outputs=[DatasetRef("silver.customers", version=8)], event_type="FAIL")
    store.emit("pending", inputs=[DatasetRef("other.table")],
               outputs=[DatasetRef("silver.customers", version=9)], event_type="START")

    graph = store.upstream("silver.customers")
    assert set(graph.nodes) == {"silver.customers", "bronze.customers"}
    [edge] = graph.edges
    assert (edge.job, edge.run_id, edge.source_version, edge.target_version) == ("refine", started, 3, 7)


def test_version_pins_provenance_to_the_runs_that_made_that_version(store: LineageStore) -> None:
    store.emit("featurize", inputs=[DatasetRef("silver.customers", version=7)],
               outputs=[DatasetRef("features.customer", version=2, kind="feature_view")])
    store.emit("featurize", inputs=[DatasetRef("silver.customers", version=8)],
               outputs=[DatasetRef("features.customer", version=3, kind="feature_view")])
    store.emit("train", inputs=[DatasetRef("features.customer", version=2, kind="feature_view")],
               outputs=[DatasetRef("model:credit", version=1, kind="model")])

    by_name = store.upstream("model:credit")
    assert by_name.nodes["silver.customers"].versions == frozenset({7, 8})
    exact = store.upstream("model:credit", version=1)
    assert exact.nodes["silver.customers"].versions == frozenset({7})
    assert exact.nodes["features.customer"].versions == frozenset({2})

    assert set(store.downstream("silver.customers", version=8).nodes) == {"silver.customers", "features.customer"}
    assert set(store.downstream("silver.customers", version=7).nodes) == {
        "silver.customers", "features.customer", "model:credit"}


def test_cycles_terminate(store: LineageStore) -> None:
    store.emit("a_to_b", inputs=[DatasetRef("a", version=1)], outputs=[DatasetRef("b", version=1)])
    store.emit("b_to_c", inputs=[DatasetRef("b", version=1)], outputs=[DatasetRef("c", version=1)])
    store.emit("c_to_a", inputs=[DatasetRef("c", version=1)], outputs=[DatasetRef("a", version=2)])
    store.emit("merge_a", inputs=[DatasetRef("a", version=2)], outputs=[DatasetRef("a", version=3)])

    for graph in (store.upstream("a"), store.downstream("a"), store.upstream("a", version=3)):
        assert set(graph.nodes) == {"a", "b", "c"}
        text = text_of(render_tree(graph))
        assert "(cycle)" in text
    assert store.upstream("a").nodes["a"].versions == frozenset({1, 2, 3})


def test_render_tree_shows_datasets_versions_and_jobs(store: LineageStore) -> None:
    build_chain(store)
    store.emit("train", inputs=[DatasetRef("silver.customers", version=7)],
               outputs=[DatasetRef("model:credit", version=1, kind="model")])

    graph = store.upstream("model:credit")
    text = text_of(render_tree(graph, "model:credit", "upstream"))
    lines = text.splitlines()
    assert lines[0].startswith("model:credit  v1  [model]")
    for expected in ("features.customer  v2  [feature_view]", "silver.customers  v7", "bronze.customers  v3",
                     "raw.customers  v1  [file]", "<- train (run", "<- featurize", "<- refine", "<- ingest"):
        assert expected in text
    assert "(see above)" in text  # silver.customers is reached twice, expanded once

    down = text_of(render_tree(store.downstream("bronze.customers", depth=1)))
    assert "bronze.customers" in down and "-> refine" in down and "model:credit" not in down

    empty = text_of(render_tree(store.upstream("never.seen")))
    assert "never.seen" in empty and "no upstream lineage recorded" in empty


# --------------------------------------------------------------------------- run() context manager


def test_run_emits_start_then_complete_with_collected_outputs(store: LineageStore) -> None:
    with store.run("featurize", inputs=[DatasetRef("silver.customers", version=7)],
                   facets={"params": {"window": "30d"}}) as run:
        run.add_output(DatasetRef("features.customer", version=2, kind="feature_view"))
        run.add_input(DatasetRef("silver.accounts", version=4))

    start, complete = store.events(run_id=run.run_id)
    assert (start["event_type"], complete["event_type"]) == ("START", "COMPLETE")
    assert start["outputs"] == []
    assert [i["name"] for i in complete["inputs"]] == ["silver.customers", "silver.accounts"]
    assert [o["name"] for o in complete["outputs"]] == ["features.customer"]
    details = json.loads(complete["payload"])["run"]["facets"]["lakewarden_details"]["details"]
    assert details == {"params": {"window": "30d"}}
    assert set(store.upstream("features.customer").nodes) == {
        "features.customer", "silver.customers", "silver.accounts"}
    with pytest.raises(RuntimeError, match="already ended"):
        run.add_output(DatasetRef("late"))


def test_run_emits_fail_with_error_message_and_reraises(store: LineageStore) -> None:
    with pytest.raises(KeyError, match="customer_id"):
        with store.run("refine", inputs=[DatasetRef("bronze.customers", version=3)]) as run:
            raise KeyError("customer_id")

    start, fail = store.events(job="refine")
    assert (start["event_type"], fail["event_type"]) == ("START", "FAIL")
    assert start["run_id"] == fail["run_id"] == run.run_id
    error = json.loads(fail["payload"])["run"]["facets"]["errorMessage"]
    assert error["message"] == "KeyError: 'customer_id'"
    assert error["programmingLanguage"] == "python"
    assert error["_schemaURL"].endswith("ErrorMessageRunFacet")
    assert store.downstream("bronze.customers").edges == ()  # failed runs are not lineage


# --------------------------------------------------------------------------- errors


def test_storage_failures_raise_lineage_error_naming_the_table(tmp_path: Path) -> None:
    uri = str(tmp_path / "not-lineage")
    write_deltalake(uri, pa.table({"x": [1]}))
    store = LineageStore(uri)
    with pytest.raises(LineageError, match="cannot append lineage events") as info:
        store.emit("ingest", outputs=[DatasetRef("bronze.customers", version=1)])
    assert uri in str(info.value)
    assert info.value.context == {"table_uri": uri}


def test_caller_mistakes_are_value_or_type_errors(store: LineageStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        DatasetRef("")
    with pytest.raises(ValueError, match=">= 0"):
        DatasetRef("t", version=-1)
    with pytest.raises(TypeError, match="int or None"):
        DatasetRef("t", version="7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind must be one of"):
        DatasetRef("t", kind="view")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="event_type must be one of"):
        store.emit("j", event_type="DONE")
    with pytest.raises(ValueError, match="run_id must be a UUID"):
        store.emit("j", run_id="run-1")
    with pytest.raises(ValueError, match="plain JSON"):
        store.emit("j", facets={"when": datetime.now(timezone.utc)})
    with pytest.raises(TypeError, match="sequence of DatasetRef"):
        store.emit("j", inputs=DatasetRef("t"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="depth"):
        store.upstream("t", depth=-1)
    with pytest.raises(ValueError, match="not a directory"):
        LineageStore(str(tmp_path / "l"), repo_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="aware datetime"):
        LineageStore(str(tmp_path / "l"), clock=lambda: datetime(2025, 1, 1)).emit("j")
    assert not (tmp_path / "lineage").exists()  # nothing was written
