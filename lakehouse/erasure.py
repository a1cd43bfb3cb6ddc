"""Row-level erasure in the lakehouse: delete one subject's rows from every governed table.

This is the lakehouse's erasure handler: bronze, silver, vault, restricted and quarantine
of every dataset, matched on the subject token (never a plaintext id). Each table gets a
new Delta version without the rows; the files that held them are removed from the current
version and physically deleted by the next VACUUM. Older versions stay readable for time
travel until then — which is why the subject's key is also shredded (the compliance
workflow does both): the copies that remain can no longer be decrypted or linked.
"""

from __future__ import annotations

import time

from deltalake.exceptions import CommitFailedError

from governance.keys import TOKEN_RE
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef



def delete_subject_rows(ws: Workspace, token: str) -> dict[str, int]:
    """Delete the subject's rows from every governed table; return rows deleted per table."""
    if not TOKEN_RE.match(token):
        raise ValueError("erasure works on subject tokens (sub_...), never on identifiers")
    cat = Catalog(ws.config)
    out: dict[str, int] = {}
    for ref in cat.list():
        policy = ws.policies.datasets.get(ref.dataset)
        if policy is None:
            continue
        column = "subject_token" if ref.layer == "quarantine" else policy.subject_key
        out[str(ref)] = _delete(cat, ref, column, token)
    return out


def _delete(cat: Catalog, ref: TableRef, column: str, token: str) -> int:
    for attempt in range(8):
        dt = cat.open(ref)
        if column not in {f.name for f in dt.schema().fields}:
            return 0
        try:
            metrics = dt.delete(f"{column} = '{token}'")
            return int(metrics.get("num_deleted_rows", 0) or 0)
        except CommitFailedError:
            time.sleep(0.05 * 2**attempt)
    raise RuntimeError(f"{ref}: could not commit the deletion (concurrent writers)")
