"""Lineage is data: OpenLineage run events kept in a local Delta table.

Every pipeline stage reports what it read and what it wrote as an OpenLineage
``RunEvent`` (openlineage-python's own classes, serialized with its ``Serde``).
Datasets carry their Delta (or model registry) version in the standard
``DatasetVersionDatasetFacet``; runs carry the git commit and, for DVC stages,
the dependency and output hashes recorded in ``dvc.lock``. Events are appended
to a Delta table, one commit per :meth:`LineageStore.emit`, so lineage can be
queried with SQL next to the data it describes, and walked as a graph with
:meth:`LineageStore.upstream` / :meth:`LineageStore.downstream`.

Lineage is table-level: dataset names, versions, job names, commits, hashes.
It never holds rows, subject keys or other personal data, so erasure never has
to touch it (the table is created ``delta.appendOnly``). Keep ``facets`` free of
personal data too, and keep exception messages that reach a FAIL event free of
it.

Example::

    store = LineageStore(tmp + "/lineage", repo_dir=None)
    run_id = store.emit(
        "ingest.customers",
        inputs=[DatasetRef("raw.customers", version=1, kind="file")],
        outputs=[DatasetRef("bronze.customers", version=4)],
    )
    graph = store.upstream("bronze.customers")
    assert set(graph.nodes) == {"bronze.customers", "raw.customers"}

Custom facets (all valid OpenLineage custom facets, with ``_producer`` and
``_schemaURL``)::

    run.facets.lakewarden_git      {commit, dirty}
    run.facets.lakewarden_dvc      {stage, lockFile, deps: [...], outs: [...]}
    run.facets.lakewarden_details  {details: {...}}     (the ``facets`` argument)
    run.facets.errorMessage        standard ErrorMessageRunFacet on FAIL/ABORT

Errors: storage and serialization failures raise
:class:`governance.errors.LineageError` naming the table; caller mistakes
(bad names, versions, event types) raise ``ValueError`` / ``TypeError``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import attr
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError
from openlineage.client.event_v2 import (
    InputDataset,
    Job,
    OutputDataset,
    Run,
    RunEvent,
    RunState,
)
from openlineage.client.facet_v2 import (
    RunFacet,
    dataset_type_dataset,
    dataset_version_dataset,
    error_message_run,
)
from openlineage.client.serde import Serde
from openlineage.client.uuid import generate_new_uuid
from rich.text import Text
from rich.tree import Tree

from governance.errors import LineageError

__all__ = [
    "EVENT_TYPES",
    "PRODUCER",
    "DatasetKind",
    "DatasetRef",
    "DetailsRunFacet",
    "DvcRunFacet",
    "GitRunFacet",
    "LineageEdge",
    "LineageEvent",
    "LineageGraph",
    "LineageNode",
    "LineageRun",
    "LineageStore",
    "RunHandle",
    "render_tree",
]

PRODUCER = "https://github.com/lakewarden/lakewarden"
"""The OpenLineage ``producer`` of every event and facet Lakewarden writes."""

EVENT_TYPES: tuple[str, ...] = ("START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER")
"""OpenLineage run states, in lifecycle order (used to order events at equal times)."""

DatasetKind = Literal["table", "model", "file", "feature_view", "training_set", "topic"]
_KINDS: tuple[str, ...] = get_args(DatasetKind)

# kind -> (DatasetTypeDatasetFacet.datasetType, subType)
_DATASET_TYPES: dict[str, tuple[str, str | None]] = {
    "table": ("TABLE", None),
    "model": ("MODEL", None),
    "file": ("FILE", None),
    "feature_view": ("VIEW", "FEATURE_VIEW"),
    "training_set": ("TABLE", "TRAINING_SET"),
    "topic": ("TOPIC", None),
}

_FACET_SCHEMA = PRODUCER + "/blob/main/docs/lineage/facets/1-0-0/{name}.json#/$defs/{name}"
_MAX_ERROR_MESSAGE = 2000
_LOCK_ENTRY_KEYS = ("path", "hash", "md5", "etag", "checksum", "version_id", "size", "nfiles")
_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class DatasetRef:
    """A dataset (table, model, file, feature view, training set) at a version.

    Args:
        name: dataset name, e.g. ``"silver.customers"`` or ``"model:credit"``.
        version: the Delta table version (or model registry version); ``None``
            when unknown. Stored in OpenLineage's ``DatasetVersionDatasetFacet``.
        namespace: OpenLineage namespace; ``None`` means the store's namespace.
        kind: what the dataset is; also written as a ``DatasetTypeDatasetFacet``.

    Raises:
        ValueError / TypeError: empty name, negative or non-int version, unknown kind.

    Example::

        DatasetRef("silver.customers", version=7)
        DatasetRef("model:credit", version=3, kind="model")
    """

    name: str
    version: int | None = None
    namespace: str | None = None
    kind: DatasetKind = "table"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"dataset name must be a non-empty string, got {self.name!r}")
        if self.version is not None:
            if isinstance(self.version, bool) or not isinstance(self.version, int):
                raise TypeError(f"dataset version must be an int or None, got {self.version!r}")
            if self.version < 0:
                raise ValueError(f"dataset version must be >= 0, got {self.version}")
        if self.namespace is not None and (
            not isinstance(self.namespace, str) or not self.namespace.strip()
        ):
            raise ValueError(f"dataset namespace must be a non-empty string, got {self.namespace!r}")
        if self.kind not in _KINDS:
            raise ValueError(f"dataset kind must be one of {', '.join(_KINDS)}; got {self.kind!r}")


@dataclass(frozen=True, kw_only=True)
class LineageEvent:
    """One event to write with :meth:`LineageStore.emit_many` (same fields as ``emit``)."""

    job: str
    inputs: Sequence[DatasetRef] = ()
    outputs: Sequence[DatasetRef] = ()
    event_type: str = "COMPLETE"
    run_id: str | None = None
    dvc_stage: str | None = None
    facets: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not self.job.strip():
            raise ValueError(f"job name must be a non-empty string, got {self.job!r}")
        if self.event_type not in EVENT_TYPES:
            raise ValueError(
                f"event_type must be one of {', '.join(EVENT_TYPES)}; got {self.event_type!r}"
            )
        object.__setattr__(self, "inputs", _refs(self.inputs, "inputs"))
        object.__setattr__(self, "outputs", _refs(self.outputs, "outputs"))
        if self.run_id is not None:
            _check_uuid(self.run_id)
        if self.dvc_stage is not None and (
            not isinstance(self.dvc_stage, str) or not self.dvc_stage.strip()
        ):
            raise ValueError(f"dvc_stage must be a non-empty string, got {self.dvc_stage!r}")
        if self.facets is not None:
            if not isinstance(self.facets, Mapping):
                raise TypeError(f"facets must be a mapping, got {type(self.facets).__name__}")
            try:
                json.dumps(dict(self.facets), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"facets must be plain JSON (str keys, no NaN): {exc}") from exc


def _refs(refs: Iterable[DatasetRef], what: str) -> tuple[DatasetRef, ...]:
    if isinstance(refs, (str, DatasetRef)):
        raise TypeError(f"{what} must be a sequence of DatasetRef, not a single {type(refs).__name__}")
    out = tuple(refs)
    for ref in out:
        if not isinstance(ref, DatasetRef):
            raise TypeError(f"{what} must hold DatasetRef values, got {type(ref).__name__}")
    return out


def _check_uuid(run_id: str) -> None:
    from uuid import UUID

    try:
        UUID(str(run_id))
    except ValueError as exc:
        raise ValueError(f"run_id must be a UUID string, got {run_id!r}") from exc


@dataclass(frozen=True)
class LineageNode:
    """A dataset in a :class:`LineageGraph`: its versions seen and hops from the root."""

    name: str
    kind: str | None
    versions: frozenset[int]
    depth: int


@dataclass(frozen=True)
class LineageEdge:
    """Data flowed from ``source`` to ``target`` in run ``run_id`` of ``job``."""

    source: str
    target: str
    job: str
    run_id: str
    source_version: int | None = None
    target_version: int | None = None


@dataclass(frozen=True)
class LineageGraph:
    """The result of an upstream/downstream walk. Treat ``nodes`` as read-only.

    ``edges`` always point in the direction data flowed (source -> target),
    whichever way the graph was walked.
    """

    root: str
    direction: Literal["upstream", "downstream"]
    nodes: dict[str, LineageNode] = field(default_factory=dict)
    edges: tuple[LineageEdge, ...] = ()

    def children(self, name: str, direction: str | None = None) -> list[LineageEdge]:
        """Edges leading away from ``name`` in the walk direction (parents when upstream)."""
        upstream = (direction or self.direction) == "upstream"
        return [e for e in self.edges if (e.target if upstream else e.source) == name]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form: ``{root, direction, nodes: [...], edges: [...]}``."""
        return {
            "root": self.root,
            "direction": self.direction,
            "nodes": [
                {
                    "name": n.name,
                    "kind": n.kind,
                    "versions": sorted(n.versions),
                    "depth": n.depth,
                }
                for n in sorted(self.nodes.values(), key=lambda n: (n.depth, n.name))
            ],
            "edges": [
                {
                    "source": e.source,
                    "target": e.target,
                    "job": e.job,
                    "run_id": e.run_id,
                    "source_version": e.source_version,
                    "target_version": e.target_version,
                }
                for e in self.edges
            ],
        }


