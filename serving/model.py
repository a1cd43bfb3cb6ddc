"""The governed KServe predictor: a registered model version behind KServe's ModelServer.

A request names subjects by their pseudonymous tokens, or by their own ids. For each request the
predictor asks the feature store for the model's online features — a gated, audited lookup for
the model card's purpose — encodes them exactly as at training (the encoder stored with the
model), scores them, and answers on both of KServe's protocols:

* V1: ``POST /v1/models/<name>:predict`` with ``{"instances": ["sub_…", …]}`` (or
  ``[{"customer_id": "sub_…"}]``, the field named after the dataset's subject key) →
  ``{"predictions": [score, …]}``;
* Open Inference Protocol: ``POST /v2/models/<name>/infer`` with one BYTES input named after
  the subject key → one FP32 output ``score``.

**By the subject's own id.** An instance ``{"subject_id": "C-000123"}`` (V1; instances may mix
ids and tokens), or one BYTES input named ``subject_id`` (V2), names the subject by the id it was
ingested with. The predictor computes the id's blind index and looks the token up in the key
store (``KeyRing.tokens_for(ids, create=False)``: never creating one), then scores the token. The
lookup is gated like the feature lookup (``serve`` on the dataset, for the card's purpose, the
subject key as the column used) and audited with counts only (``serve.resolve_ids``). The id is
held in memory for the lookup and goes nowhere else: the request log keeps the token, and no
message repeats the id. An id the key store does not know (never ingested, or erased), or whose
subject has no online features, is a per-instance error — V1: ``null`` in ``predictions`` and
``{"instance": i, "error": …}`` in ``errors``; V2: ``NaN`` in ``score`` and the message in a
second BYTES output ``error`` ("" where scored) — with HTTP 200 for the others. (Should a
dataset's subject key itself be named ``subject_id``, values shaped like tokens there are tokens.)

**Who asks.** With ``auth.enabled`` in lakewarden.yaml, every inference request (a POST under
``/v1/models/`` or ``/v2/models/``) must carry ``Authorization: Bearer <access token>`` of the
configured issuer and audience (governance/authn.py): without one, or with one that is expired,
from another issuer or not signed by the issuer's keys, the answer is 401 (``WWW-Authenticate:
Bearer``) before the body is read. The token's actor — its user name, and its groups that are
policy roles — is the one the gate decides ``serve`` for, for this model's dataset and purpose
(403 when it may not), and the one every feature lookup and id resolution is made and audited
as; each token is recorded once (``serve.authenticated``: issuer, subject, roles, expiry). Model
metadata and health endpoints stay open. Without ``auth`` the server acts, as before, as the
identity it was started as.

**Failed authentications** are counted by reason code on the server's ``/metrics``
(``lakewarden_authn_failures_total{reason=...}``, KServe's Prometheus registry) and audited as
``serve.unauthenticated`` (outcome ``deny``; details: the reason, the number of failures, the
client addresses — never the token or any part of it) by :class:`AuthnFailures`: at most one
record per reason per minute, each carrying the count since the previous one, so that a flood of
bad tokens cannot flood the audit log; what is still counted is recorded when the server stops.

**HTTPS.** With ``serving.tls_cert`` and ``serving.tls_key`` in lakewarden.yaml the server speaks
HTTPS only (uvicorn, through KServe's ``ssl_certfile``/``ssl_keyfile``; KServe reloads the files
when they change). Both files must exist and the key must not be readable by others (nor by its
group when it is this user's file): :func:`tls_files` checks them, and loads them once, before
anything else starts. With ``auth.enabled`` and no certificate the server refuses to start
(:class:`governance.tls.PlaintextRefused`, exit 2): bearer tokens never travel in clear.

Subjects the feature store does not know, named by token — never ingested, or erased — get a
404 naming the tokens; malformed input gets a 400, an oversized body a 413; the server keeps
serving. Every scored entity is appended to a request log (token, features, score — no
identifiers) that ``lakewarden monitor`` reads for drift; every append holds a lock that erasure
also takes and writes into the file now at the path (:mod:`serving.requestlog`). The server's own
drift gauges are computed from the last 10,000 scored entities kept in memory without their
tokens (features and score only): first when 1,000 entities are scored, then every 1,000 but
at most every 10 seconds, in a background thread.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from governance.errors import ConfigError
from governance.gate import Actor
from governance.keys import TOKEN_RE
from governance.workspace import Workspace
from features.store import Features
from serving.requestlog import RequestLogWriter
from training.registry import ModelRef, Registry, model_name

if TYPE_CHECKING:
    from governance.audit import AuditLog
    from governance.config import ProjectConfig

MAX_INSTANCES = 1000
MAX_BODY_BYTES = 1 << 20
ID_FIELD = "subject_id"  # the field (V1) or input (V2) that names a subject by its own id
MAX_ID_CHARS = 1024
# The reason codes of governance.authn.AuthenticationError: the values the failure counter's label
# may take (any other code counts as "other": an attacker cannot grow the label set).
AUTHN_REASONS = ("missing", "malformed", "signature", "unknown-key", "issuer", "audience", "expired",
                 "not-yet-valid", "token-type", "jwks")
AUTHN_AUDIT_WINDOW = 60.0  # seconds: at most one serve.unauthenticated record per reason in this time
MAX_AUDITED_CLIENTS = 10  # client addresses one serve.unauthenticated record names (the rest are counted)
UNAUTHENTICATED = "(unauthenticated)"  # the audit actor of a request no token vouched for
UNKNOWN_ID = "unknown subject: the key store has no such id (never ingested, or erased)"
NO_FEATURES = "no online features for this subject (not materialized yet, or erased)"
# The verified caller of the request being handled (set by the bearer middleware; None: no auth).
_CALLER: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("lakewarden_caller", default=None)
_log = logging.getLogger(__name__)


class SubjectNotFound(Exception):
    """Tokens the feature store has no values for: never ingested, or erased (HTTP 404)."""

    def __init__(self, tokens: list[str]) -> None:
        shown = ", ".join(tokens[:5]) + (f" and {len(tokens) - 5} more" if len(tokens) > 5 else "")
        super().__init__(f"unknown subject(s): {shown} (never ingested, or erased)")
        self.tokens = tokens


def _kserve():  # noqa: ANN202 - imported lazily: kserve pulls in a web stack
    import kserve

    return kserve


class GovernedPredictor:
    """Builds the kserve.Model subclass lazily so that importing this module stays light."""

    def __new__(cls, ws: Workspace, ref: ModelRef | str, actor: Actor, **kw: Any):  # noqa: ANN204
        return _make_model_class()(ws, ref, actor, **kw)


_MODEL_CLASS: Any = None
_SCORE_HISTOGRAM: Any = None


def _make_model_class():  # noqa: ANN202
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    kserve = _kserve()
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    class _Predictor(kserve.Model):
        def __init__(self, ws: Workspace, ref: ModelRef | str, actor: Actor, *, log_requests: bool = True,
                     authenticator: Any = None) -> None:
            reg = Registry(ws)
            card = reg.card(ref)
            reg.verify(card.ref)
            super().__init__(card.name)
            self.ws = ws
            self.card = card
            self.actor = actor
            self.authenticator = authenticator  # governance.authn.Authenticator: callers prove who they are
            self.authn_failures: AuthnFailures | None = None  # set by serve(): flushed at stop()
            self._seen_tokens: OrderedDict[str, None] = OrderedDict()
            self._seen_lock = threading.Lock()
            self.columns = [f.split(":", 1)[1] for f in card.features]
            # Fail at start, not on every request — and before anything else of the model is
            # read: the serving identity must be allowed to serve this model's features for the
            # card's purpose.
            from governance.gate import Resource
            from governance.policy import Stage

            ws.gate.enforce(Stage.SERVE, actor, Resource.dataset(card.dataset),
                            {"purpose": card.purpose, "columns": self.columns})
            self.features = Features(ws)
            self.key = ws.policies.dataset(card.dataset).subject_key
            loaded = reg.load(card.ref, verify=False)  # verified above, before the gate
            self.encoder = loaded.encoder
            self.threshold = loaded.threshold
            self.torch_model = loaded.model
            from prometheus_client import REGISTRY, Histogram

            from serving.monitor import DriftMetrics

            self.profile = loaded.profile  # the training data's drift profile; None for older models
            self.drift_metrics = DriftMetrics(REGISTRY)
            self.scored = 0
            self.drift_every = 1000  # recompute drift gauges after this many scored entities...
            self.drift_interval = 10.0  # ...and at most this often (seconds; Prometheus scrapes every 15-30 s)
            self._drift_at: float | None = None
            self.clock = time.monotonic  # for the drift interval; injectable (tests must not depend on speed)
            global _SCORE_HISTOGRAM
            if _SCORE_HISTOGRAM is None:
                _SCORE_HISTOGRAM = Histogram("lakewarden_prediction_score", "Scores served, per model",
                                             ["model"], buckets=[i / 10 for i in range(1, 10)], registry=REGISTRY)
            self.score_hist = _SCORE_HISTOGRAM.labels(card.name)
            self.log_path: Path | None = None
            self.log: RequestLogWriter | None = None
            if log_requests:
                self.log_path = ws.config.workspace_dir / "serving" / "requests" / f"{card.name}.jsonl"
                self.log = RequestLogWriter(ws, self.log_path)
            # The drift gauges' window: the features and scores of the last 10,000 scored entities,
            # in memory and without their tokens (what drift needs, and nothing that names anyone).
            self.recent: deque[dict[str, Any]] = deque(maxlen=10_000)
            self._drift_busy = threading.Lock()
            pol = ws.policies.dataset(card.dataset)
            self.types = {c: self.features._arrow_type(pol, c) for c in self.columns}
            self.ready = False

        def load(self) -> bool:
            # Open Feast before saying ready: importing it (typeguard instruments its modules)
            # and reading the registry took seconds, which the first request used to pay.
            self.features.store.get_feature_view(self.card.features[0].split(":", 1)[0])
            self.ready = True
            return self.ready

        # -- the work -----------------------------------------------------------------
        def score_tokens(self, tokens: list[str], *, actor: Actor | None = None) -> np.ndarray:
            """Scores of subjects named by token; SubjectNotFound (404) names those with no features."""
            scores, missing = self._score(tokens, actor or self.actor)
            if missing:
                raise SubjectNotFound([tokens[i] for i in missing])
            return scores

        def score_subjects(self, ids: list[str], *, actor: Actor | None = None) -> tuple[np.ndarray, dict[int, str]]:
            """Scores of subjects named by their own ids: NaN and ``{position: error}`` for those
            the key store does not know or that have no online features (never the id in it)."""
            actor = actor or self.actor
            tokens = self.resolve_ids(ids, actor=actor)
            found = [i for i, t in enumerate(tokens) if t is not None]
            out = np.full(len(ids), np.nan, dtype=np.float64)
            errors = {i: UNKNOWN_ID for i, t in enumerate(tokens) if t is None}
            if found:
                scores, missing = self._score([tokens[i] for i in found], actor)  # type: ignore[misc]
                for j, i in enumerate(found):
                    out[i] = scores[j]
                for j in missing:
                    errors[found[j]] = NO_FEATURES
            return out, dict(sorted(errors.items()))

        def resolve_ids(self, ids: list[str], *, actor: Actor | None = None) -> list[str | None]:
            """Each id's token, looked up by its blind index (never created): gated like the
            feature lookup and audited with counts only. The ids go nowhere but the HMAC."""
            from governance.gate import Resource
            from governance.policy import Stage

            actor = actor or self.actor
            self.ws.gate.enforce(Stage.SERVE, actor, Resource.dataset(self.card.dataset),
                                 {"purpose": self.card.purpose, "columns": [self.key]})
            tokens = self.ws.keyring.tokens_for(ids, create=False)
            unknown = sum(t is None for t in tokens)
            self.ws.audit.record("serve.resolve_ids", actor=actor.name, outcome="ok", stage=Stage.SERVE.value,
                                 resource=f"model:{self.card.ref}",
                                 details={"dataset": self.card.dataset, "purpose": self.card.purpose,
                                          "ids": len(ids), "resolved": len(ids) - unknown, "unknown": unknown})
            return tokens

        def _score(self, tokens: list[str], actor: Actor) -> tuple[np.ndarray, list[int]]:
            """Scores of the tokens that have online features, and the positions of those that have none."""
            import pyarrow as pa
            import torch

            values = self.features.online(actor, purpose=self.card.purpose, features=self.card.features,
                                          tokens=tokens, as_dict=True)
            cols = [values[c] for c in self.columns]
            n = len(tokens)
            missing = [i for i in range(n) if all(col[i] is None for col in cols)]
            if missing:
                gone = set(missing)
                keep = [i for i in range(n) if i not in gone]
                cols = [[col[i] for i in keep] for col in cols]
                tokens = [tokens[i] for i in keep]
            if not tokens:
                return np.zeros(0, dtype=np.float32), missing
            x = self.encoder.transform(pa.table({c: pa.array(v, self.types[c]) for c, v in zip(self.columns, cols)}))
            with torch.no_grad():
                scores = torch.sigmoid(self.torch_model(torch.from_numpy(x)).squeeze(-1)).numpy()
            for sc in scores:
                self.score_hist.observe(float(sc))
            before = self.scored
            self.scored += len(tokens)
            feats = [dict(zip(self.columns, row)) for row in zip(*cols)]
            if self.log is not None:
                now = datetime.now(timezone.utc).isoformat()
                # Under the logs' lock, into the file now at the path: an erasure may have replaced
                # it (and erased a subject scored here meanwhile); see serving.requestlog.
                self.log.append([
                    {"ts": now, "model": self.card.name, "version": self.card.version, "token": t,
                     "features": f, "score": float(s)}
                    for t, f, s in zip(tokens, feats, scores)
                ])
            version = self.card.version
            self.recent.extend({"features": f, "score": float(s), "version": version} for f, s in zip(feats, scores))
            if self.profile is not None and self.scored // self.drift_every != before // self.drift_every:
                if self._drift_at is None:
                    self.refresh_drift()  # the first: the gauges exist once 1,000 entities are scored
                elif self.clock() - self._drift_at >= self.drift_interval:
                    self._refresh_in_background()
            if not missing:
                return scores, missing
            full = np.full(n, np.nan, dtype=scores.dtype)
            full[keep] = scores
            return full, missing

        def _refresh_in_background(self) -> None:
            """Recompute the drift gauges in a thread (one at a time), not on the request path: a
            10,000-record report takes tens of milliseconds, which every request waiting behind it
            would pay."""
            if not self._drift_busy.acquire(blocking=False):
                return  # one is running: it reads the window as it is now

            def run() -> None:
                try:
                    self.refresh_drift()
                except Exception as exc:  # noqa: BLE001 - a gauge refresh must never stop serving
                    import logging

                    logging.getLogger(__name__).warning("drift gauges not refreshed: %s", exc)
                finally:
                    self._drift_busy.release()

            threading.Thread(target=run, name="lakewarden-drift", daemon=True).start()

        def refresh_drift(self) -> Any:
            """PSI of recent traffic (the last 10,000 scored entities, kept in memory) against the
            training data's drift profile, into the Prometheus gauges."""
            from serving.monitor import drift_report

            self._drift_at = self.clock()
            window = list(self.recent)  # a copy: requests keep appending meanwhile
            report = drift_report(self.profile, window, model=self.card.name)
            self.drift_metrics.observe(report)
            return report

        def stop(self) -> None:
            if self.authn_failures is not None:
                self.authn_failures.flush()  # the failures counted since the last record
            if self.log is not None:
                self.log.close()

        def _instances_v1(self, payload: Any) -> list[tuple[str, str]]:
            """V1 instances as ("token", value) or ("id", value), in request order."""
            key = self.key
            if isinstance(payload, (bytes, bytearray)):
                try:
                    payload = json.loads(payload)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise InvalidInput(f"the request body is not valid JSON ({exc})") from None
            if not isinstance(payload, dict) or "instances" not in payload:
                raise InvalidInput('expected a JSON object {"instances": [...]} with subject tokens or '
                                   f'{{"{ID_FIELD}": ...}} objects')
            inst = payload["instances"]
            if not isinstance(inst, list) or not inst:
                raise InvalidInput('"instances" must be a non-empty list')
            if len(inst) > MAX_INSTANCES:
                raise InvalidInput(f"at most {MAX_INSTANCES} instances per request (got {len(inst)})")
            out: list[tuple[str, str]] = []
            for i, v in enumerate(inst):
                kind = "token"
                if isinstance(v, dict):
                    named = [f for f in (key, ID_FIELD) if f in v]
                    if len(set(named)) > 1:
                        raise InvalidInput(f'instance {i}: give "{key}" (a token) or "{ID_FIELD}" (the subject\'s id), not both')
                    if named == [ID_FIELD] and not (key == ID_FIELD and isinstance(v[ID_FIELD], str)
                                                    and TOKEN_RE.match(v[ID_FIELD])):
                        kind = "id"
                    v = v.get(named[0]) if named else None
                if not isinstance(v, str):
                    raise InvalidInput(f'instance {i} must be a token string, {{"{key}": "sub_..."}} '
                                       f'or {{"{ID_FIELD}": "<the subject\'s id>"}}')
                out.append((kind, v))
            return out

        def _inputs_v2(self, req: Any) -> tuple[str, list[str]]:
            """V2: ("token", tokens) from the input named after the subject key, or ("id", ids) from
            the input named ``subject_id``."""
            names = f"'{self.key}' (tokens) or '{ID_FIELD}' (the subjects' ids)"
            if len(req.inputs) != 1:
                raise InvalidInput(f"expected exactly one input named {names} (got {len(req.inputs)})")
            inp = req.inputs[0]
            if inp.name not in (self.key, ID_FIELD):
                raise InvalidInput(f"the input must be named {names} (got '{inp.name}')")
            if inp.datatype != "BYTES":
                raise InvalidInput(f"input '{inp.name}' must have datatype BYTES (got {inp.datatype})")
            if len(inp.shape) != 1:
                raise InvalidInput(f"input '{inp.name}' must be one-dimensional (shape [n]), got shape {inp.shape}")
            values = [d.decode() if isinstance(d, bytes) else d for d in inp.data]
            if len(values) != inp.shape[0]:
                raise InvalidInput(f"shape {inp.shape} does not match {len(values)} values")
            if len(values) > MAX_INSTANCES:
                raise InvalidInput(f"at most {MAX_INSTANCES} instances per request (got {len(values)})")
            if inp.name == ID_FIELD and not (self.key == ID_FIELD and all(isinstance(v, str) and TOKEN_RE.match(v) for v in values)):
                return "id", values
            return "token", values

        @staticmethod
        def _check(items: list[tuple[str, str]]) -> None:
            """Tokens must look like tokens; ids must be non-empty text. Messages name positions only:
            a value that is not a token may be an identifier, and is never repeated."""
            if len(items) > MAX_INSTANCES:
                raise InvalidInput(f"at most {MAX_INSTANCES} instances per request (got {len(items)})")
            bad = [i for i, (k, t) in enumerate(items) if k == "token" and (not isinstance(t, str) or not TOKEN_RE.match(t))]
            if bad:
                raise InvalidInput(f"instance(s) {bad[:5]} are not subject tokens (sub_ + 26 base32 characters); "
                                   f'to score a subject by its own id send {{"{ID_FIELD}": "<id>"}}')
            bad = [i for i, (k, t) in enumerate(items)
                   if k == "id" and (not isinstance(t, str) or not t.strip() or len(t) > MAX_ID_CHARS)]
            if bad:
                raise InvalidInput(f"instance(s) {bad[:5]}: {ID_FIELD} must be non-empty text of at most "
                                   f"{MAX_ID_CHARS} characters")

        def caller(self) -> Actor:
            """Whom this request is served for: the verified caller when auth is on (the gate decides
            ``serve`` for it, 403 when it may not), else the identity the server was started as."""
            if self.authenticator is None:
                return self.actor
            caller = _CALLER.get()
            if caller is None:  # fail closed: a route the bearer middleware did not cover
                from governance.authn import AuthenticationError

                raise AuthenticationError("missing", "a bearer token is required (Authorization: Bearer <token>)")
            from governance.gate import Resource
            from governance.policy import Stage

            self._record_session(caller)  # first: a deny that follows is flushed with it
            self.ws.gate.enforce_repeated(Stage.SERVE, caller, Resource.dataset(self.card.dataset),
                                          {"purpose": self.card.purpose, "columns": self.columns})
            return caller

        def _record_session(self, caller: Any) -> None:
            """Audit each verified token once: who vouched (issuer), for whom (subject), which roles."""
            key = f"{caller.issuer}|{caller.subject}|{caller.token_id or caller.expires}"
            with self._seen_lock:
                if key in self._seen_tokens:
                    return
                self._seen_tokens[key] = None
                if len(self._seen_tokens) > 10_000:
                    self._seen_tokens.popitem(last=False)
            from governance.policy import Stage

            self.ws.audit.record("serve.authenticated", actor=caller.name, outcome="ok", stage=Stage.SERVE.value,
                                 resource=f"model:{self.card.ref}",
                                 details={"issuer": caller.issuer, "subject": caller.subject,
                                          "roles": list(caller.roles), "expires": int(caller.expires)})

        async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
            actor = self.caller()
            if isinstance(payload, InferRequest):
                kind, values = self._inputs_v2(payload)
                self._check([(kind, v) for v in values])
                outputs = []
                if kind == "token":
                    scores = self.score_tokens(values, actor=actor).astype(np.float32)
                else:
                    scores_, errors = self.score_subjects(values, actor=actor)
                    scores = scores_.astype(np.float32)
                    err = InferOutput(name="error", shape=[len(values)], datatype="BYTES")
                    err.set_data_from_numpy(np.array([errors.get(i, "") for i in range(len(values))], dtype=np.object_),
                                            binary_data=False)
                    outputs.append(err)
                out = InferOutput(name="score", shape=[len(scores)], datatype="FP32")
                out.set_data_from_numpy(scores, binary_data=False)
                return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[out, *outputs],
                                     model_version=str(self.card.version))
            items = self._instances_v1(payload)
            self._check(items)
            tok_pos = [i for i, (k, _) in enumerate(items) if k == "token"]
            id_pos = [i for i, (k, _) in enumerate(items) if k == "id"]
            if not id_pos:
                scores = self.score_tokens([v for _, v in items], actor=actor)
                return {"predictions": [float(s) for s in scores], "model_version": self.card.version}
            preds: list[float | None] = [None] * len(items)
            if tok_pos:  # tokens keep their contract: an unknown token is a 404 naming it
                for i, sc in zip(tok_pos, self.score_tokens([items[i][1] for i in tok_pos], actor=actor)):
                    preds[i] = float(sc)
            id_scores, id_errors = self.score_subjects([items[i][1] for i in id_pos], actor=actor)
            errors = []
            for j, i in enumerate(id_pos):
                if j in id_errors:
                    errors.append({"instance": i, "error": id_errors[j]})
                else:
                    preds[i] = float(id_scores[j])
            out: dict[str, Any] = {"predictions": preds, "model_version": self.card.version}
            if errors:
                out["errors"] = sorted(errors, key=lambda e: e["instance"])
            return out

    _MODEL_CLASS = _Predictor
    return _Predictor


