"""Access export: everything held on the subjects, decrypted, with where it lives and what used it.

Three files in the request's output folder: ``subject_data.json`` (items with their store,
location, Delta version and plain fields), ``subject_data.csv`` (one row per field; binary
values base64-encoded, structures as JSON, with an ``encoding`` column) and
``processing.csv`` (models trained on the subjects' data, with their lineage runs).
"""

from __future__ import annotations

import base64
import csv
import json
import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.erasure.handlers import AccessItem, ErasureContext, ErasureHandler

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = ["collect", "export_value", "write_export"]


def export_value(value: Any) -> Any:
    """``value`` as plain JSON: bytes as ``{"type": "binary", "base64": ...}``, dates and times in ISO
    8601, decimals and non-finite floats as strings; mappings and lists walked."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"type": "binary", "base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): export_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [export_value(v) for v in value]
    return str(value)


def _csv_cell(value: Any) -> tuple[str, str]:
    """``(text, encoding)`` of a value in the CSV export: encoding "" (plain text), "base64" (binary)
    or "json" (a structure)."""
    v = export_value(value)
    if v is None:
        return "", ""
    if isinstance(v, dict) and v.get("type") == "binary" and set(v) == {"type", "base64"}:
        return v["base64"], "base64"
    if isinstance(v, (dict, list)):
        return json.dumps(v, ensure_ascii=False, sort_keys=True), "json"
    if isinstance(v, bool):
        return ("true" if v else "false"), ""
    return str(v), ""


def collect(ws: "Workspace", ctx: ErasureContext, hs: Sequence[ErasureHandler]
            ) -> tuple[list[AccessItem], list[dict[str, Any]]]:
    """What the handlers hold on the subjects (the ids as filed first) and the processing that used it."""
    items: list[AccessItem] = []
    for h in hs:
        if h.access:
            items.extend(h.access(ws, ctx))
    for t in ctx.tokens:
        lab = ctx.labels[t]
        for label, value in ctx.identifiers.get(t, []):
            if label == "subject_id":
                items.insert(0, AccessItem("request", "as filed", lab, {"subject_id": value}))
    processing = [{"kind": "model", **m} for h in hs if h.models for m in h.models(ws, ctx)]
    return items, processing


def write_export(out_dir: Path, items: list[AccessItem], processing: list[dict[str, Any]]) -> list[Path]:
    """Write the export's three files into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "exported_at": datetime.now(timezone.utc).isoformat(),
        "encoding": 'plain values; binary values as {"type": "binary", "base64": ...}',
        "items": [{"store": i.store, "location": i.location, "version": i.version, "subject": i.subject,
                   "fields": export_value(dict(i.fields))} for i in items],
        "processing": export_value(processing),
    }
    jp = out_dir / "subject_data.json"
    jp.write_text(json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    cp = out_dir / "subject_data.csv"
    with cp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "store", "location", "version", "column", "value", "encoding"])
        for i in items:
            for k, v in i.fields.items():
                text, enc = _csv_cell(v)
                w.writerow([i.subject, i.store, i.location, "" if i.version is None else i.version, k, text, enc])
    pp = out_dir / "processing.csv"
    with pp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "model", "dataset", "tables", "lineage_runs"])
        for p in processing:
            w.writerow([p.get("kind"), p.get("model"), p.get("dataset"), json.dumps(p.get("tables", {})),
                        " ".join(p.get("lineage_run_ids", []))])
    return [jp, cp, pp]