# --------------------------------------------------------------------------- facets


def _facet_schema(name: str) -> str:
    return _FACET_SCHEMA.format(name=name)


@attr.define
class GitRunFacet(RunFacet):
    """``lakewarden_git``: the commit the stage ran from and whether the tree was dirty."""

    commit: str
    dirty: bool | None = attr.field(default=None)

    @staticmethod
    def _get_schema() -> str:
        return _facet_schema("LakewardenGitRunFacet")


@attr.define
class DvcRunFacet(RunFacet):
    """``lakewarden_dvc``: a DVC stage's dependency and output hashes from ``dvc.lock``."""

    stage: str
    lockFile: str  # noqa: N815  (OpenLineage facets use camelCase)
    deps: list[dict[str, Any]] = attr.field(factory=list)
    outs: list[dict[str, Any]] = attr.field(factory=list)

    @staticmethod
    def _get_schema() -> str:
        return _facet_schema("LakewardenDvcRunFacet")


@attr.define
class DetailsRunFacet(RunFacet):
    """``lakewarden_details``: free-form JSON the stage attaches (no personal data)."""

    details: dict[str, Any] = attr.field(factory=dict)

    @staticmethod
    def _get_schema() -> str:
        return _facet_schema("LakewardenDetailsRunFacet")


# --------------------------------------------------------------------------- storage schema

