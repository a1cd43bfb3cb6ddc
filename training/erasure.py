"""The training layer's part of erasure and access: which models learned from a subject.

A model card records the Delta version of every table its training set came from
(``data_versions``). A model saw a subject when one of those versions held the subject's
rows; the handler opens each version (time travel, before the rows are deleted) and checks.
What happens to such a model is the dataset policy's ``erasure.models`` (``flag`` for review,
or ``retrain``); the request records it in its ledger and the audit log.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from governance.erasure import ErasureContext, ErasureHandler
from governance.workspace import Workspace
from training.registry import Registry

__all__ = ["models_trained_on", "HANDLER"]


def _held(ws: Workspace, table: str, version: int, tokens: list[str]) -> bool:
    layer, _, dataset = table.partition(".")
    pol = ws.policies.datasets.get(dataset)
    if pol is None:
        return False
    uri = ws.config.table_uri(f"{layer}/{dataset}")
    so = dict(ws.config.storage.options) or None
    try:
        dt = DeltaTable(uri, version=version, storage_options=so)
        keys = dt.to_pyarrow_dataset().to_table(columns=[pol.subject_key])[pol.subject_key].cast(pa.string())
    except Exception:  # noqa: BLE001 - that version's files are gone: it cannot be ruled out
        return True
    return bool(pc.any(pc.is_in(keys, value_set=pa.array(tokens, pa.string()))).as_py())


def models_trained_on(ws: Workspace, tokens: list[str]) -> list[dict[str, Any]]:
    """Models whose training data (card ``data_versions``) held any of ``tokens``."""
    reg = Registry(ws)
    if not reg.has_models():  # nothing registered, on this machine's folder or in the bucket
        return []
    out = []
    for card in reg.list():
        tables = {t: v for t, v in card.data_versions.items() if _held(ws, t, v, tokens)}
        if tables:
            out.append({"model": str(card.ref), "dataset": card.dataset, "status": card.status, "tables": tables,
                        "purpose": card.purpose, "lineage_run_ids": list(card.lineage_run_ids)})
    return out


def _models(ws: Workspace, ctx: ErasureContext) -> list[dict[str, Any]]:
    return models_trained_on(ws, ctx.tokens)


HANDLER = ErasureHandler(name="models", order=10, models=_models)
"""Entry point ``models`` of ``lakewarden.erasure_handlers``: models trained on the subjects' data."""
