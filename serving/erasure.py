"""The serving layer's part of erasure and access: the predictors' request logs.

Each scored entity is a JSON line (token, features, score) in
``<workspace>/serving/requests/<model>.jsonl``. Erasure rewrites each log without the
subjects' lines (a new file renamed over the old one, so a crash leaves either the old or
the new log, never half of one). A predictor that is running keeps appending to the file it
opened; restart it after an erasure (or erase while it is stopped).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from governance.requests import AccessItem, ErasureContext, ErasureHandler, register_handler
from governance.workspace import Workspace

__all__ = ["request_logs", "HANDLER"]


def request_logs(ws: Workspace) -> list[Path]:
    d = ws.config.workspace_dir / "serving" / "requests"
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


def _lines(path: Path, tokens: set[str]) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Every line, with its parsed record when it belongs to one of ``tokens``."""
    with path.open("rb") as fh:
        for line in fh:
            rec = None
            if any(t.encode() in line for t in tokens):
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = {"unparsed": True}
            yield line, rec


def _rewrite(path: Path, tokens: set[str]) -> int:
    removed = 0
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("wb") as out:
        for line, rec in _lines(path, tokens):
            if rec is not None:
                removed += 1
                continue
            out.write(line)
        out.flush()
        os.fsync(out.fileno())
    if removed:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return removed


def _erase(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    toks = set(ctx.tokens)
    return {f"request-log:{p.name}": _rewrite(p, toks) for p in request_logs(ws)}


def _residual(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    toks = set(ctx.tokens)
    return {f"request-log:{p.name}": sum(1 for _l, r in _lines(p, toks) if r is not None) for p in request_logs(ws)}


def _access(ws: Workspace, ctx: ErasureContext) -> list[AccessItem]:
    toks = set(ctx.tokens)
    items = []
    for p in request_logs(ws):
        for _line, rec in _lines(p, toks):
            if rec is not None:
                tok = rec.pop("token", None)
                items.append(AccessItem("request-log", f"serving/requests/{p.name}", ctx.labels.get(tok, "subject"), rec))
    return items


HANDLER = ErasureHandler(name="serving", order=20, erase=_erase, residual=_residual, access=_access)
register_handler(HANDLER)
