"""Compliance requests: erasure and access, as durable, resumable state machines.

A request is filed by a compliance officer naming subjects by their plaintext ids. The ids
are resolved at once to pseudonymous tokens through the key store's blind index and never
written anywhere: what must survive a crash (the tokens, and the plaintext identifiers the
verification looks for) is *sealed* under a throw-away system key ``request:<id>`` in the
key store, and that key is destroyed when the request is done.

The ledger (``_requests/events``, an append-only Delta table) is event-sourced: each state
transition is one row, with the request's regime, deadline and counts, and subjects only as
keyed digests (HMAC-SHA256 under the system key ``request-digest``). ``run`` reads the last
state of a request and performs the next steps; every step is idempotent, so a crash at any
point followed by ``run`` finishes the request with the same result. A request is never
``done`` before the scanner found nothing.

Erasure steps (states after each)::

    filed → models_checked → erased → shredded → awaiting_purge → purged → verified
          → certified → done          (verification_failed: findings; run again after fixing)

Access steps::

    filed → exported → done

The kernel knows no layer: each layer registers an :class:`ErasureHandler` (delete, purge,
residual counts, identifiers, access export, affected models) with :func:`register_handler`;
entry points import the layers so they register (``lakewarden.handlers.load``).

Errors: :class:`RequestError` (bad input, unknown request or subject: exit 2);
:class:`~governance.errors.AccessDenied` from the gate (exit 3).
"""

from __future__ import annotations

import base64
import calendar
import csv
import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from deltalake import DeltaTable, write_deltalake

from governance.errors import LakewardenError
from governance.gate import Actor, Resource
from governance.policy import Stage

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = [
    "AccessItem",
    "ErasureHandler",
    "ErasureContext",
    "RequestError",
    "RequestStatus",
    "Certificate",
    "due_date",
    "export_value",
    "file_request",
    "handlers",
    "list_requests",
    "open_sealed",
    "register_handler",
    "request_status",
    "run_request",
    "run_pending",
    "subject_digest",
    "verify_certificate",
]

LEDGER_TABLE = "_requests/events"
DIGEST_KEY = "request-digest"
CRASH_ENV = "LAKEWARDEN_REQUESTS_CRASH"  # "after:<state>" or "before:<state>" — crash tests only
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


class RequestError(LakewardenError):
    """A request cannot be filed or run as asked (unknown id or subject, bad option)."""

    exit_code = 2


# ----------------------------------------------------------------------------- handlers

@dataclass(frozen=True, slots=True)
class AccessItem:
    """One thing held on a subject, decrypted, with where it lives.

    ``fields`` hold plain values: a handler opens every ciphertext it holds with the subject's
    key (:func:`open_sealed`); bytes left over are exported base64-encoded with a type marker
    (:func:`export_value`), never as a Python repr.
    """

    store: str  # e.g. "delta", "feast-online", "request-log"
    location: str  # e.g. "silver.customers", "online:customer_profile", "serving/requests/credit.jsonl"
    subject: str  # the request-local subject label (S1, S2, ...), never the token
    fields: Mapping[str, Any]
    version: int | None = None


@dataclass(slots=True)
class ErasureContext:
    """What a step needs: the subjects' tokens and the plaintext identifiers (memory only)."""

    request_id: str
    tokens: list[str]
    identifiers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # token -> [(label, value)]
    labels: dict[str, str] = field(default_factory=dict)  # token -> S1, S2 ...

    def needles(self) -> list[tuple[str, bytes]]:
        """``(what, bytes)`` to look for: each token and each identifier value (4+ bytes)."""
        out: list[tuple[str, bytes]] = []
        for t in self.tokens:
            lab = self.labels.get(t, "subject")
            out.append((f"{lab}:token", t.encode()))
            for label, value in self.identifiers.get(t, []):
                b = value.encode("utf-8")
                if len(b) >= 4:
                    out.append((f"{lab}:{label}", b))
        return out