_REF_TYPE = pa.struct(
    [
        pa.field("namespace", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("version", pa.int64()),
        pa.field("kind", pa.string(), nullable=False),
    ]
)
_REFS_TYPE = pa.list_(pa.field("element", _REF_TYPE, nullable=False))

SCHEMA = pa.schema(
    [
        pa.field("event_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("job_namespace", pa.string(), nullable=False),
        pa.field("job_name", pa.string(), nullable=False),
        pa.field("inputs", _REFS_TYPE, nullable=False),
        pa.field("outputs", _REFS_TYPE, nullable=False),
        pa.field("git_commit", pa.string()),
        pa.field("dvc_stage", pa.string()),
        pa.field("payload", pa.string(), nullable=False),
    ]
)
"""Arrow schema of the lineage Delta table."""

_TABLE_CONFIGURATION = {"delta.appendOnly": "true"}


# --------------------------------------------------------------------------- the store


class RunHandle:
    """What a ``with store.run(...)`` block gets: collect inputs and outputs as you go."""

    def __init__(self, job: str, run_id: str, inputs: Sequence[DatasetRef]) -> None:
        self.job = job
        self.run_id = run_id
        self._inputs: list[DatasetRef] = list(inputs)
        self._outputs: list[DatasetRef] = []
        self._open = True

    @property
    def inputs(self) -> tuple[DatasetRef, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[DatasetRef, ...]:
        return tuple(self._outputs)

    def add_input(self, ref: DatasetRef) -> None:
        """Record a dataset the stage read (reported in the COMPLETE/FAIL event)."""
        self._add(self._inputs, ref)

    def add_output(self, ref: DatasetRef) -> None:
        """Record a dataset the stage wrote, with the version it produced."""
        self._add(self._outputs, ref)

    def _add(self, into: list[DatasetRef], ref: DatasetRef) -> None:
        if not self._open:
            raise RuntimeError(f"run {self.run_id} of {self.job!r} has already ended")
        if not isinstance(ref, DatasetRef):
            raise TypeError(f"expected a DatasetRef, got {type(ref).__name__}")
        into.append(ref)


@dataclass(frozen=True)
class LineageRun:
    """A completed run: its job, id, and the datasets it read and wrote (all its events merged)."""

    run_id: str
    job: str
    inputs: tuple[DatasetRef, ...]
    outputs: tuple[DatasetRef, ...]


@dataclass(frozen=True)
class _RunRecord:
    run_id: str
    job: str
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]


class LineageStore:
    """OpenLineage events in a Delta table at ``table_uri``, and graph walks over them.

    Args:
        table_uri: where the Delta table lives (created on the first emit).
        namespace: OpenLineage namespace for jobs, and for datasets that name none.
        repo_dir: the git/DVC project root. ``None`` records no git or DVC facts.
        clock: returns the current time as an aware ``datetime`` (inject in tests).
        storage_options: passed to deltalake for object stores.

    Raises:
        ValueError: empty ``table_uri`` or ``namespace``; ``repo_dir`` not a directory.
    """

    def __init__(
        self,
        table_uri: str | os.PathLike[str],
        *,
        namespace: str = "lakewarden",
        repo_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], datetime] | None = None,
        storage_options: Mapping[str, str] | None = None,
    ) -> None:
        self.table_uri = os.fspath(table_uri)
        if not self.table_uri:
            raise ValueError("table_uri must not be empty")
        if not namespace:
            raise ValueError("namespace must not be empty")
        self.namespace = namespace
        self.repo_dir = None if repo_dir is None else Path(repo_dir)
        if self.repo_dir is not None and not self.repo_dir.is_dir():
            raise ValueError(f"repo_dir {self.repo_dir} is not a directory")
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._storage_options = dict(storage_options) if storage_options else None

    def __repr__(self) -> str:
        return f"LineageStore({self.table_uri!r}, namespace={self.namespace!r})"

    # ----------------------------------------------------------------- writing

    def emit(
        self,
        job: str,
        *,
        inputs: Sequence[DatasetRef] = (),
        outputs: Sequence[DatasetRef] = (),
        event_type: str = "COMPLETE",
        run_id: str | None = None,
        dvc_stage: str | None = None,
        facets: Mapping[str, Any] | None = None,
    ) -> str:
        """Record one OpenLineage run event (one Delta commit) and return its run id.

        Args:
            job: the job (stage) name, e.g. ``"ingest.customers"``.
            inputs / outputs: datasets read and written, with versions where known.
            event_type: one of :data:`EVENT_TYPES`; the graph follows COMPLETE runs.
            run_id: reuse a run's id for its later events; a new UUIDv7 if ``None``.
            dvc_stage: DVC stage name (``"train"`` or ``"sub/dvc.yaml:train"``); its
                hashes are read from ``dvc.lock`` under ``repo_dir`` when present.
                ``dvc repro`` rewrites ``dvc.lock`` *after* a stage's command exits,
                so hashes read from inside a running stage are those of its last run.
            facets: plain JSON, stored in the ``lakewarden_details`` run facet. No
                personal data. OpenLineage's ``Serde`` drops ``None`` values (and
                ``None``/``{}`` list items) when serializing.

        Returns:
            The run id (a UUID string).

        Raises:
            LineageError: the event could not be built or written to the table.
            ValueError / TypeError: invalid arguments.
        """
        event = LineageEvent(
            job=job,
            inputs=inputs,
            outputs=outputs,
            event_type=event_type,
            run_id=run_id,
            dvc_stage=dvc_stage,
            facets=facets,
        )
        return self._write([(event, {})])[0]

    def emit_many(self, events: Iterable[LineageEvent]) -> list[str]:
        """Record several events in one Delta commit; returns their run ids in order."""
        batch = list(events)
        for event in batch:
            if not isinstance(event, LineageEvent):
                raise TypeError(f"emit_many takes LineageEvent values, got {type(event).__name__}")
        return self._write([(event, {}) for event in batch])

    @contextmanager
    def run(
        self,
        job: str,
        *,
        inputs: Sequence[DatasetRef] = (),
        dvc_stage: str | None = None,
        facets: Mapping[str, Any] | None = None,
    ) -> Iterator[RunHandle]:
        """Bracket a stage with START and COMPLETE (or FAIL) events.

        Example::

            with store.run("features.build", inputs=[DatasetRef("silver.customers", version=7)]) as r:
                version = write_features(...)
                r.add_output(DatasetRef("features.customer", version=version, kind="feature_view"))

        If the block raises, a FAIL event (ABORT for KeyboardInterrupt/SystemExit)
        with an ``errorMessage`` facet (exception class and message) is written and
        the exception propagates; if that write fails too, the stage's exception
        still propagates, with a note saying the lineage event was lost.

        Raises:
            LineageError: the START or COMPLETE event could not be written.
        """
        run_id = str(generate_new_uuid(self._now()))
        handle = RunHandle(job, run_id, _refs(inputs, "inputs"))
        self.emit(
            job,
            inputs=handle.inputs,
            event_type="START",
            run_id=run_id,
            dvc_stage=dvc_stage,
            facets=facets,
        )
        try:
            yield handle
        except BaseException as exc:
            handle._open = False
            state = "FAIL" if isinstance(exc, Exception) else "ABORT"
            message = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_MESSAGE]
            error = error_message_run.ErrorMessageRunFacet(
                message=message, programmingLanguage="python", producer=PRODUCER
            )
            event = LineageEvent(
                job=job,
                inputs=handle.inputs,
                outputs=handle.outputs,
                event_type=state,
                run_id=run_id,
                dvc_stage=dvc_stage,
                facets=facets,
            )
            try:
                self._write([(event, {"errorMessage": error})])
            except LineageError as lineage_exc:
                exc.add_note(f"lineage: the {state} event of run {run_id} was not recorded: {lineage_exc}")
            raise
        handle._open = False
        self.emit(
            job,
            inputs=handle.inputs,
            outputs=handle.outputs,
            event_type="COMPLETE",
            run_id=run_id,
            dvc_stage=dvc_stage,
            facets=facets,
        )

    def _write(self, batch: list[tuple[LineageEvent, dict[str, RunFacet]]]) -> list[str]:
        if not batch:
            return []
        git = self._git_facet()
        dvc_cache: dict[str, DvcRunFacet | None] = {}
        rows: list[dict[str, Any]] = []
        run_ids: list[str] = []
        for event, extra in batch:
            if event.dvc_stage is not None and event.dvc_stage not in dvc_cache:
                dvc_cache[event.dvc_stage] = self._dvc_facet(event.dvc_stage)
            dvc = dvc_cache.get(event.dvc_stage) if event.dvc_stage is not None else None
            row = self._row(event, git, dvc, extra)
            rows.append(row)
            run_ids.append(row["run_id"])
        try:
            data = pa.Table.from_pylist(rows, schema=SCHEMA)
            write_deltalake(
                self.table_uri,
                data,
                mode="append",
                name="lakewarden_lineage",
                description="OpenLineage run events (table-level lineage, no personal data)",
                configuration=_TABLE_CONFIGURATION,
                storage_options=self._storage_options,
                commit_properties=CommitProperties(
                    custom_metadata={
                        "lakewarden.operation": "lineage.emit",
                        "lakewarden.run_ids": ",".join(run_ids),
                    }
                ),
            )
        except (DeltaError, pa.ArrowException, OSError) as exc:
            raise self._error("cannot append lineage events", exc) from exc
        return run_ids

    def _row(
        self,
        event: LineageEvent,
        git: GitRunFacet | None,
        dvc: DvcRunFacet | None,
        extra: Mapping[str, RunFacet],
    ) -> dict[str, Any]:
        now = self._now()
        run_id = event.run_id or str(generate_new_uuid(now))
        run_facets: dict[str, RunFacet] = {}
        if git is not None:
            run_facets["lakewarden_git"] = git
        if dvc is not None:
            run_facets["lakewarden_dvc"] = dvc
        if event.facets:
            run_facets["lakewarden_details"] = DetailsRunFacet(
                details=dict(event.facets), producer=PRODUCER
            )
        run_facets.update(extra)
        try:
            ol_event = RunEvent(
                eventType=RunState(event.event_type),
                eventTime=now.isoformat(),
                run=Run(runId=run_id, facets=run_facets),
                job=Job(namespace=self.namespace, name=event.job),
                inputs=[self._ol_dataset(InputDataset, ref) for ref in event.inputs],
                outputs=[self._ol_dataset(OutputDataset, ref) for ref in event.outputs],
                producer=PRODUCER,
            )
            payload = Serde.to_json(ol_event)
        except (TypeError, ValueError) as exc:
            raise self._error("cannot build the OpenLineage event", exc) from exc
        return {
            "event_time": now,
            "run_id": run_id,
            "event_type": event.event_type,
            "job_namespace": self.namespace,
            "job_name": event.job,
            "inputs": [self._ref_row(ref) for ref in event.inputs],
            "outputs": [self._ref_row(ref) for ref in event.outputs],
            "git_commit": git.commit if git is not None else None,
            "dvc_stage": event.dvc_stage,
            "payload": payload,
        }

    def _ol_dataset(self, cls: type, ref: DatasetRef) -> Any:
        dataset_type, sub_type = _DATASET_TYPES[ref.kind]
        facets: dict[str, Any] = {
            "datasetType": dataset_type_dataset.DatasetTypeDatasetFacet(
                datasetType=dataset_type, subType=sub_type, producer=PRODUCER
            )
        }
        if ref.version is not None:
            facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=str(ref.version), producer=PRODUCER
            )
        return cls(namespace=ref.namespace or self.namespace, name=ref.name, facets=facets)

    def _ref_row(self, ref: DatasetRef) -> dict[str, Any]:
        return {
            "namespace": ref.namespace or self.namespace,
            "name": ref.name,
            "version": ref.version,
            "kind": ref.kind,
        }

    def _now(self) -> datetime:
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None:
            raise ValueError(f"clock must return an aware datetime, got {now!r}")
        return now.astimezone(timezone.utc)

    # ----------------------------------------------------------------- git and DVC

    def git_state(self) -> dict[str, Any]:
        """The commit runs are recorded against and whether the tree is dirty (None when unknown)."""
        facet = self._git_facet()
        return {"commit": facet.commit, "dirty": facet.dirty} if facet else {"commit": None, "dirty": None}

    def _git_facet(self) -> GitRunFacet | None:
        if self.repo_dir is None:
            return None
        head = _git(self.repo_dir, "rev-parse", "--verify", "--quiet", "HEAD")
        commit = head.strip() if head else ""
        if not _SHA.match(commit):
            return None  # not a repository, no commits yet, or git missing
        status = _git(self.repo_dir, "status", "--porcelain")
        dirty = None if status is None else bool(status.strip())
        return GitRunFacet(commit=commit, dirty=dirty, producer=PRODUCER)

    def _dvc_facet(self, stage: str) -> DvcRunFacet | None:
        if self.repo_dir is None:
            return None
        where, _, name = stage.rpartition(":")
        folder = Path(where) if where else Path()
        if folder.name == "dvc.yaml":
            folder = folder.parent
        lock_rel = folder / "dvc.lock"
        lock = self.repo_dir / lock_rel
        if not lock.is_file():
            return None
        try:
            doc = yaml.safe_load(lock.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise self._error(f"cannot read DVC lock file {lock}", exc) from exc
        stages = doc.get("stages") if isinstance(doc, dict) else None
        if not isinstance(stages, dict):
            raise self._error(f"DVC lock file {lock} has no 'stages' mapping")
        entry = stages.get(name)
        if entry is None:
            return None  # the stage has not completed under DVC yet
        if not isinstance(entry, dict):
            raise self._error(f"DVC lock file {lock}: stage {name!r} is not a mapping")
        return DvcRunFacet(
            stage=name,
            lockFile=lock_rel.as_posix(),
            deps=self._lock_entries(entry.get("deps"), lock, name),
            outs=self._lock_entries(entry.get("outs"), lock, name),
            producer=PRODUCER,
        )

    def _lock_entries(self, raw: Any, lock: Path, stage: str) -> list[dict[str, Any]]:
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(e, dict) and "path" in e for e in raw):
            raise self._error(f"DVC lock file {lock}: stage {stage!r} has malformed deps/outs")
        return [{k: e[k] for k in _LOCK_ENTRY_KEYS if k in e} for e in raw]

    # ----------------------------------------------------------------- reading

    def events(
        self,
        *,
        job: str | None = None,
        dataset: str | None = None,
        run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored events as dicts (table columns), oldest first.

        ``dataset`` matches a dataset name among inputs or outputs. An absent
        table reads as no events.

        Raises:
            LineageError: the table exists but cannot be read.
        """
        expr = None
        if job is not None:
            expr = _and(expr, pc.field("job_name") == job)
        if run_id is not None:
            expr = _and(expr, pc.field("run_id") == str(run_id))
        table = self._read(expr)
        if dataset is not None and table.num_rows:
            mask = pc.or_(
                _mentions(table.column("inputs"), dataset),
                _mentions(table.column("outputs"), dataset),
            )
            table = table.filter(mask)
        return _sorted(table).to_pylist()

    def upstream(self, name: str, *, version: int | None = None, depth: int | None = None) -> LineageGraph:
        """Everything ``name`` was derived from, following COMPLETE runs.

        A dataset's producers are the completed runs that list it as an output;
        their inputs are its parents. Inputs and outputs of all events of a run
        are merged, as OpenLineage prescribes.

        Args:
            name: dataset name (table, ``model:...``, ...).
            version: start only from runs that produced this version, and follow
                the exact input versions they recorded (provenance of one
                version); ``None`` walks by name over all versions.
            depth: maximum hops from ``name``; ``None`` for no limit.

        Raises:
            LineageError: the table cannot be read.
            ValueError: negative depth.
        """
        return self._walk(name, version=version, depth=depth, direction="upstream")

    def downstream(self, name: str, *, version: int | None = None, depth: int | None = None) -> LineageGraph:
        """Everything derived from ``name`` (consumers and their outputs), like :meth:`upstream`."""
        return self._walk(name, version=version, depth=depth, direction="downstream")

    def _walk(
        self,
        name: str,
        *,
        version: int | None,
        depth: int | None,
        direction: Literal["upstream", "downstream"],
    ) -> LineageGraph:
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 0):
            raise ValueError(f"depth must be a non-negative int or None, got {depth!r}")
        upstream = direction == "upstream"
        by_name: dict[str, list[tuple[_RunRecord, dict[str, Any]]]] = defaultdict(list)
        kinds: dict[str, str] = {}
        for record in self._completed_runs():
            for ref in record.inputs + record.outputs:
                kinds[ref["name"]] = ref["kind"]
            for anchor in record.outputs if upstream else record.inputs:
                by_name[anchor["name"]].append((record, anchor))

        versions: dict[str, set[int]] = defaultdict(set)
        depths: dict[str, int] = {name: 0}
        edges: dict[LineageEdge, None] = {}
        exact = version is not None
        seen: set[tuple[str, int | None]] = {(name, version)}
        frontier: list[tuple[str, int | None]] = [(name, version)]
        level = 0
        while frontier and (depth is None or level < depth):
            following: list[tuple[str, int | None]] = []
            for node, node_version in frontier:
                for record, anchor in by_name.get(node, ()):
                    if node_version is not None and anchor["version"] != node_version:
                        continue
                    if anchor["version"] is not None:
                        versions[node].add(anchor["version"])
                    for other in record.inputs if upstream else record.outputs:
                        near, far = (other, anchor) if upstream else (anchor, other)
                        edges[
                            LineageEdge(
                                source=near["name"],
                                target=far["name"],
                                job=record.job,
                                run_id=record.run_id,
                                source_version=near["version"],
                                target_version=far["version"],
                            )
                        ] = None
                        if other["version"] is not None:
                            versions[other["name"]].add(other["version"])
                        depths.setdefault(other["name"], level + 1)
                        state = (other["name"], other["version"] if exact else None)
                        if state not in seen:
                            seen.add(state)
                            following.append(state)
            frontier = following
            level += 1

        nodes = {
            n: LineageNode(name=n, kind=kinds.get(n), versions=frozenset(versions[n]), depth=d)
            for n, d in depths.items()
        }
        return LineageGraph(root=name, direction=direction, nodes=nodes, edges=tuple(edges))

    def completed_runs(self) -> list[LineageRun]:
        """Every run with a COMPLETE event, oldest first, inputs and outputs merged over its events.

        Raises:
            LineageError: the table cannot be read.
        """

        def refs(rows: tuple[dict[str, Any], ...]) -> tuple[DatasetRef, ...]:
            return tuple(DatasetRef(r["name"], version=r["version"], namespace=r["namespace"], kind=r["kind"]) for r in rows)

        return [LineageRun(r.run_id, r.job, refs(r.inputs), refs(r.outputs)) for r in self._completed_runs()]

    def _completed_runs(self) -> list[_RunRecord]:
        table = _sorted(
            self._read(None, columns=["event_time", "run_id", "event_type", "job_name", "inputs", "outputs"])
        )
        merged: dict[str, dict[str, Any]] = {}
        for row in table.to_pylist():
            run = merged.setdefault(
                row["run_id"], {"job": row["job_name"], "inputs": {}, "outputs": {}, "complete": False}
            )
            run["complete"] = run["complete"] or row["event_type"] == "COMPLETE"
            for side in ("inputs", "outputs"):
                for ref in row[side]:
                    run[side][(ref["namespace"], ref["name"], ref["version"])] = ref
        return [
            _RunRecord(
                run_id=run_id,
                job=run["job"],
                inputs=tuple(run["inputs"].values()),
                outputs=tuple(run["outputs"].values()),
            )
            for run_id, run in merged.items()
            if run["complete"]
        ]

    def _read(self, expr: Any, *, columns: list[str] | None = None) -> pa.Table:
        try:
            if not DeltaTable.is_deltatable(self.table_uri, storage_options=self._storage_options):
                return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
            dt = DeltaTable(self.table_uri, storage_options=self._storage_options)
            return dt.to_pyarrow_dataset().to_table(filter=expr, columns=columns)
        except (DeltaError, pa.ArrowException, OSError) as exc:
            raise self._error("cannot read lineage events", exc) from exc

    def _error(self, what: str, cause: BaseException | None = None) -> LineageError:
        message = f"lineage table {self.table_uri}: {what}"
        if cause is not None:
            message += f": {cause}"
        return LineageError(
            message,
            hint="check that the path is a writable Delta table created by Lakewarden",
            table_uri=self.table_uri,
        )


# --------------------------------------------------------------------------- helpers


def _git(cwd: Path, *args: str) -> str | None:
    """Run git in ``cwd``; ``None`` when git is missing, times out or fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")}
    env["GIT_OPTIONAL_LOCKS"] = "0"  # never take index.lock just to look
    env["LC_ALL"] = "C"
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            ["git", *args],  # noqa: S607
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _and(left: Any, right: Any) -> Any:
    return right if left is None else left & right


def _mentions(column: pa.ChunkedArray, dataset: str) -> pa.Array:
    """Boolean mask: which rows of a list<struct<name,...>> column name ``dataset``."""
    n = len(column)
    flat = pc.list_flatten(column)
    parents = pc.list_parent_indices(column)
    hits = pc.filter(parents, pc.equal(pc.struct_field(flat, "name"), dataset))
    return pc.is_in(pa.array(range(n), type=pa.int64()), value_set=pc.unique(pc.cast(hits, pa.int64())))


def _sorted(table: pa.Table) -> pa.Table:
    """Order by event_time, then lifecycle (START before COMPLETE), then run id."""
    if table.num_rows == 0:
        return table
    rank = pc.index_in(table.column("event_type"), value_set=pa.array(EVENT_TYPES))
    keys = [("event_time", "ascending"), ("__rank", "ascending"), ("run_id", "ascending")]
    return table.append_column("__rank", rank).sort_by(keys).drop_columns(["__rank"])


# --------------------------------------------------------------------------- rendering


def render_tree(
    graph: LineageGraph,
    root: str | None = None,
    direction: Literal["upstream", "downstream"] | None = None,
) -> Tree:
    """A rich ``Tree`` of ``graph`` from ``root`` (defaults: the graph's own root/direction).

    Each line shows a dataset, its versions and kind, and the job(s) and run(s)
    that link it to its parent line. A dataset reached twice is expanded once
    (later lines say "see above"); a dataset on its own path is marked as a cycle.
    """
    root = root or graph.root
    direction = direction or graph.direction
    arrow = "<-" if direction == "upstream" else "->"
    root_label = _node_label(graph, root)
    if root not in graph.nodes or not graph.children(root, direction):
        root_label.append(f"  (no {direction} lineage recorded)", style="dim")
    tree = Tree(root_label)
    expanded = {root}

    def grow(branch: Tree, name: str, path: frozenset[str]) -> None:
        by_child: dict[str, list[LineageEdge]] = defaultdict(list)
        for edge in graph.children(name, direction):
            by_child[edge.source if direction == "upstream" else edge.target].append(edge)
        for child in sorted(by_child):
            label = _node_label(graph, child)
            runs: dict[str, list[str]] = defaultdict(list)
            for edge in by_child[child]:
                short = "…" + edge.run_id[-8:]  # UUIDv7 ids share their leading (time) digits
                if short not in runs[edge.job]:
                    runs[edge.job].append(short)
            via = ", ".join(f"{job} (run {', '.join(ids)})" for job, ids in sorted(runs.items()))
            label.append(f"  {arrow} {via}", style="cyan")
            if child in path:
                label.append("  (cycle)", style="yellow")
                branch.add(label)
            elif child in expanded:
                label.append("  (see above)", style="dim")
                branch.add(label)
            else:
                expanded.add(child)
                grow(branch.add(label), child, path | {child})

    grow(tree, root, frozenset({root}))
    return tree


def _node_label(graph: LineageGraph, name: str) -> Text:
    node = graph.nodes.get(name)
    label = Text(name, style="bold")
    if node is not None and node.versions:
        label.append("  v" + ", v".join(str(v) for v in sorted(node.versions)), style="green")
    if node is not None and node.kind:
        label.append(f"  [{node.kind}]", style="dim")
    return label
