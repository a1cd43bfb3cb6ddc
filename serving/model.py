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
import threading
import time
from collections import OrderedDict, deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from governance.gate import Actor
from governance.keys import TOKEN_RE
from governance.workspace import Workspace
from features.store import Features
from serving.requestlog import RequestLogWriter
from training.registry import ModelRef, Registry, model_name

MAX_INSTANCES = 1000
MAX_BODY_BYTES = 1 << 20
ID_FIELD = "subject_id"  # the field (V1) or input (V2) that names a subject by its own id
MAX_ID_CHARS = 1024
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


def install_bearer_auth(authenticator: Any) -> None:
    """Add to KServe's FastAPI app: every inference request (a POST under ``/v1/models/`` or
    ``/v2/models/``) needs a valid bearer token, else 401 before its body is read; the verified
    actor is what :meth:`caller` of the predictor decides for."""
    from fastapi.responses import JSONResponse
    from kserve.model_server import app

    from governance.authn import AuthenticationError

    if getattr(app.state, "lakewarden_bearer", False):
        return

    def unauthorized(exc: AuthenticationError) -> JSONResponse:
        return JSONResponse(status_code=401, content={"error": str(exc)},
                            headers={"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.reason}"'})

    async def on_error(_request: Any, exc: Exception) -> JSONResponse:
        return unauthorized(exc)  # type: ignore[arg-type]

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
                _log.warning("401 on %s: %s", scope.get("path"), exc.reason)  # never the token
                await unauthorized(exc)(scope, receive, send)
                return
            reset = _CALLER.set(caller)
            try:
                await self.app(scope, receive, send)
            finally:
                _CALLER.reset(reset)

    app.add_exception_handler(AuthenticationError, on_error)
    app.add_middleware(RequireBearer)
    app.state.lakewarden_bearer = True


def serve(ws: Workspace, ref: ModelRef | str, actor: Actor, *, port: int = 8080) -> None:
    """Run KServe's ModelServer with the governed predictor in the foreground (the gate decides first).

    With ``auth.enabled`` the issuer's keys are fetched before the server starts (an identity
    provider that cannot be reached stops it here, not at the first request), and inference
    needs a bearer token (see the module docstring)."""
    from governance.gate import Resource
    from governance.policy import Stage

    ws.gate.require_stage(Stage.SERVE, actor, Resource.model(model_name(ref)))
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
        install_bearer_auth(authenticator)
    from serving.identity import install_identity_route

    install_identity_route(ws, str(model.card.ref))  # deploy checks whose server answers (serving/deploy.py)
    kserve.ModelServer(http_port=port, workers=1, enable_grpc=False).start([model])


__all__ = ["GovernedPredictor", "SubjectNotFound", "install_bearer_auth", "install_http_guards", "serve", "MAX_INSTANCES", "MAX_BODY_BYTES",
           "ID_FIELD"]
