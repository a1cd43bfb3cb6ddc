"""The request ledger and deadlines: where each request stands, with its SLA.

The ledger (``_requests/events``, an append-only Delta table) is event-sourced: each state
transition is one row, with the request's regime, deadline and counts, and subjects only as
keyed digests (HMAC-SHA256 under the system key ``request-digest``).

The readers here are ungated: the public verbs (:func:`governance.erasure.list_requests`,
:func:`governance.erasure.request_status`) ask the gate first. :func:`statuses` is for a
caller that has already been let in under another stage (the audit report).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from governance.erasure.errors import RequestError

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = ["DIGEST_KEY", "LEDGER_TABLE", "RequestStatus", "due_date", "statuses", "status_of", "subject_digest"]

LEDGER_TABLE = "_requests/events"
DIGEST_KEY = "request-digest"
Kind = Literal["erase", "access"]
Regime = Literal["gdpr", "ccpa"]
KINDS = ("erase", "access")
REGIMES = ("gdpr", "ccpa")
ERASE_STATES = ("filed", "models_checked", "erased", "shredded", "awaiting_purge", "purged", "verified",
                "certified", "done")
ACCESS_STATES = ("filed", "exported", "done")

SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("actor", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("regime", pa.string(), nullable=False),
        pa.field("state", pa.string(), nullable=False),
        pa.field("filed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("due_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("subjects", pa.int64(), nullable=False),
        pa.field("subject_digests", pa.string(), nullable=False),  # JSON list of keyed digests
        pa.field("detail", pa.string()),  # JSON: counts, options; never tokens or identifiers
    ]
)


# ----------------------------------------------------------------------------- deadlines

def due_date(filed_at: datetime, regime: str) -> datetime:
    """The legal deadline: GDPR Art. 12(3) one month (same day next month, clipped to the
    month's end); CCPA §1798.130 45 days.

    >>> due_date(datetime(2026, 1, 31, tzinfo=timezone.utc), "gdpr").date().isoformat()
    '2026-02-28'
    """
    if regime == "gdpr":
        y, m = (filed_at.year + (filed_at.month == 12), filed_at.month % 12 + 1)
        day = min(filed_at.day, calendar.monthrange(y, m)[1])
        return filed_at.replace(year=y, month=m, day=day)
    if regime == "ccpa":
        return filed_at + timedelta(days=45)
    raise RequestError(f"unknown regime {regime!r} (use gdpr or ccpa)")


def _sla(state: str, due_at: datetime, now: datetime, soon_days: int) -> str:
    if state == "done":
        return "done"
    if now > due_at:
        return "overdue"
    if due_at - now <= timedelta(days=soon_days):
        return "due soon"
    return "open"


# ----------------------------------------------------------------------------- status

@dataclass(frozen=True, slots=True)
class RequestStatus:
    """Where a request stands. Holds no identifier and no token (subjects as keyed digests)."""

    request_id: str
    kind: str
    regime: str
    filed_at: datetime
    due_at: datetime
    state: str
    sla: str  # open | due soon | overdue | done
    completed_at: datetime | None
    late: bool  # done after the deadline, or still open past it
    subjects: int
    subject_digests: tuple[str, ...]
    filed_by: str
    updated_at: datetime
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("filed_at", "due_at", "completed_at", "updated_at"):
            d[k] = d[k].isoformat() if d[k] else None
        d["subject_digests"] = list(self.subject_digests)
        d["detail"] = dict(self.detail)
        return d


def subject_digest(ws: "Workspace", token: str) -> str:
    """Keyed digest of a token (HMAC-SHA256 under the system key ``request-digest``), 32 hex.

    It names a subject in the ledger, audit and certificates without the token: once the token
    is shredded nothing links the digest back to a person.
    """
    key = ws.keyring.system_key(DIGEST_KEY)
    return hmac.new(key, token.encode(), hashlib.sha256).hexdigest()[:32]


class Ledger:
    """The append-only event table of requests."""

    def __init__(self, ws: "Workspace") -> None:
        self.ws = ws
        self.uri = ws.config.table_uri(LEDGER_TABLE)
        self.so = dict(ws.config.storage.options) or None

    def rows(self, request_id: str | None = None) -> list[dict[str, Any]]:
        if not DeltaTable.is_deltatable(self.uri, storage_options=self.so):
            return []
        tbl = DeltaTable(self.uri, storage_options=self.so).to_pyarrow_table()
        rows = tbl.to_pylist()
        if request_id is not None:
            rows = [r for r in rows if r["request_id"] == request_id]
        return sorted(rows, key=lambda r: (r["request_id"], r["seq"]))

    def append(self, row: dict[str, Any]) -> None:
        write_deltalake(self.uri, pa.Table.from_pylist([row], schema=SCHEMA), mode="append",
                        configuration={"delta.appendOnly": "true"}, storage_options=self.so)


def _status(rows: list[dict[str, Any]], now: datetime, soon_days: int) -> RequestStatus:
    first, last = rows[0], rows[-1]
    done = next((r for r in rows if r["state"] == "done"), None)
    completed = done["at"] if done else None
    due = last["due_at"]
    detail: dict[str, Any] = {}
    for r in rows:
        if r["detail"]:
            detail.update(json.loads(r["detail"]))
    late = (completed > due) if completed else now > due
    return RequestStatus(
        request_id=first["request_id"], kind=first["kind"], regime=first["regime"], filed_at=first["filed_at"],
        due_at=due, state=last["state"], sla=_sla(last["state"], due, now, soon_days),
        completed_at=completed, late=late, subjects=first["subjects"],
        subject_digests=tuple(json.loads(first["subject_digests"])), filed_by=first["actor"], updated_at=last["at"],
        detail=detail,
    )


def statuses(ws: "Workspace", *, now: datetime | None = None) -> list[RequestStatus]:
    """Every request's status, oldest first. Ungated: callers ask the gate first."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in Ledger(ws).rows():
        by.setdefault(r["request_id"], []).append(r)
    now = now or now_utc(ws)
    out = [_status(rs, now, ws.config.requests.due_soon_days) for rs in by.values()]
    return sorted(out, key=lambda s: (s.filed_at, s.request_id))


def status_of(ws: "Workspace", request_id: str, *, now: datetime | None = None) -> RequestStatus:
    """One request's status. Ungated: callers ask the gate first.

    Raises:
        RequestError: no request with that id.
    """
    rows = Ledger(ws).rows(request_id)
    if not rows:
        raise RequestError(f"no request {request_id!r}", hint="lakewarden requests list shows the ids")
    return _status(rows, now or now_utc(ws), ws.config.requests.due_soon_days)


def now_utc(ws: "Workspace") -> datetime:
    """The workspace's clock (tests pin it with ``ws._clock``), in UTC."""
    clock = getattr(ws, "_clock", None)
    return (clock() if clock else datetime.now(timezone.utc)).astimezone(timezone.utc)
