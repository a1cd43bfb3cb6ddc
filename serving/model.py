"""The governed KServe predictor: a registered model version behind KServe's ModelServer.

A request names subjects by their pseudonymous tokens only. For each request the predictor
asks the feature store for the model's online features — a gated, audited lookup for the
model card's purpose — encodes them exactly as at training (the encoder stored with the
model), scores them, and answers on both of KServe's protocols:

* V1: ``POST /v1/models/<name>:predict`` with ``{"instances": ["sub_…", …]}`` (or
  ``[{"customer_id": "sub_…"}]``) → ``{"predictions": [score, …]}``;
* Open Inference Protocol: ``POST /v2/models/<name>/infer`` with one BYTES input named after
  the subject key → one FP32 output ``score``.

Subjects the feature store does not know — never ingested, or erased — get a 404 naming the
tokens; malformed input gets a 400, an oversized body a 413; the server keeps serving.
Every scored entity is appended to a request log (token, features, score — no identifiers)
that ``lakewarden monitor`` reads for drift; the log is opened per append under a lock that
erasure also takes (:mod:`serving.requestlog`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from governance.gate import Actor
from governance.keys import TOKEN_RE
from governance.workspace import Workspace
from features.store import Features
from serving.requestlog import append_records
from training.encode import Encoder
from training.registry import ModelRef, Registry
from training.trainer import load_model

MAX_INSTANCES = 1000
MAX_BODY_BYTES = 1 << 20


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
        def __init__(self, ws: Workspace, ref: ModelRef | str, actor: Actor, *, log_requests: bool = True) -> None:
            reg = Registry(ws)
            card = reg.card(ref)
            reg.verify(card.ref)
            super().__init__(card.name)
            self.ws = ws
            self.card = card
            self.actor = actor
            self.features = Features(ws)
            self.key = ws.policies.dataset(card.dataset).subject_key
            self.encoder = Encoder.from_dict(card.preprocessing["encoder"])
            self.columns = [f.split(":", 1)[1] for f in card.features]
            self.threshold = float(card.preprocessing.get("threshold", 0.5))
            # Fail at start, not on every request: the serving identity must be allowed to serve
            # this model's features for the card's purpose.
            from governance.gate import Resource
            from governance.policy import Stage

            ws.gate.enforce(Stage.SERVE, actor, Resource.dataset(card.dataset),
                            {"purpose": card.purpose, "columns": self.columns})
            blob = (reg.path(card.ref) / "model.pt").read_bytes()
            self.torch_model = load_model(blob, card.preprocessing["n_features"], tuple(card.preprocessing["hidden"]))
            from prometheus_client import REGISTRY, Histogram

            from serving.monitor import DriftMetrics, Reference

            ref_file = reg.path(card.ref) / "reference.json"
            self.reference = Reference.from_json(ref_file.read_text()) if ref_file.exists() else None
            self.drift_metrics = DriftMetrics(REGISTRY)
            self.scored = 0
            self.drift_every = 1000  # recompute drift gauges after this many scored entities
            global _SCORE_HISTOGRAM
            if _SCORE_HISTOGRAM is None:
                _SCORE_HISTOGRAM = Histogram("lakewarden_prediction_score", "Scores served, per model",
                                             ["model"], buckets=[i / 10 for i in range(1, 10)], registry=REGISTRY)
            self.score_hist = _SCORE_HISTOGRAM.labels(card.name)
            self.log_path: Path | None = None
            if log_requests:
                self.log_path = ws.config.workspace_dir / "serving" / "requests" / f"{card.name}.jsonl"
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.ready = False

        def load(self) -> bool:
            # Open Feast before saying ready: importing it (typeguard instruments its modules)
            # and reading the registry took seconds, which the first request used to pay.
            self.features.store.get_feature_view(self.card.features[0].split(":", 1)[0])
            self.ready = True
            return self.ready

        # -- the work -----------------------------------------------------------------
        def score_tokens(self, tokens: list[str]) -> np.ndarray:
            import pyarrow as pa
            import torch

            tbl = self.features.online(self.actor, purpose=self.card.purpose, features=self.card.features, tokens=tokens)
            cols = [tbl[c] for c in self.columns]
            missing = [t for i, t in enumerate(tokens) if all(col[i].as_py() is None for col in cols)]
            if missing:
                raise SubjectNotFound(missing)
            x = self.encoder.transform(pa.table({c: tbl[c] for c in self.columns}))
            with torch.no_grad():
                scores = torch.sigmoid(self.torch_model(torch.from_numpy(x)).squeeze(-1)).numpy()
            for sc in scores:
                self.score_hist.observe(float(sc))
            self.scored += len(tokens)
            if self.log_path is not None:
                now = datetime.now(timezone.utc).isoformat()
                rows = tbl.to_pylist()
                # Opened per append under the logs' lock: an erasure may have replaced the file
                # (and erased a subject scored here meanwhile); see serving.requestlog.
                append_records(self.ws, self.log_path, [
                    {"ts": now, "model": self.card.name, "version": self.card.version, "token": t,
                     "features": {c: r[c] for c in self.columns}, "score": float(s)}
                    for t, r, s in zip(tokens, rows, scores)
                ])
                if self.reference is not None and self.scored // self.drift_every != (self.scored - len(tokens)) // self.drift_every:
                    self.refresh_drift()
            return scores

        def refresh_drift(self) -> Any:
            """PSI of recent traffic against the training reference, into the Prometheus gauges."""
            from serving.monitor import drift_report, read_request_log

            records = read_request_log(self.log_path, model=self.card.name, tail_bytes=4 << 20)[-10_000:]
            report = drift_report(self.reference, records, model=self.card.name)
            self.drift_metrics.observe(report)
            return report

        @staticmethod
        def _tokens_v1(payload: Any, key: str) -> list[str]:
            if isinstance(payload, (bytes, bytearray)):
                try:
                    payload = json.loads(payload)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise InvalidInput(f"the request body is not valid JSON ({exc})") from None
            if not isinstance(payload, dict) or "instances" not in payload:
                raise InvalidInput('expected a JSON object {"instances": [...]} with subject tokens')
            inst = payload["instances"]
            if not isinstance(inst, list) or not inst:
                raise InvalidInput('"instances" must be a non-empty list')
            out = []
            for i, v in enumerate(inst):
                if isinstance(v, dict):
                    v = v.get(key)
                if not isinstance(v, str):
                    raise InvalidInput(f'instance {i} must be a token string or {{"{key}": "sub_..."}}')
                out.append(v)
            return out

        def _tokens_v2(self, req: Any) -> list[str]:
            if len(req.inputs) != 1:
                raise InvalidInput(f"expected exactly one input named '{self.key}' (got {len(req.inputs)})")
            inp = req.inputs[0]
            if inp.name != self.key:
                raise InvalidInput(f"the input must be named '{self.key}' (got '{inp.name}')")
            if inp.datatype != "BYTES":
                raise InvalidInput(f"input '{self.key}' must have datatype BYTES (got {inp.datatype})")
            if len(inp.shape) != 1:
                raise InvalidInput(f"input '{self.key}' must be one-dimensional (shape [n]), got shape {inp.shape}")
            data = inp.data
            tokens = [d.decode() if isinstance(d, bytes) else d for d in data]
            if len(tokens) != inp.shape[0]:
                raise InvalidInput(f"shape {inp.shape} does not match {len(tokens)} values")
            return tokens

        def _check(self, tokens: list[str]) -> None:
            if len(tokens) > MAX_INSTANCES:
                raise InvalidInput(f"at most {MAX_INSTANCES} instances per request (got {len(tokens)})")
            bad = [i for i, t in enumerate(tokens) if not isinstance(t, str) or not TOKEN_RE.match(t)]
            if bad:
                raise InvalidInput(f"instance(s) {bad[:5]} are not subject tokens (sub_ + 26 base32 characters); "
                                   "the predictor never takes identifiers")

        async def predict(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
            if isinstance(payload, InferRequest):
                tokens = self._tokens_v2(payload)
                self._check(tokens)
                scores = self.score_tokens(tokens).astype(np.float32)
                out = InferOutput(name="score", shape=[len(scores)], datatype="FP32")
                out.set_data_from_numpy(scores, binary_data=False)
                return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[out],
                                     model_version=str(self.card.version))
            tokens = self._tokens_v1(payload, self.key)
            self._check(tokens)
            scores = self.score_tokens(tokens)
            return {"predictions": [float(s) for s in scores], "model_version": self.card.version}

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


def serve(ws: Workspace, ref: ModelRef | str, actor: Actor, *, port: int = 8080) -> None:
    """Run KServe's ModelServer with the governed predictor in the foreground."""
    kserve = _kserve()
    model = GovernedPredictor(ws, ref, actor)
    model.load()
    install_http_guards()
    from serving.identity import install_identity_route

    install_identity_route(ws, str(model.card.ref))  # deploy checks whose server answers (serving/deploy.py)
    kserve.ModelServer(http_port=port, workers=1, enable_grpc=False).start([model])


__all__ = ["GovernedPredictor", "SubjectNotFound", "install_http_guards", "serve", "MAX_INSTANCES", "MAX_BODY_BYTES"]
