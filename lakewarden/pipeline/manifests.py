"""What each pipeline step writes for DVC: small JSON manifests that pin Delta versions (no rows)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from governance.workspace import Workspace
from lakewarden.pipeline.params import OUT, PipelineError


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


def step_manifest(ws: Workspace, stage: str, run_id: str | None, **body: Any) -> dict[str, Any]:
    return {"stage": stage, "lineage_run_id": run_id, "git": ws.lineage.git_state(),
            "finished_at": datetime.now(timezone.utc).isoformat(), **body}


def require_pinned(ws: Workspace, tables: dict[str, Any], *, stage: str) -> None:
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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- sources: each dataset's landing files ------------------------------------------------
SOURCES = OUT / "sources.json"


def ingested_record(ws: Workspace) -> Path:
    """Landing files this workspace has ingested, by dataset and sha256 (outside DVC's outputs: kept across runs)."""
    return ws.config.workspace_dir / "pipeline" / "ingested.json"


def ingested(ws: Workspace) -> dict[str, Any]:
    path = ingested_record(ws)
    return json.loads(path.read_text()) if path.exists() else {}


def already_ingested(seen: dict[str, Any], ds: str, sha256: str) -> dict[str, Any] | None:
    return seen.get(f"{ds}/{sha256}") or seen.get(sha256)  # bare digests: records written before datasets were named


def remember_ingested(ws: Workspace, ds: str, sha256: str, report: dict[str, Any]) -> None:
    seen = ingested(ws)
    seen[f"{ds}/{sha256}"] = report
    write_json(ingested_record(ws), seen)


