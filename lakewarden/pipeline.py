"""The reference pipeline's stages, as ``dvc repro`` runs them (see dvc.yaml and params.yaml).

Each stage is one function here and one ``lakewarden pipeline <stage>`` command in dvc.yaml.
Every stage asks the policy gate before it touches data (a deny raises AccessDenied, the
command exits 3 naming the rule, and ``dvc repro`` stops there; the audit log holds the
decision).

Which data: params.yaml names the datasets and each one's source (``synthetic``, or files and
globs of CSV, Parquet, JSON Lines), and the model (features, label, purpose). Nothing here names
a dataset or a column: the subject key comes from the dataset's policy, the model's dataset from
its features. dvc.yaml follows from params.yaml and the policies (:mod:`lakewarden.dvcyaml`); a
stage run by DVC refuses a stale one. The ``sources`` stage runs on every ``dvc repro`` and
rewrites its record only when a landing file is new or changed, so nothing downstream reruns
when none is (see :func:`stage_sources`).

What DVC versions. The Delta tables are *not* DVC outputs: each stage writes a small
manifest (``pipeline/<stage>.json``: table URI, Delta version, the version's data files with
their sizes, row counts, the lineage run id, the git commit) and DVC caches that. Why:

* reproduction — a Delta version is already an immutable snapshot; the manifest pins it,
  and ``lakewarden pipeline checkout`` (after ``git checkout <rev> && dvc checkout``) reads
  the tables back as of those versions. A directory output would be rehashed and copied
  whole on every run, and ``dvc repro`` deletes non-``persist`` outputs before a stage runs,
  which an appending Delta table cannot survive;
* erasure — DVC's cache and remotes cannot forget one record (``dvc gc`` works on whole
  objects). Manifests hold no personal data, so nothing DVC keeps ever needs erasing; the
  tables stay under the lakehouse's own erasure (row deletes, crypto-shredding, VACUUM).
  Time travel to a manifest's version shows no erased subject: the checkout drops rows
  whose subject key is shredded, and their encrypted values could not be opened anyway.

Model artifacts are real DVC outputs (``pipeline/candidate/``): weights, encoder, drift
reference — no rows, no identifiers. Metrics (ε, utility, fairness) and the privacy–utility
curve (ε spent vs holdout AUC per epoch) are DVC metrics and plots under ``reports/``.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import json
import os
import socket
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from governance._files import FieldError, validate_file
from governance.errors import ConfigError, LakewardenError
from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace

PARAMS = Path("params.yaml")
OUT = Path("pipeline")
REPORTS = Path("reports")
SYNTHETIC = "synthetic"


class PipelineError(LakewardenError):
    exit_code = 2


# -- params.yaml ---------------------------------------------------------------------------
class _P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticParams(_P):
    """The generator's knobs, for datasets whose source is ``synthetic`` (fictional people)."""

    people: int = Field(20_000, ge=10)
    transactions_per_person: float = Field(5.0, ge=0)
    bad_rows: float = Field(0.01, ge=0, le=0.5)
    bias: float = Field(0.2, ge=0, le=1)
    seed: int = Field(7, ge=0)
    landing: str = ".lakewarden/landing"