def install_http_guards(max_body: int = MAX_BODY_BYTES) -> None:
    """Add to KServe's FastAPI app: 404 for unknown subjects, 413 for oversized bodies."""
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    if getattr(app.state, "lakewarden_guards", False):
        return

    async def not_found(_request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=404, content={"error": str(exc)})

    async def forbidden(_request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=403, content={"error": str(exc)})

    class _TooLarge(Exception):
        pass

    async def _reject(send: Any) -> None:
        body = json.dumps({"error": f"request body over {max_body} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    class LimitBody:
        """413 for a body over ``max_body`` bytes, by its Content-Length or as it streams in.

        A plain ASGI middleware: Starlette's BaseHTTPMiddleware runs every request through
        an extra task and memory streams, a cost paid on each prediction.
        """

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            for name, value in scope.get("headers", ()):
                if name == b"content-length":
                    if value.isdigit() and int(value) > max_body:
                        await _reject(send)
                        return
                    break
            seen = 0
            started = False

            async def counted_receive() -> Any:
                nonlocal seen
                msg = await receive()
                if msg.get("type") == "http.request":
                    seen += len(msg.get("body", b""))
                    if seen > max_body:  # a chunked body, or one longer than it said
                        raise _TooLarge
                return msg

            async def tracked_send(msg: Any) -> None:
                nonlocal started
                if msg.get("type") == "http.response.start":
                    started = True
                await send(msg)

            try:
                await self.app(scope, counted_receive, tracked_send)
            except _TooLarge:
                if not started:
                    await _reject(send)

    from governance.errors import AccessDenied

    app.add_exception_handler(SubjectNotFound, not_found)
    app.add_exception_handler(AccessDenied, forbidden)  # e.g. the policy changed under a running server
    app.add_middleware(LimitBody)
    app.state.lakewarden_guards = True


_INFERENCE_PREFIXES = ("/v1/models/", "/v2/models/")
_AUTHN_FAILURES: Any = None  # the Prometheus counter (one per process: the registry refuses a second)


def authn_failure_counter() -> Any:
    """``lakewarden_authn_failures_total{reason}`` in prometheus_client's default registry, the one
    KServe's ``/metrics`` exposes; every known reason starts at 0 (a rate needs the series to exist)."""
    global _AUTHN_FAILURES
    if _AUTHN_FAILURES is None:
        from prometheus_client import REGISTRY, Counter

        _AUTHN_FAILURES = Counter("lakewarden_authn_failures", "Inference requests refused with 401, by reason code",
                                  ["reason"], registry=REGISTRY)
        for r in (*AUTHN_REASONS, "other"):
            _AUTHN_FAILURES.labels(r)
    return _AUTHN_FAILURES


class AuthnFailures:
    """Failed authentications at the predictor, audited without letting a flood through.

    :meth:`note` counts a 401 by its reason code. The first failure of a reason is recorded at once
    (``serve.unauthenticated``, outcome ``deny``); later ones are counted, and recorded together
    (``failures``: how many since the previous record of that reason) by the first failure that
    comes ``window`` seconds or more after that record — so at most one record per reason per
    window, whatever the rate. :meth:`flush` records every count still open (the server calls it
    when it stops). A record's details: ``reason``, ``failures``, ``clients`` (the distinct client
    addresses, at most ``MAX_AUDITED_CLIENTS``; ``clients_omitted``: how many more) and
    ``window_s``. Never the token, nor any part of it: :meth:`note` is never given one.

    Args:
        audit: the workspace's audit log (``ws.audit``).
        resource: what was asked for, e.g. ``model:credit@1``.
        window: seconds between two records of one reason (at least).
        clock: monotonic seconds; injectable (tests must not wait a minute).

    >>> class Log:
    ...     def __init__(self): self.events = []
    ...     def record(self, action, **kw): self.events.append((action, kw["details"]))
    >>> now = [0.0]
    >>> log = Log()
    >>> f = AuthnFailures(log, resource="model:credit@1", window=60, clock=lambda: now[0])
    >>> for _ in range(3): f.note("expired", "10.0.0.7")
    >>> now[0] = 61.0
    >>> f.note("expired", "10.0.0.8")
    >>> [(a, d["failures"], d["clients"]) for a, d in log.events]
    [('serve.unauthenticated', 1, ['10.0.0.7']), ('serve.unauthenticated', 3, ['10.0.0.7', '10.0.0.8'])]
    >>> f.flush()
    0
    """

    def __init__(self, audit: "AuditLog | Any", *, resource: str, window: float = AUTHN_AUDIT_WINDOW,
                 clock: Any = time.monotonic) -> None:
        if window <= 0:
            raise ValueError("window must be a positive number of seconds")
        self.audit = audit
        self.resource = resource
        self.window = float(window)
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, tuple[int, dict[str, None], int]] = {}  # reason -> (failures, clients, omitted)
        self._recorded_at: dict[str, float] = {}  # reason -> when its last record was made

    def note(self, reason: str, client: str | None) -> None:
        """Count one failure (``reason``: the AuthenticationError's code; ``client``: its address)."""
        reason = reason if reason in AUTHN_REASONS else "other"
        now = self.clock()
        with self._lock:
            n, clients, omitted = self._open.get(reason, (0, {}, 0))
            if client:
                if client in clients or len(clients) < MAX_AUDITED_CLIENTS:
                    clients[client] = None
                else:
                    omitted += 1
            self._open[reason] = (n + 1, clients, omitted)
            due = [r for r in self._open
                   if r not in self._recorded_at or now - self._recorded_at[r] >= self.window]
            taken = self._take(due, now)
        self._record(taken)

    def flush(self) -> int:
        """Record every open count now (at stop); return how many records were made."""
        with self._lock:
            taken = self._take(list(self._open), self.clock())
        self._record(taken)
        return len(taken)

    def _take(self, reasons: list[str], now: float) -> list[tuple[str, int, list[str], int]]:
        out = []
        for r in reasons:
            n, clients, omitted = self._open.pop(r)
            self._recorded_at[r] = now
            out.append((r, n, list(clients), omitted))
        return out

    def _record(self, taken: list[tuple[str, int, list[str], int]]) -> None:
        from governance.policy import Stage

        for reason, n, clients, omitted in taken:
            details: dict[str, Any] = {"reason": reason, "failures": n, "clients": clients, "window_s": self.window}
            if omitted:
                details["clients_omitted"] = omitted
            self.audit.record("serve.unauthenticated", actor=UNAUTHENTICATED, outcome="deny", stage=Stage.SERVE.value,
                              resource=self.resource, details=details)


def _client(scope: Any) -> str | None:
    """The peer's address (never a forwarded-for header: a client writes what it likes there)."""
    peer = scope.get("client")
    return str(peer[0]) if peer else None


def install_bearer_auth(authenticator: Any, failures: AuthnFailures | None = None) -> None:
    """Add to KServe's FastAPI app: every inference request (a POST under ``/v1/models/`` or
    ``/v2/models/``) needs a valid bearer token, else 401 before its body is read; the verified
    actor is what :meth:`caller` of the predictor decides for. Each 401 is counted by reason on
    ``/metrics`` (:func:`authn_failure_counter`) and noted in ``failures`` (the audit, coalesced)."""
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    from governance.authn import AuthenticationError

    if getattr(app.state, "lakewarden_bearer", False):
        return
    counter = authn_failure_counter()

    def refused(exc: AuthenticationError, scope: Any) -> JSONResponse:
        _log.warning("401 on %s: %s", scope.get("path"), exc.reason)  # never the token
        counter.labels(exc.reason if exc.reason in AUTHN_REASONS else "other").inc()
        if failures is not None:
            failures.note(exc.reason, _client(scope))
        return JSONResponse(status_code=401, content={"error": str(exc)},
                            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'})

    async def on_error(request: Any, exc: Exception) -> JSONResponse:
        return refused(exc, request.scope)  # type: ignore[arg-type]

    class RequireBearer:
        """A plain ASGI middleware (no extra task per request, unlike BaseHTTPMiddleware)."""

        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").startswith(
                    _INFERENCE_PREFIXES):
                await self.app(scope, receive, send)
                return
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
            try:
                caller = authenticator.from_header(header)
            except AuthenticationError as exc:
                await refused(exc, scope)(scope, receive, send)
                return
            reset = _CALLER.set(caller)
            try:
                await self.app(scope, receive, send)
            finally:
                _CALLER.reset(reset)

    app.add_exception_handler(AuthenticationError, on_error)
    app.add_middleware(RequireBearer)
    app.state.lakewarden_bearer = True


def _config_file(config: "ProjectConfig") -> str:
    return str(config.source or config.base_dir / "lakewarden.yaml")


def _tls_path(config: "ProjectConfig", setting: str, value: str | os.PathLike[str]) -> Path:
    """A configured TLS file, resolved against the configuration's folder; ConfigError when it is missing."""
    path = config.path(str(value))
    if not path.is_file():
        raise ConfigError(f"{path} does not exist or is not a file", path=_config_file(config), field=setting,
                          hint=f"point {setting} at a PEM file, or remove serving.tls_cert and serving.tls_key "
                               "to serve plain HTTP (only with auth off)")
    return path


def check_private_key_file(path: Path, *, config: "ProjectConfig", setting: str = "serving.tls_key") -> None:
    """Refuse a private key file that others may read, or that its group may read while it is this
    user's own file (``chmod 600``).

    A key owned by another user and readable through its group is allowed: that is how a non-root
    server reads a key at all when root owns it (Debian's ``root:ssl-cert 0640``; a Kubernetes Secret
    volume mounted with ``fsGroup``, as serving/manifests.py renders it). Others never.

    Raises:
        ConfigError: naming the setting and the file, and saying how to fix it.
    """
    st = path.stat()  # follows links: a Kubernetes Secret's files are links into ..data/
    mode = st.st_mode & 0o777
    who = "everyone" if mode & 0o007 else "its group" if mode & 0o070 and st.st_uid == os.geteuid() else None
    if who:
        raise ConfigError(f"the private key file {path} is readable by {who} (mode {mode:04o}): refused",
                          path=_config_file(config), field=setting,
                          hint=f"chmod 600 {path} (a key readable by others is a key others may have copied)")


def tls_files(config: "ProjectConfig", *, cert: str | os.PathLike[str] | None = None,
              key: str | os.PathLike[str] | None = None) -> tuple[Path, Path] | None:
    """The predictor's certificate chain and key files, checked; None when it serves plain HTTP.

    ``cert``/``key`` (``lakewarden serve --tls-cert/--tls-key``: the files a Kubernetes Secret is
    mounted as) take the place of ``serving.tls_cert``/``serving.tls_key``. Both files must exist,
    the key must pass :func:`check_private_key_file`, and the two must load as a chain and its key.

    Raises:
        ConfigError: one of the two given without the other, a missing file, a key readable by
            others, or files that do not load (exit 2, naming the setting and the path).
    """
    import ssl

    src = _config_file(config)
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both or neither", path=src, field="serving")
    if cert is None:
        cert, key = config.serving.tls_cert, config.serving.tls_key
        cert_setting, key_setting = "serving.tls_cert", "serving.tls_key"
    else:
        cert_setting, key_setting = "--tls-cert", "--tls-key"
    if cert is None or key is None:
        return None
    cert_path = _tls_path(config, cert_setting, cert)
    key_path = _tls_path(config, key_setting, key)
    check_private_key_file(key_path, config=config, setting=key_setting)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{cert_path} and {key_path} do not load as a PEM certificate chain and its private key "
                          f"({getattr(exc, 'reason', None) or exc})", path=src, field=f"{cert_setting}/{key_setting}",
                          hint="the chain leaf first, and the unencrypted key of that leaf") from None
    return cert_path, key_path