@dataclass(frozen=True, slots=True)
class ErasureHandler:
    """One layer's part of erasure and access. Every callable must be idempotent.

    Attributes:
        name: the layer ("lakehouse", "features", "serving", "training").
        order: erase order (lower first); the lakehouse deletes sources after the online store.
        erase: delete the subjects' data from the layer's current state; returns counts per store.
        purge: remove history (old files) still holding it; ``retention_hours`` None = policy window.
        residual: rows still held in the layer's current state (verification; all zero when erased).
        identifiers: plaintext identifiers held on each token (captured before shredding).
        access: everything held on the subjects, decrypted.
        models: models trained on data that held the subjects (``{"model": "credit@1", ...}``).
        scan_roots: extra folders or files the scanner must read (e.g. storage outside the workspace).
        scan_files: files the scanner must read wherever they lie, each with the label reports and
            certificates name it by instead of its path (e.g. kept landing files: a path may
            carry a person's name).
        decrypt: ``(path) -> (dataset, column)``-like probe for ciphertext in a file, see scanner.
    """

    name: str
    order: int = 50
    erase: Callable[["Workspace", ErasureContext], dict[str, int]] | None = None
    purge: Callable[["Workspace", ErasureContext, int | None], dict[str, int]] | None = None
    residual: Callable[["Workspace", ErasureContext], dict[str, int]] | None = None
    identifiers: Callable[["Workspace", Sequence[str]], dict[str, list[tuple[str, str]]]] | None = None
    access: Callable[["Workspace", ErasureContext], list[AccessItem]] | None = None
    models: Callable[["Workspace", ErasureContext], list[dict[str, Any]]] | None = None
    scan_roots: Callable[["Workspace"], list[Path]] | None = None
    scan_files: Callable[["Workspace"], Mapping[Path, str]] | None = None


_HANDLERS: dict[str, ErasureHandler] = {}

SEALED_UNREADABLE = "(sealed; cannot be opened)"
SEALED_SHREDDED = "(sealed; the subject's key was destroyed)"


def open_sealed(ws: "Workspace", blob: bytes | bytearray | memoryview, *, token: str, dataset: str,
                column: str) -> str:
    """A value sealed under a subject's key, opened for an access export: decoded as UTF-8.

    ``dataset`` and ``column`` must be the associated data it was sealed with (ingest seals a
    column of dataset ``customers`` as ``dataset="customers", column=<name>``; silver and the
    online store carry those ciphertexts unchanged). A value that cannot be opened becomes a
    marker saying so (:data:`SEALED_SHREDDED`, :data:`SEALED_UNREADABLE`), never ciphertext.
    """
    from governance.errors import SubjectShredded

    try:
        return ws.keyring.open(bytes(blob), token=token, dataset=dataset, column=column).decode("utf-8", "replace")
    except SubjectShredded:
        return SEALED_SHREDDED
    except LakewardenError:
        return SEALED_UNREADABLE


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


def register_handler(handler: ErasureHandler) -> None:
    """Register (or replace) a layer's handler. Layers call this when imported."""
    if not isinstance(handler, ErasureHandler):
        raise TypeError(f"expected an ErasureHandler, got {type(handler).__name__}")
    _HANDLERS[handler.name] = handler


def handlers() -> list[ErasureHandler]:
    """The registered handlers in erase order."""
    return sorted(_HANDLERS.values(), key=lambda h: (h.order, h.name))


def _require_handlers() -> list[ErasureHandler]:
    hs = handlers()
    if not any(h.erase for h in hs):
        raise RequestError(
            "no erasure handlers are registered",
            hint="import the layers first (lakewarden.handlers.load()); the CLI does this",
        )
    return hs


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


def _sla(state: str, due_at: datetime, completed_at: datetime | None, now: datetime, soon_days: int) -> str:
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


class _Ledger:
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
        due_at=due, state=last["state"], sla=_sla(last["state"], due, completed, now, soon_days),
        completed_at=completed, late=late, subjects=first["subjects"],
        subject_digests=tuple(json.loads(first["subject_digests"])), filed_by=first["actor"], updated_at=last["at"],
        detail=detail,
    )


def list_requests(ws: "Workspace", *, now: datetime | None = None) -> list[RequestStatus]:
    """Every request with its deadline and SLA status, oldest first (the HTML report calls this)."""
    led = _Ledger(ws)
    by: dict[str, list[dict[str, Any]]] = {}
    for r in led.rows():
        by.setdefault(r["request_id"], []).append(r)
    now = now or _now(ws)
    out = [_status(rs, now, ws.config.requests.due_soon_days) for rs in by.values()]
    return sorted(out, key=lambda s: (s.filed_at, s.request_id))


def request_status(ws: "Workspace", request_id: str, *, now: datetime | None = None) -> RequestStatus:
    """One request's status. Raises RequestError for an unknown id."""
    rows = _Ledger(ws).rows(request_id)
    if not rows:
        raise RequestError(f"no request {request_id!r}", hint="lakewarden requests list shows the ids")
    return _status(rows, now or _now(ws), ws.config.requests.due_soon_days)


