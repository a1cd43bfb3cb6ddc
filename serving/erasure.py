"""The serving layer's part of erasure and access: the predictors' request logs.

Each scored entity is a JSON line (token, features, score) in
``<workspace>/serving/requests/<model>.jsonl``. Erasure, under the logs' lock
(:mod:`serving.requestlog`), first puts the subjects' keyed digests on the erased list, then
rewrites each log without the subjects' lines (a new file renamed over the old one, so a
crash leaves either the old or the new log, never half of one). A running predictor opens
the log per append under the same lock, so it writes into the new file, and it drops
records of subjects on the erased list (a request scored while the erasure ran).
"""

from __future__ import annotations

from governance.erasure import AccessItem, ErasureContext, ErasureHandler
from governance.workspace import Workspace
from serving.requestlog import lines_of, log_dir, log_lock, mark_erased, request_logs, rewrite_without

__all__ = ["request_logs", "HANDLER"]


def _erase(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    toks = set(ctx.tokens)
    folder = log_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    with log_lock(folder):
        mark_erased(ws, toks)  # first: an append racing this erasure is dropped, not written back
        return {f"request-log:{p.name}": rewrite_without(p, toks) for p in request_logs(ws)}


def _residual(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    toks = set(ctx.tokens)
    return {f"request-log:{p.name}": sum(1 for _l, r in lines_of(p, toks) if r is not None) for p in request_logs(ws)}


def _access(ws: Workspace, ctx: ErasureContext) -> list[AccessItem]:
    toks = set(ctx.tokens)
    items = []
    for p in request_logs(ws):
        for _line, rec in lines_of(p, toks):
            if rec is not None:
                tok = rec.pop("token", None)
                items.append(AccessItem("request-log", f"serving/requests/{p.name}", ctx.labels.get(tok, "subject"), rec))
    return items


HANDLER = ErasureHandler(name="serving-logs", order=20, erase=_erase, residual=_residual, access=_access)
"""Entry point ``serving-logs`` of ``lakewarden.erasure_handlers``: the predictors' request logs."""
