"""Filing and running requests: durable, resumable state machines, gated in the library.

Every verb takes the actor and asks the gate first (stage ``request`` on ``system:requests``,
kernel rule ``builtin/requests``: compliance officers only); the decision is audited, allowed
or not, before anything is read — a denied actor does not learn whether a request id exists.
A request then refuses to start unless every required handler is there
(:func:`~governance.erasure.handlers.require_handlers`).

``run`` reads the last state of a request and performs the next steps; every step is
idempotent, so a crash at any point followed by ``run`` finishes the request with the same
result. A request is never ``done`` before the scanner found nothing.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.erasure import access as _access
from governance.erasure.certificate import make_certificate, write_certificate
from governance.erasure.errors import RequestError
from governance.erasure.handlers import ErasureContext, ErasureHandler, require_handlers
from governance.erasure.ledger import (
    ERASE_STATES, KINDS, REGIMES, Ledger, RequestStatus, due_date, now_utc, status_of, statuses, subject_digest,
)
from governance.erasure.probe import destroy_probe, load_probe, probe_path, save_probe
from governance.erasure.scan import scan
from governance.gate import Actor, Resource
from governance.policy import Stage

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = ["CRASH_ENV", "file_request", "list_requests", "request_status", "run_pending", "run_request"]

CRASH_ENV = "LAKEWARDEN_REQUESTS_CRASH"  # "after:<state>" or "before:<state>" — crash tests only


def _gate(ws: "Workspace", actor: Actor, request_id: str | None = None) -> None:
    ctx = {"request_id": request_id} if request_id is not None else None
    ws.gate.enforce(Stage.REQUEST, actor, Resource.system("requests"), ctx)


# ----------------------------------------------------------------------------- reading

def list_requests(ws: "Workspace", actor: Actor, *, now: datetime | None = None) -> list[RequestStatus]:
    """Every request with its deadline and SLA status, oldest first.

    Raises:
        AccessDenied: the actor may not read requests (asked and audited first).
    """
    _gate(ws, actor)
    return statuses(ws, now=now)


def request_status(ws: "Workspace", actor: Actor, request_id: str, *, now: datetime | None = None) -> RequestStatus:
    """One request's status.

    Raises:
        AccessDenied: the actor may not read requests (asked before the id is looked up).
        RequestError: no request with that id.
    """
    _gate(ws, actor, request_id)
    return status_of(ws, request_id, now=now)


# ----------------------------------------------------------------------------- filing

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
        MissingHandlers: a required handler is missing (nothing is filed).
    """
    if kind not in KINDS:
        raise RequestError(f"unknown request kind {kind!r} (use erase or access)")
    regime_: str = regime or ws.config.requests.regime
    if regime_ not in REGIMES:
        raise RequestError(f"unknown regime {regime_!r} (use gdpr or ccpa)")
    ids = list(dict.fromkeys(s.strip() for s in subjects if s and s.strip()))
    if not ids:
        raise RequestError("name at least one subject (--subject <id>)")
    if kind == "access" and out_dir is None:
        raise RequestError("an access request needs an output folder (--out <folder>)")
    request_id = "req_" + secrets.token_hex(6)
    _gate(ws, actor, request_id)
    hs = require_handlers()
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
    for tok, sid in zip(tokens, ids):
        if tok:
            ctx.identifiers.setdefault(tok, []).insert(0, ("subject_id", sid))
    extra = {"out_dir": str(Path(out_dir).resolve())} if out_dir is not None else {}
    save_probe(ws, request_id, ctx, extra)
    now = now_utc(ws)
    digests = [subject_digest(ws, t) for t in toks]
    row: dict[str, Any] = {
        "request_id": request_id, "seq": 0, "at": now, "actor": actor.name, "kind": kind, "regime": regime_,
        "state": "filed", "filed_at": now, "due_at": due_date(now, regime_), "subjects": len(toks),
        "subject_digests": json.dumps(digests), "detail": json.dumps(extra),
    }
    Ledger(ws).append(row)
    ws.audit.record("requests.file", actor=actor.name, outcome="ok", stage=Stage.REQUEST.value,
                    resource=f"request:{request_id}",
                    details={"kind": kind, "regime": regime_, "subjects": len(toks), "due_at": row["due_at"].isoformat(),
                             "subject_digests": digests})
    ws.audit.flush()
    return status_of(ws, request_id)


# ----------------------------------------------------------------------------- running

