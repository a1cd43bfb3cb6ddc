"""Gated, audited operations on the audit log itself (what ``lakewarden audit`` runs).

Reading the audit log is a compliance function: both operations first ask the
gate (stage ``audit`` on ``system:audit``), and both leave an event behind.
"""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa

from governance.audit import VerifyReport
from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace


def verify_audit(ws: Workspace, actor: Actor, *, witness: bool = False) -> VerifyReport:
    """Verify the whole log; the outcome (ok, or the first finding) is itself audited.

    With ``witness`` the log is also compared with every head its witness holds (``audit.witness``
    in lakewarden.yaml; see :mod:`governance.witness`): a rollback of both the table and the head
    file, and a log re-signed with a stolen key, are findings. The report's ``witness`` says what
    was checked and what not; with no witness configured that is itself the finding.
    """
    ws.gate.enforce(Stage.AUDIT, actor, Resource.system("audit"))
    ws.audit.flush()  # verify what has been decided so far, including the decision above (and publish it)
    rep = ws.audit.verify(witness=witness)
    first = rep.first
    details = {
        "events": rep.events,
        "checkpoints": rep.checkpoints,
        "first_bad_seq": first.seq if first else None,
        "finding": first.kind if first else None,
    }
    if witness:
        w = rep.witness or {}
        details.update(witness=w.get("uri"), witness_heads=w.get("heads"), witness_last_seq=w.get("last_seq"))
    ws.audit.record("audit.verify", actor=actor.name, outcome="ok" if rep.ok else "failed", resource="system:audit",
                    details=details)
    ws.audit.flush()
    return rep


def query_audit(
    ws: Workspace,
    who: Actor,
    *,
    limit: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    **filters: str | None,
) -> pa.Table:
    """Events matching the filters (see :meth:`AuditLog.query`); the query itself is audited."""
    ws.gate.enforce(Stage.AUDIT, who, Resource.system("audit"))
    ws.audit.flush()
    tbl = ws.audit.query(since=since, until=until, limit=limit, **filters)
    used = {k: v for k, v in filters.items() if v is not None}
    if since:
        used["since"] = since.isoformat()
    if until:
        used["until"] = until.isoformat()
    ws.audit.record(
        "audit.query", actor=who.name, outcome="ok", resource="system:audit",
        details={"filters": used, "rows": tbl.num_rows},
    )
    return tbl