class TrainParams(_P):
    model: str = "credit"
    purpose: str = "credit_scoring"
    features: list[str] = Field(min_length=1)
    label: str = "defaulted"
    epsilon: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(512, ge=1)
    learning_rate: float = Field(0.002, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    holdout: float = Field(0.2, gt=0, lt=1)
    mitigation: Literal["none", "reweighing"] = "reweighing"
    seed: int = 0


class DeployParams(_P):
    smoke_requests: int = Field(20, ge=1, le=10_000)
    manifests: str = "pipeline/deploy"


_GLOB = set("*?[")


def _check_pattern(pattern: str) -> None:
    """A file or glob: not empty, and a file type ingest reads when its name says one."""
    if not pattern.strip():
        raise ValueError("a source is a file or glob such as 'data/applicants*.csv', not an empty string")
    name, suffix = Path(pattern).name, Path(pattern).suffix
    if _GLOB & set(suffix) or (not suffix and _GLOB & set(name)):
        return  # e.g. 'data/*': each matched file's type is checked by the sources stage
    from lakehouse.readers import detect_format

    detect_format(Path(pattern))  # IngestError naming the type and the readable ones


class Params(_P):
    """params.yaml: each dataset's source, the generator, training and deployment.

    ``sources`` maps each governed dataset to ``synthetic`` (the fictional generator, for the
    datasets it writes) or to a file or glob of CSV, Parquet or JSON Lines files (or a list of
    them), relative to the params file's folder. Validated with the workspace's policies as
    context (:func:`load_params`): every dataset has a policy, the training features read one of
    them, and the label is a column of it.
    """

    sources: dict[str, str | list[str]] = Field(min_length=1)
    synthetic: SyntheticParams = SyntheticParams()
    train: TrainParams
    deploy: DeployParams = DeployParams()
    _path: Path = PrivateAttr(default=PARAMS)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "data" in data:
            raise FieldError(("data",), "'data:' is now 'synthetic:' (the generator's knobs), and 'sources:' names "
                                        "each dataset's source (e.g. sources: {my_dataset: 'data/my_dataset*.csv'}); "
                                        "see docs/your-own-data.md")
        return data

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: dict[str, str | list[str]], info: ValidationInfo) -> dict[str, str | list[str]]:
        from lakehouse.errors import IngestError
        from lakehouse.synth import DATASETS as GENERATED

        known = (info.context or {}).get("datasets")
        for ds, spec in v.items():
            if known is not None and ds not in known:
                raise FieldError((ds,), f"no policy governs dataset '{ds}': write one (kind: dataset, dataset: {ds}) "
                                        f"under policies/ — `lakewarden policy suggest FILE` drafts it from a sample "
                                        f"(policies govern: {', '.join(sorted(known)) or 'none'})")
            items = [spec] if isinstance(spec, str) else spec
            if not items:
                raise FieldError((ds,), "an empty list: name a file, a glob or 'synthetic'")
            if SYNTHETIC in items:
                if len(items) > 1:
                    raise FieldError((ds,), "'synthetic' is a source on its own, not one in a list of files")
                if ds not in GENERATED:
                    raise FieldError((ds,), f"the generator writes {', '.join(GENERATED)}, not '{ds}': "
                                            "name its files or a glob instead of 'synthetic'")
                continue
            for i, pattern in enumerate(items):
                try:
                    _check_pattern(pattern)
                except (ValueError, IngestError) as exc:
                    raise FieldError((ds,) if isinstance(spec, str) else (ds, i), str(exc)) from None
        return v

    @model_validator(mode="after")
    def _model_dataset(self, info: ValidationInfo) -> "Params":
        policies = (info.context or {}).get("policies")
        if policies is None:
            return self
        try:
            ds = model_dataset(policies, self.train.features)
        except ValueError as exc:
            raise FieldError(("train", "features"), str(exc)) from None
        if ds not in self.sources:
            raise FieldError(("train", "features"), f"the features read dataset '{ds}', which sources does not name: "
                                                     f"add it (sources: {{{ds}: <file or glob>}})")
        if self.train.label not in policies.dataset(ds).columns:
            raise FieldError(("train", "label"), f"'{self.train.label}' is not a column of dataset '{ds}' "
                                                  "(the dataset the features read)")
        return self

    @property
    def datasets(self) -> list[str]:
        """The pipeline's datasets, in the order params.yaml names them (ingest reads them so)."""
        return list(self.sources)

    @property
    def root(self) -> Path:
        """The folder sources are relative to (params.yaml's, where dvc.yaml is)."""
        return self._path.resolve().parent

    def patterns(self, ds: str) -> list[str]:
        spec = self.sources[ds]
        return [spec] if isinstance(spec, str) else list(spec)

    def synthetic_datasets(self) -> list[str]:
        return [ds for ds in self.sources if self.sources[ds] == SYNTHETIC]


def model_dataset(policies: Any, features: list[str]) -> str:
    """The dataset whose feature views the training features name (one dataset per model)."""
    owners = {view: pol.dataset for pol in policies.datasets.values() for view in pol.features}
    found = set()
    for ref in features:
        view, sep, feat = ref.partition(":")
        if not sep or not feat:
            raise ValueError(f"feature reference {ref!r} must look like view:feature")
        if view not in owners:
            raise ValueError(f"no policy defines feature view '{view}' (views: {', '.join(sorted(owners)) or 'none'})")
        found.add(owners[view])
    if len(found) > 1:
        raise ValueError(f"a model reads one dataset's features (got {', '.join(sorted(found))})")
    return found.pop()


def load_params(path: Path = PARAMS, ws: Workspace | None = None) -> Params:
    """Read and validate the params file; with a workspace, also against its policies."""
    if not path.exists():
        raise PipelineError(f"{path} not found: run from the repository root (where dvc.yaml is)")
    context = None
    if ws is not None:
        pols = ws.policies
        context = {"datasets": set(pols.datasets), "policies": pols}
    params = validate_file(Params, path, error=ConfigError, context=context)
    params._path = path
    return params


def params_error(params: Params, loc: tuple[Any, ...], message: str, **kw: Any) -> ConfigError:
    """A ConfigError about one place in the params file, naming its line."""
    from governance._files import locate, read_yaml

    _, node = read_yaml(params._path)
    field = ".".join(str(p) for p in loc)
    return ConfigError(message, path=str(params._path), field=field, line=locate(node, loc), **kw)


# -- manifests -----------------------------------------------------------------------------
def table_manifest(ws: Workspace, layer: str, dataset: str) -> dict[str, Any]:
    """A Delta table version, pinned: URI, version, the version's data files and sizes, rows."""
    from lakehouse.catalog import Catalog, TableRef

    cat = Catalog(ws.config)
    dt = cat.open(TableRef(layer, dataset))  # type: ignore[arg-type]
    import pyarrow as pa

    adds = pa.table(dt.get_add_actions(flatten=True)).to_pydict()
    files = sorted(zip(adds["path"], adds["size_bytes"], adds["num_records"]))
    listing = "\n".join(f"{p}\t{s}" for p, s, _ in files)
    return {
        "table": f"{layer}.{dataset}",
        "uri": os.path.relpath(cat.uri(TableRef(layer, dataset)), ws.config.base_dir),  # type: ignore[arg-type]
        "version": dt.version(),
        "rows": int(sum(int(n or 0) for _, _, n in files)),
        "files": len(files),
        "bytes": int(sum(int(s) for _, s, _ in files)),
        "files_digest": hashlib.sha256(listing.encode()).hexdigest(),
    }


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path, *, stage: str) -> Any:
    if not path.exists():
        raise PipelineError(f"{path} not found: run the '{stage}' stage first (dvc repro {stage})")
    return json.loads(path.read_text())