def _now(ws: "Workspace") -> datetime:
    clock = getattr(ws, "_clock", None)
    return (clock() if clock else datetime.now(timezone.utc)).astimezone(timezone.utc)


# ----------------------------------------------------------------------------- the sealed probe

def _probe_path(ws: "Workspace", request_id: str) -> Path:
    return ws.config.workspace_dir / "requests" / "probes" / f"{request_id}.sealed"


def _probe_key(request_id: str) -> str:
    return f"request:{request_id}"


def _save_probe(ws: "Workspace", request_id: str, ctx: ErasureContext, extra: Mapping[str, Any]) -> None:
    body = json.dumps({"tokens": ctx.tokens, "identifiers": ctx.identifiers, "labels": ctx.labels, **extra})
    blob = ws.keyring.seal_system(_probe_key(request_id), body, dataset="requests", column="probe")
    p = _probe_path(ws, request_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, p)


def _load_probe(ws: "Workspace", request_id: str) -> tuple[ErasureContext, dict[str, Any]]:
    p = _probe_path(ws, request_id)
    try:
        body = json.loads(ws.keyring.open_system(_probe_key(request_id), p.read_bytes(), dataset="requests",
                                                 column="probe"))
    except (OSError, LakewardenError):
        raise RequestError(
            f"request {request_id}: its sealed subject list is gone; it cannot be resumed",
            hint="file a new request for the same subjects",
        ) from None
    ids = {t: [(a, b) for a, b in v] for t, v in body.pop("identifiers").items()}
    ctx = ErasureContext(request_id, body.pop("tokens"), ids, body.pop("labels"))
    return ctx, body


def _destroy_probe(ws: "Workspace", request_id: str) -> None:
    p = _probe_path(ws, request_id)
    if p.exists():
        p.unlink()
    ws.keyring.destroy_system_key(_probe_key(request_id))


# ----------------------------------------------------------------------------- filing

def _gate(ws: "Workspace", actor: Actor, request_id: str, what: str) -> None:
    ws.gate.enforce(Stage.REQUEST, actor, Resource.system("requests"), {"request_id": request_id})


def file_request(
    ws: "Workspace",
    actor: Actor,
    kind: str,
    subjects: Sequence[str],
    *,
    regime: str | None = None,
    out_dir: str | Path | None = None,
) -> RequestStatus:
    """File an erasure or access request for ``subjects`` (plaintext ids, resolved at once).

    Args:
        kind: "erase" or "access".
        subjects: the subjects' ids as ingested (e.g. customer ids). Not stored anywhere.
        regime: "gdpr" or "ccpa"; default ``requests.regime`` in lakewarden.yaml.
        out_dir: access requests: the folder the export is written to.

    Raises:
        RequestError: unknown kind/regime, no subjects, a subject the key store does not know.
        AccessDenied: the actor is not a compliance officer.
    """
    if kind not in KINDS:
        raise RequestError(f"unknown request kind {kind!r} (use erase or access)")
    regime = regime or ws.config.requests.regime
    if regime not in REGIMES:
        raise RequestError(f"unknown regime {regime!r} (use gdpr or ccpa)")
    ids = list(dict.fromkeys(s.strip() for s in subjects if s and s.strip()))
    if not ids:
        raise RequestError("name at least one subject (--subject <id>)")
    if kind == "access" and out_dir is None:
        raise RequestError("an access request needs an output folder (--out <folder>)")
    request_id = "req_" + secrets.token_hex(6)
    _gate(ws, actor, request_id, kind)
    hs = _require_handlers()
    tokens = ws.keyring.tokens_for(ids, create=False)
    unknown = [i + 1 for i, t in enumerate(tokens) if t is None]
    if unknown:
        raise RequestError(
            f"subject(s) #{', #'.join(map(str, unknown))} of {len(ids)} are not known to the key store "
            "(never ingested, or already erased)",
        )
    toks = list(dict.fromkeys(t for t in tokens if t))
    ctx = ErasureContext(request_id, toks, labels={t: f"S{i + 1}" for i, t in enumerate(toks)})
    for h in hs:
        if h.identifiers:
            for t, vals in h.identifiers(ws, toks).items():
                ctx.identifiers.setdefault(t, []).extend(vals)
    for t, sid in zip(tokens, ids):
        if t:
            ctx.identifiers.setdefault(t, []).insert(0, ("subject_id", sid))
    extra = {"out_dir": str(Path(out_dir).resolve())} if out_dir is not None else {}
    _save_probe(ws, request_id, ctx, extra)
    now = _now(ws)
    digests = [subject_digest(ws, t) for t in toks]
    row = {
        "request_id": request_id, "seq": 0, "at": now, "actor": actor.name, "kind": kind, "regime": regime,
        "state": "filed", "filed_at": now, "due_at": due_date(now, regime), "subjects": len(toks),
        "subject_digests": json.dumps(digests), "detail": json.dumps(extra),
    }
    _Ledger(ws).append(row)
    ws.audit.record("requests.file", actor=actor.name, outcome="ok", stage=Stage.REQUEST.value,
                    resource=f"request:{request_id}",
                    details={"kind": kind, "regime": regime, "subjects": len(toks), "due_at": row["due_at"].isoformat(),
                             "subject_digests": digests})
    ws.audit.flush()
    return request_status(ws, request_id)