def serve(ws: Workspace, ref: ModelRef | str, actor: Actor, *, port: int = 8080,
          tls_cert: str | os.PathLike[str] | None = None, tls_key: str | os.PathLike[str] | None = None) -> None:
    """Run KServe's ModelServer with the governed predictor in the foreground (the gate decides first).

    HTTPS with ``serving.tls_cert``/``serving.tls_key`` (or ``tls_cert``/``tls_key`` given here),
    checked by :func:`tls_files` before anything else is loaded; on ``port`` either way. With
    ``auth.enabled`` a certificate is required, and the issuer's keys are fetched before the server
    starts (an identity provider that cannot be reached stops it here, not at the first request);
    inference then needs a bearer token, and failed authentications are counted and audited (see
    the module docstring).

    Raises:
        PlaintextRefused: ``auth.enabled`` and no certificate (exit 2), before the model is loaded.
        ConfigError: TLS files missing, unreadable by design (a key others may read) or not loadable.
        AccessDenied: the serving identity may not serve this model.
    """
    from governance.gate import Resource
    from governance.policy import Stage
    from governance.tls import refuse_plaintext

    ws.gate.require_stage(Stage.SERVE, actor, Resource.model(model_name(ref)))
    tls = tls_files(ws.config, cert=tls_cert, key=tls_key)
    if tls is None:
        refuse_plaintext(ws.config, "the predictor", f"port {port}",
                         hint="set serving.tls_cert and serving.tls_key in lakewarden.yaml (a certificate for this "
                              "host; docs/configuration.md), or serve with auth off")
    kserve = _kserve()
    authenticator = None
    if ws.config.auth.enabled:
        from governance.authn import Authenticator

        authenticator = Authenticator.from_config(ws.config.auth, ws.policies)
        authenticator.verifier.refresh_keys()
    model = GovernedPredictor(ws, ref, actor, authenticator=authenticator)
    model.load()
    install_http_guards()
    if authenticator is not None:
        model.authn_failures = AuthnFailures(ws.audit, resource=f"model:{model.card.ref}")
        install_bearer_auth(authenticator, model.authn_failures)
    from serving.identity import install_identity_route

    install_identity_route(ws, str(model.card.ref))  # deploy checks whose server answers (serving/deploy.py)
    server = kserve.ModelServer(http_port=port, workers=1, enable_grpc=False,
                                ssl_certfile=str(tls[0]) if tls else None, ssl_keyfile=str(tls[1]) if tls else None)
    server.http_port = port  # KServe moves 8080 to 8443 when TLS is on: the port asked for is the port
    try:
        server.start([model])
    finally:
        if model.authn_failures is not None:
            model.authn_failures.flush()


__all__ = ["AuthnFailures", "GovernedPredictor", "SubjectNotFound", "authn_failure_counter", "check_private_key_file",
           "install_bearer_auth", "install_http_guards", "serve", "tls_files", "AUTHN_REASONS", "MAX_INSTANCES",
           "MAX_BODY_BYTES", "ID_FIELD"]