class _Run:
    """One pass over a request: reads its last state and advances it step by step."""

    def __init__(self, ws: "Workspace", actor: Actor, status: RequestStatus, hs: list[ErasureHandler], *,
                 purge_now: bool, progress: Callable[[str], None] | None) -> None:
        self.ws, self.actor, self.st, self.hs = ws, actor, status, hs
        self.purge_now = purge_now
        self.progress = progress or (lambda _msg: None)
        self.state = status.state
        self.detail: dict[str, Any] = dict(status.detail)
        self.rows = Ledger(ws).rows(status.request_id)

    def _crash(self, when: str, state: str) -> None:
        if os.environ.get(CRASH_ENV) == f"{when}:{state}":
            self.ws.audit.flush()
            os._exit(77)

    def advance(self, state: str, detail: Mapping[str, Any] | None = None) -> None:
        self._crash("before", state)
        now = now_utc(self.ws)
        first = self.rows[0]
        row = {**{k: first[k] for k in ("request_id", "kind", "regime", "filed_at", "due_at", "subjects",
                                         "subject_digests")},
               "seq": self.rows[-1]["seq"] + 1, "at": now, "actor": self.actor.name, "state": state,
               "detail": json.dumps(dict(detail or {}), default=str, sort_keys=True)}
        Ledger(self.ws).append(row)
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

    The gate decides before the id is looked up. An erasure stops at ``awaiting_purge`` until
    the policy's ``retention.history`` has passed since the rows were deleted, unless
    ``purge_now`` (audited) vacuums history at once. It stops at ``verification_failed`` if the
    scanner finds the subject anywhere.

    Raises:
        AccessDenied: not a compliance officer. MissingHandlers: a required handler is missing.
        RequestError: unknown request id.
    """
    _gate(ws, actor, request_id)
    hs = require_handlers()
    st = status_of(ws, request_id)
    if st.state == "done":
        return st
    run = _Run(ws, actor, st, hs, purge_now=purge_now, progress=progress)
    if st.state == "certified":  # the probe may already be gone: only finishing is left
        destroy_probe(ws, request_id)
        run.advance("done")
        return status_of(ws, request_id)
    ctx, extra = load_probe(ws, request_id)
    if st.kind == "access":
        _run_access(run, ctx, Path(extra["out_dir"]))
    else:
        _run_erase(run, ctx)
    return status_of(ws, request_id)


def run_pending(ws: "Workspace", actor: Actor, *, purge_now: bool = False,
                progress: Callable[[str], None] | None = None) -> list[RequestStatus]:
    """Run every request that is not done (each asks the gate again, with its id).

    Raises:
        AccessDenied: not a compliance officer (asked before the ledger is read).
        MissingHandlers: a required handler is missing.
    """
    _gate(ws, actor)
    require_handlers()
    return [run_request(ws, actor, st.request_id, purge_now=purge_now, progress=progress)
            for st in statuses(ws) if st.state != "done"]


def _sum_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def _run_erase(run: _Run, ctx: ErasureContext) -> None:
    ws, hs = run.ws, run.hs
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
        run.advance("erased", {"erased": counts, "erased_at": now_utc(ws).isoformat()})
    if at < order.index("shredded"):
        n = ws.keyring.shred_many(ctx.tokens)
        shredded = sum(ws.keyring.store.subject_state(t) == "shredded" for t in ctx.tokens)
        run.advance("shredded", {"keys_destroyed": n, "keys_shredded_total": shredded})
    if at < order.index("awaiting_purge"):
        run.advance("awaiting_purge", {"purge_after": _purge_after(ws, run).isoformat()})
    if run.state == "awaiting_purge":
        if not run.purge_now and now_utc(ws) < _purge_after(ws, run):
            return  # history is kept until the policy's window passes; run again later
        hours = 0 if run.purge_now else None
        if run.purge_now:
            ws.audit.record("requests.purge_now", actor=run.actor.name, outcome="ok", stage=Stage.REQUEST.value,
                            resource=f"request:{ctx.request_id}",
                            details={"reason": "officer cut Delta history short for this erasure"})
        counts = _sum_counts(h.purge(ws, ctx, hours) for h in hs if h.purge)
        run.advance("purged", {"purged": counts, "purge_now": run.purge_now})
    if run.state in ("purged", "verification_failed"):
        residual = _sum_counts(h.residual(ws, ctx) for h in hs if h.residual)
        report = scan(ws, ctx, exclude=[probe_path(ws, ctx.request_id)])
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
        cert = make_certificate(ws, run.actor, run.st, run.detail, len(ctx.tokens))
        write_certificate(ws, run.actor, cert)
        run.advance("certified", {"certificate_sha256": cert.digest})
    if run.state == "certified":
        destroy_probe(ws, ctx.request_id)
        run.advance("done")


def _purge_after(ws: "Workspace", run: _Run) -> datetime:
    erased = datetime.fromisoformat(run.detail.get("erased_at") or run.rows[-1]["at"].isoformat())
    hist = max((p.retention.history for p in ws.policies.datasets.values()), default=timedelta(days=7))
    return erased + hist


def _run_access(run: _Run, ctx: ErasureContext, out_dir: Path) -> None:
    ws = run.ws
    if run.state == "filed":
        items, processing = _access.collect(ws, ctx, run.hs)
        files = _access.write_export(out_dir, items, processing)
        run.advance("exported", {"items": len(items), "files": [p.name for p in files],
                                 "stores": sorted({i.store for i in items})})
    if run.state == "exported":
        destroy_probe(ws, ctx.request_id)
        run.advance("done")