# ----------------------------------------------------------------------------- running

class _Run:
    """One pass over a request: reads its last state and advances it step by step."""

    def __init__(self, ws: "Workspace", actor: Actor, status: RequestStatus, *, purge_now: bool,
                 progress: Callable[[str], None] | None) -> None:
        self.ws, self.actor, self.st = ws, actor, status
        self.purge_now = purge_now
        self.progress = progress or (lambda _msg: None)
        self.state = status.state
        self.detail: dict[str, Any] = dict(status.detail)
        self.rows = _Ledger(ws).rows(status.request_id)

    def _crash(self, when: str, state: str) -> None:
        if os.environ.get(CRASH_ENV) == f"{when}:{state}":
            self.ws.audit.flush()
            os._exit(77)

    def advance(self, state: str, detail: Mapping[str, Any] | None = None) -> None:
        self._crash("before", state)
        now = _now(self.ws)
        first = self.rows[0]
        row = {**{k: first[k] for k in ("request_id", "kind", "regime", "filed_at", "due_at", "subjects",
                                         "subject_digests")},
               "seq": self.rows[-1]["seq"] + 1, "at": now, "actor": self.actor.name, "state": state,
               "detail": json.dumps(dict(detail or {}), default=str, sort_keys=True)}
        _Ledger(self.ws).append(row)
        self.rows.append(row)
        self.state = state
        self.detail.update(detail or {})
        self.ws.audit.record(f"requests.{state}", actor=self.actor.name, outcome="ok", stage=Stage.REQUEST.value,
                             resource=f"request:{self.st.request_id}", details=dict(detail or {}))
        self.ws.audit.flush()
        self.progress(state)
        self._crash("after", state)