def _manifest(ws: Workspace, stage: str, run_id: str | None, **body: Any) -> dict[str, Any]:
    return {"stage": stage, "lineage_run_id": run_id, "git": ws.lineage.git_state(),
            "finished_at": datetime.now(timezone.utc).isoformat(), **body}


def _require_pinned(ws: Workspace, tables: dict[str, Any], *, stage: str) -> None:
    """The tables an upstream manifest pins must exist in this workspace at (at least) that version.

    DVC restores a manifest from its cache when its stage's inputs did not change; if the
    workspace was reset meanwhile, the manifest points at tables that are gone.
    """
    from lakehouse.catalog import Catalog, TableRef

    cat = Catalog(ws.config)
    for name, m in tables.items():
        layer, ds = name.split(".", 1)
        ref = TableRef(layer, ds)  # type: ignore[arg-type]
        if not cat.exists(ref) or cat.open(ref).version() < int(m["version"]):
            raise PipelineError(
                f"pipeline/{stage}.json pins {name}@{m['version']}, which this workspace does not hold "
                "(was the workspace reset?)",
                hint="rebuild from the start: dvc repro --force (or make clean-demo && make demo)",
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- sources: each dataset's landing files ------------------------------------------------
SOURCES = OUT / "sources.json"


def _ingested_record(ws: Workspace) -> Path:
    """Landing files this workspace has ingested, by dataset and sha256 (outside DVC's outputs: kept across runs)."""
    return ws.config.workspace_dir / "pipeline" / "ingested.json"


def _ingested(ws: Workspace) -> dict[str, Any]:
    path = _ingested_record(ws)
    return json.loads(path.read_text()) if path.exists() else {}


def _already_ingested(seen: dict[str, Any], ds: str, sha256: str) -> dict[str, Any] | None:
    return seen.get(f"{ds}/{sha256}") or seen.get(sha256)  # bare digests: records written before datasets were named


def _remember_ingested(ws: Workspace, ds: str, sha256: str, report: dict[str, Any]) -> None:
    seen = _ingested(ws)
    seen[f"{ds}/{sha256}"] = report
    write_json(_ingested_record(ws), seen)


def _shown(params: Params, path: Path) -> str:
    """How manifests name a landing file: its path relative to the repository, PII-redacted."""
    from governance.pii import redact

    return redact(os.path.relpath(path, params.root))[0]


def _synthetic_file(ws: Workspace, params: Params, ds: str) -> Path:
    return ws.config.path(params.synthetic.landing) / f"{ds}.csv"  # generate()'s default format


def _match(params: Params, ds: str, *, known: bool) -> list[Path]:
    """The files ``ds``'s source names now, globs in sorted order. A pattern that matches nothing is
    an error unless files of ``ds`` were ingested before (``landing: remove`` deletes them)."""
    from governance.pii import redact
    from lakehouse.errors import IngestError
    from lakehouse.readers import detect_format

    out: list[Path] = []
    spec = params.sources[ds]
    for i, pattern in enumerate(params.patterns(ds)):
        loc = ("sources", ds) if isinstance(spec, str) else ("sources", ds, i)
        full = Path(pattern) if os.path.isabs(pattern) else params.root / pattern
        if _GLOB & set(pattern):
            hits = sorted(Path(m) for m in globmod.glob(str(full), recursive=True) if Path(m).is_file())
        elif full.is_dir():
            raise params_error(params, loc, f"'{pattern}' is a folder: name its files or a glob such as '{pattern}/*.csv'")
        else:
            hits = [full] if full.is_file() else []
        if not hits and not known:
            raise params_error(params, loc, f"'{pattern}' matches no file (paths are relative to {params._path.name}'s folder)")
        for h in hits:
            try:
                detect_format(h)
            except IngestError as exc:
                raise params_error(params, loc, f"'{pattern}' matches {_shown(params, h)}, which ingest cannot read "
                                                f"({redact(exc.message)[0]})") from None
        out.extend(hits)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def _tracked(root: Path, files: list[Path]) -> list[Path]:
    """Those of ``files`` that git tracks (landing files hold personal data: never in git)."""
    import subprocess

    inside = [f.resolve() for f in files if f.resolve().is_relative_to(root)]
    if not inside:
        return []
    try:
        r = subprocess.run(["git", "ls-files", "-z", "--", *(str(f.relative_to(root)) for f in inside)],
                           cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [root / x for x in r.stdout.split("\0") if x] if r.returncode == 0 else []


def _synthetic_fingerprint(params: Params) -> dict[str, Any]:
    import lakehouse.synth

    return {"params": params.synthetic.model_dump(), "code": _sha256(Path(lakehouse.synth.__file__))}


def _generate_if_needed(ws: Workspace, params: Params, prev: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    """Run the generator when its params or code changed since it last ran here, or when a file it
    wrote is gone without having been ingested; return the datasets it wrote (none when it did not run)."""
    synthetic = params.synthetic_datasets()
    if not synthetic:
        return []
    record = ws.config.workspace_dir / "pipeline" / "synthetic.json"
    fingerprint = _synthetic_fingerprint(params)
    last = json.loads(record.read_text()) if record.exists() else None
    prev_ds = prev.get("datasets") or {}

    def lost(ds: str) -> bool:
        f = _synthetic_file(ws, params, ds)
        return not f.exists() and not any(e["path"] == _shown(params, f) and _already_ingested(seen, ds, e["sha256"])
                                          for e in (prev_ds.get(ds) or {}).get("files", []))

    if last == fingerprint and not any(lost(ds) for ds in synthetic):
        return []
    from lakehouse.synth import generate

    p = params.synthetic
    res = generate(ws.config.path(p.landing), people=p.people, transactions_per_person=p.transactions_per_person,
                   seed=p.seed, bias=p.bias, bad_rows=p.bad_rows, overwrite=True)
    write_json(record, fingerprint)
    return sorted(res.files)


def stage_sources(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Each dataset's landing files, each recorded by path (PII-redacted) and sha256 in
    pipeline/sources.json: the generator's files for a ``synthetic`` source (it runs only when its
    params or code changed), the matches of each file or glob otherwise.

    DVC runs this stage every time (``always_changed``). Its output is ``persist``: the stage reads
    its last record and rewrites it only when the files changed, so ``dvc repro`` re-ingests new or
    changed landing files and runs nothing downstream when there are none. Files ingested before
    stay recorded after ingest removed them (``landing: remove``) — the record says what bronze
    holds — and an erasure's rewrite of a kept file is not a new file.
    """
    from lakehouse.landing import is_erasure_rewrite

    for ds in params.datasets:
        ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(ds))
    prev = json.loads(SOURCES.read_text()) if SOURCES.exists() else {}
    prev_ds = prev.get("datasets") or {}
    seen = _ingested(ws)
    generated = _generate_if_needed(ws, params, prev, seen)
    found: dict[str, list[Path]] = {}
    known: dict[str, list[dict[str, Any]]] = {}  # recorded before and ingested since: what bronze holds
    for ds in params.datasets:
        known[ds] = [e for e in (prev_ds.get(ds) or {}).get("files", []) if _already_ingested(seen, ds, e["sha256"])]
        if params.sources[ds] == SYNTHETIC:
            f = _synthetic_file(ws, params, ds)
            found[ds] = [f] if f.is_file() else []
        else:
            found[ds] = _match(params, ds, known=bool(known[ds]))
    tracked = _tracked(params.root, [f for ds in params.datasets for f in found[ds]])
    if tracked:
        raise PipelineError(f"{_shown(params, tracked[0])} is tracked by git: landing files hold personal data and stay "
                            "out of git and DVC", hint="git rm --cached it and list its folder in .gitignore")
    datasets: dict[str, Any] = {}
    for ds in params.datasets:
        entries = {(e["path"], e["sha256"]): e for e in known[ds]}
        for f in found[ds]:
            sha, shown = _sha256(f), _shown(params, f)
            if (shown, sha) in entries or is_erasure_rewrite(ws, ds, f):
                continue  # recorded already, or an erasure's rewrite of a kept file (its rows were ingested)
            entries[(shown, sha)] = {"path": shown, "sha256": sha, "bytes": f.stat().st_size}
        datasets[ds] = {"files": [entries[k] for k in sorted(entries)]}
    counts = {ds: len(d["files"]) for ds, d in datasets.items()}
    if prev.get("datasets") == datasets:
        return {"changed": False, "files": counts, "generated": generated}
    run = ws.lineage.emit("pipeline.sources", outputs=[], dvc_stage="sources",
                          facets={"files": {ds: [e["sha256"] for e in d["files"]] for ds, d in datasets.items()},
                                  "generated": generated})
    write_json(SOURCES, _manifest(ws, "sources", run, datasets=datasets))
    return {"changed": True, "files": counts, "generated": generated}


def _find(ws: Workspace, params: Params, ds: str, entry: dict[str, Any]) -> Path | None:
    """The landing file a sources.json entry records, if it is still there with that content."""
    direct = params.root / entry["path"]
    if direct.is_file() and _sha256(direct) == entry["sha256"]:
        return direct
    cands = ([_synthetic_file(ws, params, ds)] if params.sources[ds] == SYNTHETIC
             else _match(params, ds, known=True))  # a redacted name: find the file by its content
    return next((f for f in cands if f.is_file() and f != direct and _sha256(f) == entry["sha256"]), None)


_COUNTS = ("rows_read", "rows_accepted", "rows_quarantined", "rows_skipped")


def stage_ingest(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Ingest each landing file pipeline/sources.json records and this workspace has not ingested
    yet (by sha256) into bronze, vault and quarantine. Exactly once twice over: files already
    ingested are skipped here, and ingest's batch ledger skips any batch it has committed before."""
    from governance.lineage import DatasetRef
    from lakehouse.ingest import ingest

    man = read_json(SOURCES, stage="sources")
    seen = _ingested(ws)
    files: dict[str, list[dict[str, Any]]] = {}
    reports: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, Any] = {}
    for ds in params.datasets:
        entries = ((man.get("datasets") or {}).get(ds) or {}).get("files")
        if entries is None:
            raise PipelineError(f"{SOURCES} records no files of '{ds}': run the sources stage first (dvc repro)")
        ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(ds))
        files[ds], reports[ds] = [], []
        for e in entries:
            done = _already_ingested(seen, ds, e["sha256"])
            status = "ingested earlier"
            if done is None:
                path = _find(ws, params, ds, e)
                if path is None:
                    raise PipelineError(f"{e['path']} ({ds}, sha256 {e['sha256'][:12]}…) is gone or changed since the "
                                        "sources stage recorded it, and was never ingested",
                                        hint="run dvc repro again: the sources stage records what is there now")
                rep = ingest(ws, actor, ds, [path])
                if not all(fr.balanced for fr in rep.files):
                    raise PipelineError(f"{e['path']}: rows read do not add up to accepted + quarantined + skipped")
                done = rep.to_dict()
                _remember_ingested(ws, ds, e["sha256"], done)
                seen = _ingested(ws)
                reports[ds].append(done)
                status = "ingested"
            files[ds].append({"path": e["path"], "sha256": e["sha256"], "status": status,
                              **{k: done.get(k) for k in _COUNTS}})
        summary[ds] = {"files": len(files[ds]), "files_new": sum(f["status"] == "ingested" for f in files[ds]),
                       **{k: sum(int(f[k] or 0) for f in files[ds]) for k in _COUNTS}}
    tables = {f"{layer}.{ds}": table_manifest(ws, layer, ds) for ds in params.datasets
              for layer in ("bronze", "quarantine", "vault") if _exists(ws, layer, ds)}
    run = ws.lineage.emit("pipeline.ingest", dvc_stage="ingest",
                          outputs=[DatasetRef(t, version=m["version"]) for t, m in tables.items()])
    write_json(REPORTS / "ingest.json", summary)
    write_json(OUT / "ingest.json", _manifest(ws, "ingest", run, tables=tables, files=files, reports=reports))
    return summary


def _exists(ws: Workspace, layer: str, ds: str) -> bool:
    from lakehouse.catalog import Catalog, TableRef

    return Catalog(ws.config).exists(TableRef(layer, ds))  # type: ignore[arg-type]


def stage_silver(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Rebuild silver (dedupe, impute, standardize, derive) from the bronze versions just pinned."""
    from governance.lineage import DatasetRef
    from lakehouse.silver import build_silver

    _require_pinned(ws, read_json(OUT / "ingest.json", stage="ingest")["tables"], stage="ingest")
    out = {}
    for ds in params.datasets:
        rep = build_silver(ws, actor, ds)
        out[f"silver.{ds}"] = {**table_manifest(ws, "silver", ds), "bronze_version": rep.bronze_version}
    run = ws.lineage.emit("pipeline.silver", dvc_stage="silver",
                          outputs=[DatasetRef(t, version=m["version"]) for t, m in out.items()])
    write_json(OUT / "silver.json", _manifest(ws, "silver", run, tables=out))
    return out


def _dataset_of(ws: Workspace, features: list[str]) -> tuple[str, list[str]]:
    from features.store import Features

    pol, cols = Features(ws)._resolve(features)
    return pol.dataset, cols


def stage_features(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Register the feature views with Feast, materialize the online store, and check that the
    training features are allowed for the training purpose (the gate, before any training)."""
    from features.store import Features
    from governance.lineage import DatasetRef

    silver = read_json(OUT / "silver.json", stage="silver")
    _require_pinned(ws, silver["tables"], stage="silver")
    t = params.train
    dataset, cols = _dataset_of(ws, t.features)
    decision = ws.gate.enforce(Stage.FEATURES, actor, Resource.dataset(dataset),
                               {"purpose": t.purpose, "columns": [*cols, t.label]})
    fs = Features(ws)
    names = fs.apply(actor)
    versions = fs.materialize(actor)
    run = ws.lineage.emit("pipeline.features", dvc_stage="features",
                          inputs=[DatasetRef(k, version=v["version"]) for k, v in silver["tables"].items()],
                          outputs=[DatasetRef(f"feature_view:{v}", version=n, kind="feature_view") for v, n in versions.items()])
    body = {"objects": names, "materialized": versions, "purpose": t.purpose, "dataset": dataset, "features": t.features,
            "gate": {"allowed": decision.allowed, "rules": list(decision.rule_ids)}}
    write_json(OUT / "features.json", _manifest(ws, "features", run, **body))
    return body


def _options(t: TrainParams):  # noqa: ANN202
    from training.trainer import TrainOptions

    return TrainOptions(hidden=tuple(t.hidden), epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                        max_grad_norm=t.max_grad_norm, target_epsilon=t.epsilon, delta=t.delta, seed=t.seed)


CANDIDATE_DIR = OUT / "candidate"


def stage_train(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """One DP-SGD run into the candidate folder; ε and utility as DVC metrics, the curve as a plot."""
    from training.flow import fit_candidate

    read_json(OUT / "features.json", stage="features")
    t = params.train
    cand = fit_candidate(ws, actor, CANDIDATE_DIR, name=t.model, features=t.features, label=t.label, purpose=t.purpose,
                         options=_options(t), holdout=t.holdout, mitigation=t.mitigation)
    write_json(CANDIDATE_DIR / "stage.json", _manifest(ws, "train", cand["lineage_run_ids"][-1], model=t.model,
                                                        data_versions=cand["data_versions"]))
    metrics = {"epsilon": cand["privacy"]["epsilon"], "delta": cand["privacy"]["delta"],
               "target_epsilon": t.epsilon, **{k: v for k, v in cand["utility"].items()},
               "rows_train": cand["rows"]["train"], "rows_holdout": cand["rows"]["holdout"]}
    if cand.get("cost"):  # what the build cost of the dataset's budget, from the ledger (the card states it too)
        metrics |= {"epsilon_spent": cand["cost"]["epsilon"], "delta_spent": cand["cost"]["delta"]}
    write_json(REPORTS / "train.json", metrics)
    write_json(REPORTS / "privacy_utility.json",
               [{"epoch": p["epoch"], "epsilon": round(p["epsilon"], 4), "auc": p["auc"], "log_loss": p["log_loss"]}
                for p in cand["curve"]])
    return metrics


def stage_evaluate(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Fairness of the candidate on its holdout, against the policy's thresholds (a DVC metric)."""
    from training.flow import evaluate_candidate

    fair = evaluate_candidate(ws, actor, CANDIDATE_DIR, OUT / "evaluation.json")
    write_json(OUT / "evaluation.json", {**fair, **_manifest(ws, "evaluate", fair.get("lineage_run_id"))})
    flat: dict[str, Any] = {"passed": fair["passed"], "failures": fair.get("failures", []),
                            "favourable_label": fair["favourable_label"]}  # which outcome "selected" means
    if fair.get("uncertainty"):
        flat["pass_rate"] = fair["uncertainty"]["pass_rate"]  # share of bootstrap resamples that pass
    for attr, ms in (fair.get("metrics") or {}).items():
        for m, v in ms.items():
            flat[f"{attr}.{m}"] = v
    write_json(REPORTS / "fairness.json", flat)
    return flat


def stage_register(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """Register the evaluated candidate; its card holds ε, utility, fairness and lineage."""
    from governance.lineage import DatasetRef
    from training.registry import Registry
    from training.flow import register_candidate

    ref = register_candidate(ws, actor, CANDIDATE_DIR, OUT / "evaluation.json")
    card = Registry(ws).card(ref)
    run = ws.lineage.emit("pipeline.register", dvc_stage="register",
                          outputs=[DatasetRef(f"model:{ref.name}", version=ref.version, kind="model")],
                          facets={"model": str(ref)})
    body = {"model": ref.name, "version": ref.version, "ref": str(ref), "dataset": card.dataset,
            "data_versions": card.data_versions,
            "fairness_passed": card.fairness.passed if card.fairness else None, "epsilon": card.privacy.epsilon}
    write_json(OUT / "register.json", _manifest(ws, "register", run, **body))
    return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stage_deploy(ws: Workspace, actor: Actor, params: Params) -> dict[str, Any]:
    """The deploy gate (approval, ε cap, fairness), then: render and validate the KServe
    InferenceService, start the predictor locally, send smoke requests, stop it."""
    import signal

    from governance.lineage import DatasetRef
    from serving.deploy import deploy
    from training.registry import Registry

    reg = read_json(OUT / "register.json", stage="register")
    ref = reg["ref"]
    rendered = deploy(ws, actor, ref, target="k8s", out_dir=ws.config.base_dir / params.deploy.manifests)
    port = _free_port()
    local = deploy(ws, actor, ref, target="local", port=port)
    try:
        smoke = _smoke(ws, local["url"], reg["model"], Registry(ws).card(ref).dataset, params.deploy.smoke_requests)
    finally:
        try:
            os.killpg(local["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    run = ws.lineage.emit("pipeline.deploy", dvc_stage="deploy",
                          inputs=[DatasetRef(f"model:{reg['model']}", version=reg["version"], kind="model")],
                          facets={"manifest": os.path.relpath(rendered["manifest"], ws.config.base_dir), **smoke})
    body = {"model": reg["model"], "version": reg["version"], "ref": ref,
            "manifest": os.path.relpath(rendered["manifest"], ws.config.base_dir), "smoke": smoke}
    write_json(REPORTS / "deploy.json", {"smoke_ok": smoke["ok"], "smoke_requests": smoke["requests"],
                                         "p50_ms": smoke["p50_ms"]})
    if smoke["ok"] != smoke["requests"]:
        raise PipelineError(f"smoke test: {smoke['requests'] - smoke['ok']} of {smoke['requests']} requests failed "
                            f"(see .lakewarden/serving/{reg['model']}-server.log)")
    write_json(OUT / "deploy.json", _manifest(ws, "deploy", run, **body))
    return body


def _smoke(ws: Workspace, url: str, model: str, dataset: str, n: int) -> dict[str, Any]:
    """V1 predict requests for real subject tokens of the model's dataset (its silver table, by the
    policy's subject key); every one must answer 200 with a score."""
    import time

    from lakehouse.catalog import Catalog, TableRef

    key = ws.policies.dataset(dataset).subject_key
    tokens = Catalog(ws.config).open(TableRef("silver", dataset)).to_pyarrow_table(columns=[key])
    tokens = [t for t in tokens[key].to_pylist() if t][:n]
    ok, lat = 0, []
    for tok in tokens:
        body = json.dumps({"instances": [{key: tok}]}).encode()
        req = urllib.request.Request(f"{url}/v1/models/{model}:predict", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                out = json.loads(r.read())
                if r.status == 200 and out.get("predictions"):
                    ok += 1
        except (OSError, ValueError):
            pass
        lat.append((time.perf_counter() - t0) * 1000)
    lat.sort()
    return {"requests": len(tokens), "ok": ok, "p50_ms": round(lat[len(lat) // 2], 2) if lat else None}


STAGES = {"sources": stage_sources, "ingest": stage_ingest, "silver": stage_silver, "features": stage_features,
          "train": stage_train, "evaluate": stage_evaluate, "register": stage_register, "deploy": stage_deploy}


class StageFailed(LakewardenError):
    """A stage broke on something that is not a user error: the message names the stage, the error
    and the file holding the traceback."""


def _outcome_path(ws: Workspace, stage: str) -> Path:
    return ws.config.workspace_dir / "pipeline" / "outcomes" / f"{stage}.json"


def stage_outcome(ws: Workspace, stage: str) -> dict[str, Any] | None:
    """How ``stage`` last ended: ``status`` ok, denied (by the gate: ``rule_ids``), failed (a user
    error) or crashed (``traceback`` names the file), with ``message`` and ``at``; None if never run."""
    p = _outcome_path(ws, stage)
    return json.loads(p.read_text()) if p.exists() else None


def _record_outcome(ws: Workspace, stage: str, status: str, message: str = "", **extra: Any) -> None:
    from governance.pii import redact

    write_json(_outcome_path(ws, stage), {"stage": stage, "status": status, "message": redact(message)[0],
                                          "at": datetime.now(timezone.utc).isoformat(), **extra})


def is_fairness_rule(rule_id: str) -> bool:
    """A deploy-gate rule about the fairness verdict (``<dataset>/fairness[/metric]``)."""
    parts = rule_id.split("/")
    return len(parts) >= 2 and parts[1] == "fairness"


def _refuse_stale(ws: Workspace, params: Params) -> None:
    from lakewarden.dvcyaml import stale

    diff = stale(ws, params)
    if diff:
        where = "is missing" if diff == ["dvc.yaml"] else f"is stale (stage {', '.join(diff)})"
        raise PipelineError(f"dvc.yaml {where}: it does not match {params._path.name} and the policies",
                            hint="run `lakewarden pipeline render`, then dvc repro")


def run_stage(ws: Workspace, actor: Actor, stage: str, params_path: Path = PARAMS) -> dict[str, Any]:
    """Run one stage and record how it ended (:func:`stage_outcome`), so a caller of ``dvc repro`` can
    tell a gate's refusal from a failure.

    Raises:
        AccessDenied: the gate refused (exit 3). LakewardenError: a user error (its own exit code).
        StageFailed: anything else (exit 1); the traceback is saved under ``<workspace>/crash/``.
    """
    from governance.errors import AccessDenied
    from lakewarden.process import crash_dir, crash_line, save_crash

    if stage not in STAGES:
        raise PipelineError(f"unknown stage '{stage}' (stages: {', '.join(STAGES)})")
    try:
        params = load_params(params_path, ws)
        if os.environ.get("DVC_STAGE"):  # run by dvc repro: dvc.yaml must say what this configuration needs
            _refuse_stale(ws, params)
        out = STAGES[stage](ws, actor, params)
    except AccessDenied as exc:
        rules = list(getattr(getattr(exc, "decision", None), "rule_ids", None) or [])
        _record_outcome(ws, stage, "denied", exc.message, rule_ids=rules)
        raise
    except LakewardenError as exc:
        _record_outcome(ws, stage, "failed", exc.message)
        raise
    except Exception as exc:  # a bug: one line for the user, the traceback in a file
        path = save_crash(exc, crash_dir(ws.config.workspace_dir), command=f"lakewarden pipeline stage {stage}")
        line = crash_line(exc, path)
        _record_outcome(ws, stage, "crashed", line, traceback=str(path))
        raise StageFailed(f"stage {stage} failed: {line}") from None
    _record_outcome(ws, stage, "ok")
    return out


# -- after dvc repro: lineage ties and checkout -------------------------------------------
def _md5(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - DVC's own content hash, not security
    h.update(path.read_bytes())
    return h.hexdigest()


def trace(ws: Workspace, lock: Path = Path("dvc.lock")) -> list[dict[str, Any]]:
    """Each DVC stage: its dvc.lock hash of the manifest, whether the file still matches it, the
    lineage run the manifest names (job, git commit) and the Delta / model versions it pinned."""
    import yaml

    if not lock.exists():
        raise PipelineError(f"{lock} not found: run dvc repro first")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    runs = {e["run_id"]: e for e in ws.lineage.events()}
    rows = []
    for name, st in stages.items():
        for out in st.get("outs", []):
            path = Path(out["path"])
            if path.is_dir() and (path / "stage.json").exists():
                path = path / "stage.json"
                out = {**out, "md5": None}
            elif path.suffix != ".json" or not str(path).startswith(str(OUT)):
                continue
            man = json.loads(path.read_text()) if path.exists() else {}
            run = runs.get(man.get("lineage_run_id"), {})
            pinned = {k: v["version"] for k, v in (man.get("tables") or {}).items()}
            pinned.update({f"{k}": v for k, v in (man.get("data_versions") or {}).items()})
            if "version" in man and "model" in man:
                pinned[f"model:{man['model']}"] = man["version"]
            rows.append({"stage": name, "manifest": str(path), "lock_md5": out.get("md5"),
                         "matches": path.exists() and (out["md5"] is None or _md5(path) == out["md5"]),
                         "run_id": man.get("lineage_run_id"), "job": run.get("job_name"),
                         "git_commit": (man.get("git") or {}).get("commit"), "pinned": pinned})
    return rows


def checkout(ws: Workspace, actor: Actor, out_dir: Path, *, manifest: Path = OUT / "silver.json",
             fmt: Literal["parquet", "csv"] = "parquet") -> dict[str, Any]:
    """Read each table pinned by a manifest back at its Delta version, minus erased subjects.

    A restore copies rows unmasked, so the gate decides it as maintenance of each table (data
    engineers and compliance, with access to the layer): an analyst, whose queries are masked
    and filtered, is refused. Rows of subjects whose key was shredded are dropped; their
    encrypted values could not be opened anyway.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from lakehouse.catalog import Catalog, TableRef

    man = read_json(manifest, stage=manifest.stem)
    tables = man.get("tables") or {}
    if not tables:
        raise PipelineError(f"{manifest} pins no tables")
    out_dir.mkdir(parents=True, exist_ok=True)
    cat = Catalog(ws.config)
    done: dict[str, Any] = {}
    for name, m in tables.items():
        layer, ds = name.split(".", 1)
        ws.gate.enforce(Stage.MAINTAIN, actor, Resource.table(ds, layer))
        uri = cat.uri(TableRef(layer, ds))  # type: ignore[arg-type]
        try:
            t = DeltaTable(uri, version=m["version"], storage_options=cat.storage_options).to_pyarrow_table()
        except Exception as exc:  # noqa: BLE001 - deltalake raises several kinds for a vacuumed version
            raise PipelineError(f"{name}@{m['version']} can no longer be read ({str(exc).splitlines()[0]}): "
                                "history older than the policy's retention.history is vacuumed") from None
        key = ws.policies.dataset(ds).subject_key
        tokens = t[key].to_pylist()
        store = ws.keyring.store
        shredded = [tok for tok in set(tokens) if tok is not None and store.subject_state(tok) == "shredded"]
        keep = pc.invert(pc.is_in(t[key], value_set=pa.array(shredded, type=t.schema.field(key).type)))
        kept = t.filter(keep)
        dest = out_dir / f"{name}@{m['version']}.{fmt}"
        (pq.write_table(kept, dest) if fmt == "parquet" else pacsv.write_csv(kept, dest))
        done[name] = {"version": m["version"], "rows": kept.num_rows, "erased_rows_dropped": t.num_rows - kept.num_rows,
                      "file": str(dest)}
    ws.audit.record("pipeline.checkout", actor=actor.name, outcome="ok", resource=f"manifest:{manifest}",
                    details={k: {"version": v["version"], "rows": v["rows"]} for k, v in done.items()})
    return done


def summary(ws: Workspace, actor: Actor) -> dict[str, Any]:
    """What the last ``dvc repro`` produced: rows, quarantined, ε, utility, fairness, the deployed
    model, and the audit chain verified (by ``actor``, who needs the audit permission)."""
    from governance.audit_ops import verify_audit
    from governance.ledger import PrivacyLedger

    def opt(path: Path) -> Any:
        return json.loads(path.read_text()) if path.exists() else None

    ingest, train, fair = opt(REPORTS / "ingest.json") or {}, opt(REPORTS / "train.json"), opt(REPORTS / "fairness.json")
    deployed, registered = opt(OUT / "deploy.json"), opt(OUT / "register.json")
    audit = verify_audit(ws, actor)
    from dataclasses import asdict

    dataset = (registered or {}).get("dataset") or (opt(OUT / "features.json") or {}).get("dataset")
    if dataset is None and PARAMS.exists():  # before the features stage ran: the dataset the params train on
        try:
            dataset = model_dataset(ws.policies, load_params(PARAMS).train.features)
        except ValueError:
            dataset = None
    budget = asdict(PrivacyLedger(ws).status(dataset)) if dataset else None
    return {
        "rows": {ds: v.get("rows_accepted") for ds, v in ingest.items()},
        "quarantined": {ds: v.get("rows_quarantined") for ds, v in ingest.items()},
        "epsilon_run": train and train["epsilon"], "budget": budget, "budget_dataset": dataset,
        "utility": train and {k: train[k] for k in ("auc", "accuracy") if k in train},
        "fairness": fair,
        "registered": registered and registered["ref"],
        "deployed": deployed and deployed["ref"],
        "deploy_status": deploy_status(deployed and deployed["ref"], stage_outcome(ws, "deploy")),
        "audit_ok": audit.ok, "audit_events": audit.events,
    }


def deploy_status(deployed_ref: str | None, outcome: dict[str, Any] | None) -> str:
    """One line: what was deployed, or why not (the gate's rule, a failed fairness verdict, a failure)."""
    if deployed_ref:
        return deployed_ref
    if not outcome:
        return "not deployed (the deploy stage has not run)"
    if outcome["status"] == "ok":
        return "not deployed (pipeline/deploy.json is missing)"
    rules = outcome.get("rule_ids") or []
    if outcome["status"] == "denied":
        fair = [r for r in rules if is_fairness_rule(r)]
        if fair:
            return f"not deployed: fairness failed (rule {', '.join(fair)})"
        return f"not deployed: refused by the gate (rule {', '.join(rules) or 'default-deny'})"
    return f"not deployed: the deploy stage {outcome['status']}: {outcome.get('message', '')}"


__all__ = ["STAGES", "StageFailed", "deploy_status", "is_fairness_rule", "stage_outcome", "summary", "run_stage", "load_params", "trace", "checkout", "table_manifest", "PipelineError"]