def run_request(
    ws: "Workspace",
    actor: Actor,
    request_id: str,
    *,
    purge_now: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RequestStatus:
    """Advance a request as far as it can go now; idempotent and resumable.

    An erasure stops at ``awaiting_purge`` until the policy's ``retention.history`` has passed
    since the rows were deleted, unless ``purge_now`` (audited) vacuums history at once. It
    stops at ``verification_failed`` if the scanner finds the subject anywhere.

    Raises:
        RequestError: unknown request id. AccessDenied: not a compliance officer.
    """
    st = request_status(ws, request_id)
    _gate(ws, actor, request_id, "run")
    if st.state == "done":
        return st
    run = _Run(ws, actor, st, purge_now=purge_now, progress=progress)
    if st.state == "certified":  # the probe may already be gone: only finishing is left
        _destroy_probe(ws, request_id)
        run.advance("done")
        return request_status(ws, request_id)
    ctx, extra = _load_probe(ws, request_id)
    if st.kind == "access":
        _run_access(run, ctx, Path(extra["out_dir"]))
    else:
        _run_erase(run, ctx)
    return request_status(ws, request_id)


def run_pending(ws: "Workspace", actor: Actor, *, purge_now: bool = False,
                progress: Callable[[str], None] | None = None) -> list[RequestStatus]:
    """Run every request that is not done."""
    out = []
    for st in list_requests(ws):
        if st.state != "done":
            out.append(run_request(ws, actor, st.request_id, purge_now=purge_now, progress=progress))
    return out


def _sum_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _run_erase(run: _Run, ctx: ErasureContext) -> None:
    ws = run.ws
    hs = _require_handlers()
    order = ERASE_STATES
    at = order.index(run.state) if run.state in order else order.index("purged")  # verification_failed → verify
    if at < order.index("models_checked"):
        models: list[dict[str, Any]] = []
        for h in hs:
            if h.models:
                models.extend(h.models(ws, ctx))
        action = {}
        for m in models:
            pol = ws.policies.datasets.get(m.get("dataset", ""))
            action[m["model"]] = pol.erasure.models if pol else "flag"
            ws.audit.record("requests.model_flagged", actor=run.actor.name, outcome=action[m["model"]],
                            stage=Stage.REQUEST.value, resource=f"model:{m['model']}",
                            details={"request_id": ctx.request_id, "action": action[m["model"]],
                                     "tables": m.get("tables", {})})
        run.advance("models_checked", {"models_flagged": sorted(action), "model_actions": action})
    if at < order.index("erased"):
        counts = _sum_counts(h.erase(ws, ctx) for h in hs if h.erase)
        run.advance("erased", {"erased": counts, "erased_at": _now(ws).isoformat()})
    if at < order.index("shredded"):
        n = ws.keyring.shred_many(ctx.tokens)
        shredded = sum(ws.keyring.store.subject_state(t) == "shredded" for t in ctx.tokens)
        run.advance("shredded", {"keys_destroyed": n, "keys_shredded_total": shredded})
    if at < order.index("awaiting_purge"):
        run.advance("awaiting_purge", {"purge_after": _purge_after(ws, run).isoformat()})
    if run.state == "awaiting_purge":
        if not run.purge_now and _now(ws) < _purge_after(ws, run):
            return  # history is kept until the policy's window passes; run again later
        hours = 0 if run.purge_now else None
        if run.purge_now:
            ws.audit.record("requests.purge_now", actor=run.actor.name, outcome="ok", stage=Stage.REQUEST.value,
                            resource=f"request:{ctx.request_id}",
                            details={"reason": "officer cut Delta history short for this erasure"})
        counts = _sum_counts(h.purge(ws, ctx, hours) for h in hs if h.purge)
        run.advance("purged", {"purged": counts, "purge_now": run.purge_now})
    if run.state in ("purged", "verification_failed"):
        from governance.scanner import scan

        residual = _sum_counts(h.residual(ws, ctx) for h in hs if h.residual)
        report = scan(ws, ctx, extra_roots=[p for h in hs if h.scan_roots for p in h.scan_roots(ws)],
                      exclude=[_probe_path(ws, ctx.request_id)],
                      labelled={p: lab for h in hs if h.scan_files for p, lab in h.scan_files(ws).items()})
        not_shredded = sum(ws.keyring.store.subject_state(t) != "shredded" for t in ctx.tokens)
        left = {k: v for k, v in residual.items() if v}
        verification = {**report.summary(), "residual_rows": sum(residual.values()), "keys_live": not_shredded}
        if report.findings or left or not_shredded:
            run.advance("verification_failed", {"verification": verification,
                                                "findings": [f.describe() for f in report.findings[:50]],
                                                "residual": left})
            return
        run.advance("verified", {"verification": verification, "residual_checked": sorted(residual)})
    if run.state == "verified":
        cert = _certificate(ws, run, ctx)
        _write_certificate(ws, run.actor, cert)
        run.advance("certified", {"certificate_sha256": cert.digest})
    if run.state == "certified":
        _destroy_probe(ws, ctx.request_id)
        run.advance("done")


def _purge_after(ws: "Workspace", run: _Run) -> datetime:
    erased = datetime.fromisoformat(run.detail.get("erased_at") or run.rows[-1]["at"].isoformat())
    hist = max((p.retention.history for p in ws.policies.datasets.values()), default=timedelta(days=7))
    return erased + hist


def _run_access(run: _Run, ctx: ErasureContext, out_dir: Path) -> None:
    ws = run.ws
    if run.state == "filed":
        items: list[AccessItem] = []
        for h in _require_handlers():
            if h.access:
                items.extend(h.access(ws, ctx))
        for t in ctx.tokens:
            lab = ctx.labels[t]
            for label, value in ctx.identifiers.get(t, []):
                if label == "subject_id":
                    items.insert(0, AccessItem("request", "as filed", lab, {"subject_id": value}))
        processing = _processing(ws, ctx)
        files = _export(out_dir, items, processing)
        run.advance("exported", {"items": len(items), "files": [p.name for p in files],
                                 "stores": sorted({i.store for i in items})})
    if run.state == "exported":
        _destroy_probe(ws, ctx.request_id)
        run.advance("done")


def _processing(ws: "Workspace", ctx: ErasureContext) -> list[dict[str, Any]]:
    """Which processing used the subjects' data: models (cards, lineage runs) and lineage runs."""
    out: list[dict[str, Any]] = []
    for h in _require_handlers():
        if h.models:
            for m in h.models(ws, ctx):
                out.append({"kind": "model", **m})
    return out


def _export(out_dir: Path, items: list[AccessItem], processing: list[dict[str, Any]]) -> list[Path]:
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


# ----------------------------------------------------------------------------- certificates

@dataclass(frozen=True, slots=True)
class Certificate:
    """A signed statement of what an erasure did and verified. ``body`` is canonical JSON."""

    body: str
    signature: str  # Ed25519, hex, over the body's bytes
    key_id: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.body)


def _certificate(ws: "Workspace", run: _Run, ctx: ErasureContext) -> Certificate:
    from governance.audit import key_id
    from governance.workspace import AUDIT_SIGNING_KEY

    d = run.detail
    body = {
        "certificate": "lakewarden-erasure/1",
        "request_id": ctx.request_id,
        "regime": run.st.regime,
        "filed_at": run.st.filed_at.isoformat(),
        "due_at": run.st.due_at.isoformat(),
        "certified_at": _now(ws).isoformat(),
        "certified_by": run.actor.name,
        "subjects": len(ctx.tokens),
        "subject_digests": list(run.st.subject_digests),
        "policy_digest": ws.policies.digest,
        "done": {
            "rows_deleted": d.get("erased", {}),
            "keys_destroyed": d.get("keys_shredded_total"),
            "history_purged": d.get("purged", {}),
            "purge_now": d.get("purge_now", False),
            "models_flagged": d.get("models_flagged", []),
            "model_actions": d.get("model_actions", {}),
        },
        "verified": d.get("verification", {}),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    sk = Ed25519PrivateKey.from_private_bytes(ws.keyring.system_key(AUDIT_SIGNING_KEY))
    return Certificate(text, sk.sign(text.encode()).hex(), key_id(sk.public_key()))


def _write_certificate(ws: "Workspace", actor: Actor, cert: Certificate) -> None:
    rid = cert.data["request_id"]
    if _find_certificate(ws, rid) is not None:
        return  # written before a crash: once only
    ws.audit.record("requests.certificate", actor=actor.name, outcome="ok", stage=Stage.REQUEST.value,
                    resource=f"request:{rid}",
                    details={"certificate": cert.body, "signature": cert.signature, "key_id": cert.key_id})
    ws.audit.flush()


def _find_certificate(ws: "Workspace", request_id: str) -> Certificate | None:
    tbl = ws.audit.query(action="requests.certificate", resource=f"request:{request_id}")
    rows = tbl.to_pylist() if tbl is not None else []
    if not rows:
        return None
    det = json.loads(rows[-1]["details"])
    return Certificate(det["certificate"], det["signature"], det["key_id"])


def verify_certificate(ws: "Workspace", request_id: str, *, public_key: Ed25519PublicKey | None = None) -> Certificate:
    """Read a request's certificate from the audit log and check its Ed25519 signature.

    Uses the audit's public key (``<workspace>/audit/public_key.hex``, or the pin in
    lakewarden.yaml) unless ``public_key`` is given.

    Raises:
        RequestError: no certificate for the request, or the signature does not verify.
    """
    cert = _find_certificate(ws, request_id)
    if cert is None:
        raise RequestError(f"no certificate for request {request_id!r} in the audit log",
                           hint="a request gets its certificate when it is verified")
    pk = public_key or _audit_public_key(ws)
    try:
        pk.verify(bytes.fromhex(cert.signature), cert.body.encode())
    except (InvalidSignature, ValueError):
        raise RequestError(f"the certificate of request {request_id} does not verify (edited or forged)") from None
    if cert.data.get("request_id") != request_id:
        raise RequestError(f"the certificate found for {request_id} names another request")
    return cert


def _audit_public_key(ws: "Workspace") -> Ed25519PublicKey:
    pinned = ws.config.audit.public_key
    if pinned:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(pinned))
    p = ws.config.workspace_dir / "audit" / "public_key.hex"
    if p.exists():
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(p.read_text().strip()))
    return ws.audit._pk  # type: ignore[return-value]
