"""Streaming ingest: a Kafka topic into a governed dataset, exactly once, within erasure's reach.

``stream(ws, actor, dataset, topic)`` consumes the topic in micro-batches and runs each batch
through the same governed ingest as a file (:class:`lakehouse.ingest.Ingestor`): the data
contract, quarantine with reasons, tokens, the vault, sealing, subject buckets, audit and
lineage. A batch belongs to one partition and closes when it holds ``batch_records`` records
or its first record has waited ``batch_seconds``.

**Exactly once.** Every Delta commit of a batch carries the Delta application transaction
``lakewarden.stream.<dataset>.<topic>.<partition>`` at the batch's last offset: the data
tables (quarantine, vault, restricted, then bronze, in that order) and, last, the ingest
ledger. A restart resumes each partition from the tables, never from the broker's committed
offsets (those are committed too, but only so that standard lag tools see them):

* the ledger's version is the last batch fully recorded; consumption resumes after it;
* bronze is written after every other table of a batch, so a batch bronze holds and the ledger
  does not is complete in the tables: its ledger row is written from their counts;
* a table holding a later offset than bronze and the ledger (a batch cut by a crash) makes the
  next batch end exactly at that offset, so the replay is the same batch, and each table
  skips it if its own transaction already covers it.

A batch is never half in a table, no record lands twice, and per partition
``read = accepted + quarantined`` (``lakewarden stream status`` shows it from the ledger).

**The broker's log is in erasure's scope.** It keeps its own copy of every record, outside any
table that an erasure rewrites. Producers seal each record for its subject before sending
(:class:`SealedProducer`: AES-256-GCM under the subject's own key, the token as the message
key), so a shred makes the broker's copies unreadable. The dataset policy decides
(``stream.sealed``): ``required`` (the default) quarantines a record that is not sealed;
``optional`` accepts raw JSON too, but then ``stream.max_topic_retention`` must cap how long the
broker keeps it, and the stream refuses a topic that keeps records longer. The erasure scanner
decodes the broker's log segments (:mod:`governance.erasure.kafka_log`).

Bad messages never stop the stream: not UTF-8, not JSON, not an object, nested values,
unexpected fields, oversized, a seal that does not open (an erased subject, or tampering), a
seal for another subject than the record names, unsealed under ``sealed: required``: each is
quarantined with its reason, sealed under the dataset's quarantine key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, Transaction

from governance.gate import Actor, Resource
from governance.keys import native
from governance.lineage import DatasetRef
from governance.policy import DatasetPolicy, Stage
from governance.workspace import Workspace
from lakehouse.alloc import batch_memory
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import StreamError
from lakehouse.ingest import LEDGER, FileReport, Ingestor, default_batch_rows
from lakehouse.readers import Malformed, RawBatch, json_text, utf8_encodable
from lakehouse.validate import plan_shape

ENVELOPE = "sealed/v1"
"""The ``lakewarden`` field of a sealed message: ``{"lakewarden": "sealed/v1", "subject": <token>,
"record": <base64 of the record's JSON sealed for the subject>}``."""
SEAL_COLUMN = "record"
LAYERS = ("quarantine", "vault", "restricted", "bronze")  # bronze last: see the module docstring

log = logging.getLogger(__name__)


def seal_dataset(dataset: str) -> str:
    """The dataset a sealed record's associated data names (a seal for one dataset opens for no other)."""
    return f"stream.{dataset}"


def app_id(dataset: str, topic: str, partition: int) -> str:
    """The Delta application transaction of one topic partition in one dataset."""
    return f"lakewarden.stream.{dataset}.{topic}.{partition}"


def batch_id(dataset: str, topic: str, partition: int, last_offset: int) -> str:
    """A stream batch's id: batches of a partition never overlap, so the last offset names one."""
    h = hashlib.sha256(f"lakewarden-stream:v1|{dataset}|{topic}|{partition}|{last_offset}".encode())
    return h.hexdigest()[:32]


def client_options(ws: Workspace, bootstrap: str | None = None) -> dict[str, str]:
    """librdkafka options: the configuration's, then ``LAKEWARDEN_KAFKA_<OPTION>`` from the
    environment (secrets such as ``sasl.password`` belong there, never in lakewarden.yaml)."""
    cfg = ws.config.streaming
    opts = {"bootstrap.servers": bootstrap or cfg.bootstrap_servers, **cfg.options}
    for k, v in os.environ.items():
        if k.startswith("LAKEWARDEN_KAFKA_") and k != "LAKEWARDEN_KAFKA_HOME":
            opts[k[len("LAKEWARDEN_KAFKA_"):].lower().replace("_", ".")] = v
    return opts


# ---------------------------------------------------------------------------------- producing


class SealedProducer:
    """Send records to a topic sealed for their subjects, so that an erasure reaches the broker.

    Each record's JSON is sealed with AES-256-GCM under its subject's own key (created if new),
    bound to the dataset; the message key is the subject's token (a subject's records stay in
    one partition, in order). The gate decides once, at construction (``ingest`` on the
    dataset), and each :meth:`send` is audited with its count, never its values.

        with SealedProducer(ws, actor, "transactions", "tx-events") as p:
            p.send([{"customer_id": "C-1", "amount": "12.50", ...}, ...])
    """

    def __init__(self, ws: Workspace, actor: Actor, dataset: str, topic: str, *, bootstrap: str | None = None,
                 options: Mapping[str, str] | None = None) -> None:
        from confluent_kafka import Producer

        TableRef("bronze", dataset)
        ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(dataset))
        self.ws, self.actor, self.dataset, self.topic = ws, actor, dataset, topic
        self.policy: DatasetPolicy = ws.policies.dataset(dataset)
        self._key = self.policy.subject_key
        self._errors: list[str] = []
        conf = {**client_options(ws, bootstrap), "enable.idempotence": True, "linger.ms": 20,
                "compression.type": "zstd", **(options or {})}
        self._producer = Producer(conf)

    def _subject_id(self, i: int, rec: Mapping[str, Any]) -> str:
        for k, v in rec.items():
            if k.strip().lower() == self._key.lower() and v is not None and str(v).strip():
                return str(v).strip()
        raise StreamError(f"record {i}: no subject key '{self._key}': a record can only be sealed for its subject")

    def send(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Seal and send ``records``; returns how many were handed to the client (see :meth:`flush`)."""
        if not records:
            return 0
        ids = [self._subject_id(i, r) for i, r in enumerate(records)]
        tokens = self.ws.keyring.tokens_for(ids)
        payloads = [json.dumps(r, default=str, ensure_ascii=False, separators=(",", ":")) for r in records]
        blobs = self.ws.keyring.seal_many(payloads, tokens, dataset=seal_dataset(self.dataset), column=SEAL_COLUMN)
        produce, poll = self._producer.produce, self._producer.poll
        for tok, blob in zip(tokens, blobs):
            value = json.dumps({"lakewarden": ENVELOPE, "subject": tok, "record": base64.b64encode(blob).decode()},
                               separators=(",", ":")).encode()
            while True:
                try:
                    produce(self.topic, value=value, key=tok.encode(), on_delivery=self._delivered)
                    break
                except BufferError:  # the client's queue is full: let it drain
                    poll(0.1)
            poll(0)
        self.ws.audit.record("stream.produce", actor=self.actor.name, outcome="ok", stage=Stage.INGEST.value,
                             resource=f"dataset:{self.dataset}", details={"topic": self.topic, "records": len(records)})
        return len(records)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(str(err))

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until every record is acknowledged by the broker.

        Raises:
            StreamError: records were not delivered (the first reasons are named).
        """
        left = self._producer.flush(timeout)
        if left or self._errors:
            errs, self._errors = self._errors[:3], []
            raise StreamError(f"{left} record(s) still queued after {timeout:.0f}s; delivery errors: {errs or 'none'}")

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> "SealedProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


# ---------------------------------------------------------------------------------- decoding


class _Decoder:
    """Messages of one partition -> a :class:`RawBatch` of text columns plus malformed records."""

    def __init__(self, ws: Workspace, dataset: str, policy: DatasetPolicy) -> None:
        self.ws = ws
        self.dataset = dataset
        self.policy = policy
        self.names = list(policy.columns)
        self.lookup = {n.lower(): n for n in self.names}
        self.lookup_lower = {low: self.names.index(n) for low, n in self.lookup.items()}
        self.max_bytes = policy.stream.max_message_bytes
        self.sealed_required = policy.stream.sealed == "required"
        self.drop_unknown = policy.contract.unknown_columns == "drop"

    @staticmethod
    def _text(value: bytes) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + base64.b64encode(value).decode()

    def decode(self, msgs: Sequence[tuple[int, bytes | None, int]]) -> RawBatch:
        """Decode one batch of ``(offset, value, timestamp)`` messages; malformed ones by offset."""
        out = None
        try:
            out = self._decode_native(msgs)
        except Exception as exc:  # noqa: BLE001 - the reference decoder decides a batch the fast path could not
            # the type only: a message could quote a value
            log.warning("stream decoder: the native path failed on a batch (%s); the Python decoder decodes it",
                        type(exc).__name__)
        if out is None:
            out = self._decode_python(msgs)
        out.malformed.sort(key=lambda m: m.row or 0)
        return out

    def _decode_python(self, msgs: Sequence[tuple[int, bytes | None, int]]) -> RawBatch:
        bad: list[Malformed] = []
        objs: list[tuple[int, dict, str | None]] = []  # offset, record, token it was sealed for
        sealed: list[tuple[int, str, bytes, bytes]] = []  # offset, token, blob, raw message
        for off, value, _ts in msgs:
            try:
                if value is None:
                    bad.append(Malformed(off, "", "a message without a value (tombstone)"))
                    continue
                if len(value) > self.max_bytes:
                    bad.append(Malformed(off, self._text(value),
                                         f"oversized message ({len(value):,} bytes > stream.max_message_bytes "
                                         f"{self.max_bytes:,})"))
                    continue
                try:
                    obj = json.loads(value)
                except UnicodeDecodeError:
                    bad.append(Malformed(off, self._text(value), "not valid UTF-8 text"))
                    continue
                except ValueError as exc:
                    bad.append(Malformed(off, self._text(value), f"invalid JSON ({exc.msg})"))
                    continue
                if not isinstance(obj, dict):
                    bad.append(Malformed(off, self._text(value), "a message must be a JSON object"))
                    continue
                if "lakewarden" in obj:
                    env = self._envelope(obj)
                    if env is None:
                        bad.append(Malformed(off, self._text(value), f"not a {ENVELOPE} envelope (lakewarden, subject, record)"))
                    else:
                        sealed.append((off, env[0], env[1], value))
                    continue
                if self.sealed_required:
                    bad.append(Malformed(off, self._text(value),
                                         "not sealed for its subject (the policy's stream.sealed is required)"))
                    continue
                objs.append((off, obj, None))
            except Exception as exc:  # noqa: BLE001 - a poison message is quarantined, never stops the stream
                bad.append(Malformed(off, self._text(value or b""), f"could not be decoded ({type(exc).__name__})"))
        objs.extend(self._check_opened(self._open(sealed, bad), bad))
        objs.sort(key=lambda o: o[0])
        return self._rows(objs, bad)

    def _decode_native(self, msgs: Sequence[tuple[int, bytes | None, int]]) -> RawBatch | None:
        """The same batch through the native core; the messages it cannot be sure of go through
        :meth:`_decode_python`, so every reason to quarantine is the Python decoder's. None when
        the core is absent."""
        if native.backend() != "native":
            return None
        values = pa.array([m[1] for m in msgs], pa.binary())
        kinds, cols, toks, blobs = native.json_records(  # type: ignore[misc]
            values, self.lookup_lower, len(self.names), drop_unknown=self.drop_unknown, envelope=ENVELOPE,
            max_bytes=self.max_bytes)
        offsets = pa.array([m[0] for m in msgs], pa.int64())
        if self.sealed_required:
            kinds = np.where(kinds == native.RECORD, native.PYTHON, kinds)
        pieces: list[tuple[pa.Table, pa.Array]] = []
        rec = kinds == native.RECORD
        if rec.any():
            mask = pa.array(rec)
            pieces.append((pa.table([c.filter(mask) for c in cols], names=self.names), offsets.filter(mask)))
        by_python = list(np.flatnonzero(kinds == native.PYTHON))
        env = np.flatnonzero(kinds == native.ENVELOPE)
        bad: list[Malformed] = []
        if len(env):
            mask = pa.array(kinds == native.ENVELOPE)
            env_toks, env_blobs, env_offs = toks.filter(mask), blobs.filter(mask), offsets.filter(mask)
            try:
                plain = self.ws.keyring.open_arrow(env_blobs, env_toks, dataset=seal_dataset(self.dataset),
                                                   column=SEAL_COLUMN)
            except Exception:  # noqa: BLE001 - one that does not open: the Python decoder names it
                by_python.extend(env.tolist())
            else:
                pieces.extend(self._opened_native(plain, env_toks, env_offs, env, msgs, bad))
        if by_python:
            py = self._decode_python([msgs[i] for i in sorted(by_python)])
            pieces.append((py.table, py.offsets))
            bad.extend(py.malformed)
        if not pieces:
            return RawBatch(pa.table({n: pa.array([], pa.string()) for n in self.names}), 0, bad,
                            offsets=pa.array([], pa.int64()))
        tbl = pa.concat_tables([t for t, _ in pieces])
        offs = pa.concat_arrays([o for _, o in pieces])
        order = pc.sort_indices(offs)
        return RawBatch(tbl.take(order), 0, bad, offsets=offs.take(order))

    def _opened_native(self, plain: pa.Array, toks: pa.Array, offs: pa.Array, rows: np.ndarray,
                       msgs: Sequence[tuple[int, bytes | None, int]], bad: list[Malformed]
                       ) -> list[tuple[pa.Table, pa.Array]]:
        """Opened envelopes' records into columns; each must name the subject it was sealed for."""
        kinds, cols, _t, _b = native.json_records(plain, self.lookup_lower, len(self.names),  # type: ignore[misc]
                                                  drop_unknown=self.drop_unknown)
        ok = kinds == native.RECORD  # a fresh array: marked below
        subject = self.lookup_lower.get(self.policy.subject_key.lower())
        if subject is None:
            ok[:] = False  # the subject's field is not a column: the Python check finds it
        if ok.any():
            ids = cols[subject]
            stripped = pc.utf8_trim_whitespace(ids)
            named = pc.and_(pc.is_valid(ids), pc.not_equal(stripped, "")).fill_null(False)
            named_np = np.asarray(named.to_numpy(zero_copy_only=False)) & ok
            if named_np.any():
                sel = pa.array(named_np)
                actual = self.ws.keyring.store.subject_keys(ids.filter(sel), create=False).tokens
                same = pc.equal(actual, toks.filter(sel)).fill_null(False).to_numpy(zero_copy_only=False)
                wrong = np.flatnonzero(named_np)[~same]
                ok[wrong] = False  # the Python check names them
        out = []
        if ok.any():
            mask = pa.array(ok)
            out.append((pa.table([c.filter(mask) for c in cols], names=self.names), offs.filter(mask)))
        opened = [(msgs[rows[i]][0], toks[i].as_py(), plain[i].as_py(), msgs[rows[i]][1]) for i in np.flatnonzero(~ok)]
        objs = self._check_opened(opened, bad)
        if objs:
            rb = self._rows(sorted(objs, key=lambda o: o[0]), bad)
            out.append((rb.table, rb.offsets))
        return out

    @staticmethod
    def _envelope(obj: dict) -> tuple[str, bytes] | None:
        if obj.get("lakewarden") != ENVELOPE or set(obj) != {"lakewarden", "subject", "record"}:
            return None
        tok, rec = obj["subject"], obj["record"]
        if not isinstance(tok, str) or not isinstance(rec, str):
            return None
        try:
            return tok, base64.b64decode(rec, validate=True)
        except ValueError:
            return None

    def _open(self, sealed: list[tuple[int, str, bytes, bytes]], bad: list[Malformed]) -> list[tuple[int, str, bytes, bytes]]:
        """Open sealed envelopes: ``(offset, token, record bytes, raw message)`` for those that open."""
        if not sealed:
            return []
        ring, ds = self.ws.keyring, seal_dataset(self.dataset)
        try:
            plain: list[bytes | None] = ring.open_many([s[2] for s in sealed], [s[1] for s in sealed],
                                                       dataset=ds, column=SEAL_COLUMN)
            errors: list[str | None] = [None] * len(sealed)
        except Exception:  # noqa: BLE001 - one bad seal: open them one by one to find which
            plain, errors = [], []
            for _off, tok, blob, _raw in sealed:
                try:
                    plain.append(ring.open(blob, token=tok, dataset=ds, column=SEAL_COLUMN))
                    errors.append(None)
                except Exception as exc:  # noqa: BLE001
                    plain.append(None)
                    errors.append(type(exc).__name__)
        out = []
        for (off, tok, _blob, raw), p, err in zip(sealed, plain, errors):
            if p is None:
                why = ("the subject's key was destroyed (erased)" if err == "SubjectShredded"
                       else "unknown subject token" if err == "KeyManagementError" else "tampered, or sealed for another dataset")
                bad.append(Malformed(off, self._text(raw), f"sealed record cannot be opened: {why}"))
                continue
            out.append((off, tok, p, raw))
        return out

    def _check_opened(self, opened: list[tuple[int, str, bytes, bytes]], bad: list[Malformed]) -> list[tuple[int, dict, str]]:
        """Opened records as objects; each must be a JSON object naming the subject it was sealed for."""
        out = []
        for off, tok, p, raw in opened:
            try:
                obj = json.loads(p)
            except ValueError:
                bad.append(Malformed(off, self._text(raw), "sealed record is not JSON"))
                continue
            if not isinstance(obj, dict):
                bad.append(Malformed(off, self._text(raw), "sealed record is not a JSON object"))
                continue
            out.append((off, obj, tok))
        # A record sealed for one subject but naming another would escape the named subject's erasure.
        # The subject's field is found as every field is (stripped, any case).
        key = self.policy.subject_key
        ids = []
        for _off, obj, _tok in out:
            v = next((obj[k] for k in obj if k.strip().lower() == key.lower()), None)
            ids.append(None if v is None or isinstance(v, (dict, list)) else (json_text(v) or "").strip() or None)
        known = [i for i in ids if i is not None]
        toks = iter(self.ws.keyring.tokens_for(known, create=False)) if known else iter(())
        kept = []
        for (off, obj, tok), sid in zip(out, ids):
            actual = next(toks) if sid is not None else None
            if sid is not None and actual != tok:
                bad.append(Malformed(off, self._dump(obj),
                                     f"sealed for another subject than its {key}"))
                continue
            kept.append((off, obj, tok))
        return kept

    @staticmethod
    def _dump(obj: dict) -> str:
        """A record as JSON text for the quarantine, escaped where it holds a lone surrogate."""
        text = json.dumps(obj, default=str, ensure_ascii=False)
        return text if utf8_encodable(text) else json.dumps(obj, default=str)

    def _rows(self, objs: list[tuple[int, dict, str | None]], bad: list[Malformed]) -> RawBatch:
        cols: dict[str, list[str | None]] = {n: [] for n in self.names}
        offsets: list[int] = []
        for off, obj, _tok in objs:
            row: dict[str, str | None] = {}
            unknown = []
            try:
                for k, v in obj.items():
                    name = self.lookup.get(k.strip().lower())
                    if name is None:
                        unknown.append(k)
                        continue
                    row[name] = json_text(v)  # TypeError: nested
            except TypeError:
                bad.append(Malformed(off, self._dump(obj),
                                     "nested objects or arrays are not allowed"))
                continue
            if unknown and not self.drop_unknown:
                shown = ", ".join(repr(u)[:40] for u in unknown[:5])
                bad.append(Malformed(off, self._dump(obj),
                                     f"unexpected field(s) {shown} (contract.unknown_columns: reject)"))
                continue
            broken = next((n for n, t in row.items() if t is not None and not t.isascii() and not utf8_encodable(t)), None)
            if broken is not None:  # "\ud800" is valid JSON, but no text: it would stop the batch
                bad.append(Malformed(off, self._dump(obj),
                                     f"field '{broken}' is not valid Unicode text (an unpaired surrogate escape)"))
                continue
            for n in self.names:
                cols[n].append(row.get(n))
            offsets.append(off)
        tbl = pa.table({n: pa.array(v, pa.string()) for n, v in cols.items()})
        return RawBatch(tbl, 0, bad, offsets=pa.array(offsets, pa.int64()))


# ---------------------------------------------------------------------------------- resuming


def _txn_versions(catalog: Catalog, ref: TableRef | None, uri: str | None, app: str) -> int | None:
    uri = uri or catalog.uri(ref)  # type: ignore[arg-type]
    so = catalog.storage_options
    if not DeltaTable.is_deltatable(uri, storage_options=so):
        return None
    return DeltaTable(uri, storage_options=so).transaction_version(app)


def watermarks(ws: Workspace, dataset: str, topic: str, partition: int) -> dict[str, int | None]:
    """The last offset of ``topic``/``partition`` each table (and the ledger) holds."""
    cat = Catalog(ws.config)
    app = app_id(dataset, topic, partition)
    out: dict[str, int | None] = {layer: _txn_versions(cat, TableRef(layer, dataset), None, app) for layer in LAYERS}
    out["ledger"] = _txn_versions(cat, None, ws.config.table_uri(LEDGER), app)
    return out


def _count(catalog: Catalog, ref: TableRef, bid: str, col: str) -> tuple[int, int | None]:
    if not catalog.exists(ref):
        return 0, None
    t = catalog.open(ref).to_pyarrow_dataset().to_table(columns=[col], filter=pc.field("_batch_id") == bid)
    return t.num_rows, (pc.min(t[col]).as_py() if t.num_rows else None)


# ---------------------------------------------------------------------------------- the stream


@dataclass
class PartitionReport:
    partition: int
    rows_read: int = 0
    rows_accepted: int = 0
    rows_quarantined: int = 0
    batches: int = 0
    first_offset: int | None = None
    last_offset: int | None = None  # the last offset committed (ledger)
    resumed_from: int | None = None  # the first offset this run asked the broker for
    recovered: int = 0  # batches finished from a crashed run's tables
    lag: int | None = None

    @property
    def balanced(self) -> bool:
        return self.rows_read == self.rows_accepted + self.rows_quarantined


@dataclass
class StreamReport:
    """What a stream run did; per partition ``rows_read == rows_accepted + rows_quarantined``."""

    dataset: str
    topic: str
    partitions: dict[int, PartitionReport] = field(default_factory=dict)
    reasons: Counter = field(default_factory=Counter)
    versions: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # produce (message timestamp) -> committed, per record
    batch_seconds: list[float] = field(default_factory=list)  # first record buffered -> committed, per batch
    seconds: float = 0.0
    busy_seconds: float = 0.0  # from the first record received to the last batch committed
    stopped: str = ""

    def _sum(self, attr: str) -> int:
        return sum(getattr(p, attr) for p in self.partitions.values())

    rows_read = property(lambda self: self._sum("rows_read"))
    rows_accepted = property(lambda self: self._sum("rows_accepted"))
    rows_quarantined = property(lambda self: self._sum("rows_quarantined"))
    batches = property(lambda self: self._sum("batches"))

    def latency(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "topic": self.topic, "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted, "rows_quarantined": self.rows_quarantined,
            "batches": self.batches, "reasons": dict(self.reasons.most_common()), "versions": self.versions,
            "partitions": [
                {"partition": p.partition, "rows_read": p.rows_read, "accepted": p.rows_accepted,
                 "quarantined": p.rows_quarantined, "batches": p.batches, "resumed_from": p.resumed_from,
                 "last_offset": p.last_offset, "recovered_batches": p.recovered, "lag": p.lag}
                for p in sorted(self.partitions.values(), key=lambda p: p.partition)
            ],
            "latency_ms": {"p50": _r(self.latency(50)), "p99": _r(self.latency(99))},
            "seconds": round(self.seconds, 3), "busy_seconds": round(self.busy_seconds, 3), "stopped": self.stopped,
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


@dataclass
class _Part:
    msgs: list[tuple[int, bytes | None, int]] = field(default_factory=list)
    opened: float | None = None  # clock() when the first buffered record arrived
    force_end: int | None = None  # replay a batch cut by a crash: it ends exactly here
    committed: int | None = None  # the ledger's last offset
    eof: bool = False
    high: int | None = None  # the broker's high watermark, last fetched


class _Metrics:
    """Prometheus series of one stream (served with ``metrics_port``)."""

    def __init__(self, dataset: str, topic: str, port: int | None) -> None:
        from prometheus_client import CollectorRegistry, Counter as PCounter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.lag = Gauge("lakewarden_stream_lag_records", "offsets on the broker not yet in a committed Delta version",
                         ["dataset", "topic", "partition"], registry=self.registry)
        self.records = PCounter("lakewarden_stream_records", "records committed, by outcome",
                                ["dataset", "topic", "outcome"], registry=self.registry)
        self.latency = Histogram("lakewarden_stream_commit_latency_seconds",
                                 "from a record's produce timestamp to its committed Delta version",
                                 ["dataset", "topic"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
        self.last_commit = Gauge("lakewarden_stream_last_commit_timestamp_seconds", "when a batch last committed",
                                 ["dataset", "topic"], registry=self.registry)
        self.labels = (dataset, topic)
        self.server = None
        if port is not None:
            self.server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class StreamIngest:
    """One stream run over ``topic`` into ``dataset``. Use :func:`stream`."""

    def __init__(self, ws: Workspace, actor: Actor, dataset: str, topic: str, *, bootstrap: str | None,
                 group: str | None, batch_records: int, batch_seconds: float, clock: Callable[[], float],
                 metrics_port: int | None, progress: Callable[[str, int], None] | None,
                 options: Mapping[str, str] | None) -> None:
        self.ws, self.actor, self.dataset, self.topic = ws, actor, dataset, topic
        self.policy = ws.policies.dataset(dataset)
        self.batch_records = batch_records
        self.batch_seconds = batch_seconds
        self.clock = clock
        self.progress = progress
        self.catalog = Catalog(ws.config)
        self.report = StreamReport(dataset, topic)
        self.parts: dict[int, _Part] = {}
        self.decoder = _Decoder(ws, dataset, self.policy)
        self.plan = plan_shape(self.policy, list(self.policy.columns), source=f"kafka:{topic}")
        self.ing = Ingestor(ws, actor, dataset, batch_rows=max(batch_records, 1), progress=None)
        self._lock = threading.Lock()
        self._to_commit: dict[int, int] = {}  # partition -> next offset, for the broker's group offsets
        self._first_record: float | None = None
        self._last_commit: float | None = None
        self._inflight: tuple[int, list, float | None, Future] | None = None  # closed, being decoded and checked
        self.metrics = _Metrics(dataset, topic, metrics_port)
        self.conf = {
            **client_options(ws, bootstrap), "group.id": group or f"lakewarden.{dataset}",
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "enable.partition.eof": True, "max.poll.interval.ms": 900_000,
            "fetch.max.bytes": max(52_428_800, 2 * self.policy.stream.max_message_bytes),
            "message.max.bytes": max(1_000_000, self.policy.stream.max_message_bytes + 4096),
            **(options or {}),
        }
        from confluent_kafka import Consumer

        self.consumer = Consumer(self.conf)
        self._check_topic()

    # -- setup ------------------------------------------------------------------------
    def _check_topic(self) -> None:
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient, ConfigResource

        try:
            md = self.consumer.list_topics(self.topic, timeout=10)
        except KafkaException as exc:
            raise StreamError(f"cannot reach the broker at {self.conf['bootstrap.servers']}: {exc}") from None
        t = md.topics.get(self.topic)
        if t is None or t.error is not None:
            raise StreamError(f"topic {self.topic!r} does not exist on {self.conf['bootstrap.servers']}")
        cap: timedelta | None = self.policy.stream.max_topic_retention
        if cap is None:
            return
        admin = AdminClient({k: v for k, v in self.conf.items() if not k.startswith(("group.", "enable.", "auto.",
                             "isolation.", "max.poll", "fetch."))})
        res = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
        try:
            cfg = admin.describe_configs([res])[res].result(timeout=10)
        except KafkaException as exc:
            raise StreamError(f"cannot read topic {self.topic!r}'s retention (policy stream.max_topic_retention "
                              f"needs it): {exc}") from None
        ms = int(cfg["retention.ms"].value)
        if ms < 0 or ms > cap.total_seconds() * 1000:
            kept = "forever" if ms < 0 else f"{ms / 3_600_000:g}h"
            raise StreamError(
                f"topic {self.topic!r} keeps records {kept}, longer than policies/{self.dataset}.yaml "
                f"stream.max_topic_retention ({cap.total_seconds() / 3600:g}h): raw records there would outlive an "
                f"erasure; lower the topic's retention.ms or seal records (stream.sealed: required)"
            )

    def _resume(self, p: int) -> int | None:
        """Where partition ``p`` resumes (None: from its beginning); finishes a crashed run's batch."""
        st = self.parts.setdefault(p, _Part())
        rep = self.report.partitions.setdefault(p, PartitionReport(p))
        w = watermarks(self.ws, self.dataset, self.topic, p)
        ledger, bronze = w["ledger"], w["bronze"]
        if bronze is not None and (ledger is None or bronze > ledger):
            # Bronze is written last: the batch is in every table; only its ledger row is missing.
            bid = batch_id(self.dataset, self.topic, p, bronze)
            acc, first_a = _count(self.catalog, TableRef("bronze", self.dataset), bid, "_row")
            quar, first_q = _count(self.catalog, TableRef("quarantine", self.dataset), bid, "row_number")
            first = min(x for x in (first_a, first_q) if x is not None) if (first_a, first_q) != (None, None) else bronze
            self.ing._ledger(bid, self._source(p), first, acc + quar, acc, quar, self.ing.ws.now(),
                             Transaction(app_id(self.dataset, self.topic, p), bronze))
            self.ws.audit.record("ingest.batch", actor=self.actor.name, outcome="ok", stage=Stage.INGEST.value,
                                 resource=f"dataset:{self.dataset}",
                                 details={"batch_id": bid, "rows_read": acc + quar, "accepted": acc,
                                          "quarantined": quar, "recovered": True})
            ledger = bronze
            rep.recovered += 1
        done = [v for v in w.values() if v is not None]
        top = max(done) if done else None
        st.committed = ledger
        st.force_end = top if top is not None and (ledger is None or top > ledger) else None
        st.msgs, st.opened, st.eof = [], None, False
        rep.last_offset = ledger
        rep.resumed_from = None if ledger is None else ledger + 1
        return rep.resumed_from

    def _source(self, p: int) -> str:
        return f"kafka:{self.topic}/{p}"

    # -- rebalances -------------------------------------------------------------------
    def _on_assign(self, consumer: Any, partitions: list) -> None:
        from confluent_kafka import OFFSET_BEGINNING

        for tp in partitions:
            start = self._resume(tp.partition)
            tp.offset = OFFSET_BEGINNING if start is None else start
        consumer.assign(partitions)
        self.ws.audit.record("stream.assign", actor=self.actor.name, outcome="ok", stage=Stage.INGEST.value,
                             resource=f"dataset:{self.dataset}",
                             details={"topic": self.topic, "partitions": sorted(tp.partition for tp in partitions)})

    def _on_revoke(self, consumer: Any, partitions: list) -> None:
        """Commit what is buffered for the partitions leaving, before another consumer takes them."""
        for tp in partitions:
            st = self.parts.get(tp.partition)
            if st is not None and st.msgs and st.force_end is None:
                self._close(tp.partition)
        self._drain()
        self.ing.wait()
        self._commit_offsets()
        for tp in partitions:
            self.parts.pop(tp.partition, None)

    def _on_lost(self, consumer: Any, partitions: list) -> None:
        for tp in partitions:  # another consumer owns them now: what is buffered is its to replay
            self.parts.pop(tp.partition, None)
            if self._inflight is not None and self._inflight[0] == tp.partition:
                self._inflight = None

    # -- batches ----------------------------------------------------------------------
    def _due(self, st: _Part, now: float) -> bool:
        if not st.msgs:
            return False
        if st.force_end is not None:
            return st.msgs[-1][0] >= st.force_end
        return len(st.msgs) >= self.batch_records or (now - (st.opened or now)) >= self.batch_seconds

    def _close(self, p: int) -> None:
        """Close partition ``p``'s open batch: it is decoded and checked in the pool while this
        thread goes on consuming, then finished (protected, committed) in the order batches
        closed. At most one batch is in flight: the one before is finished first."""
        st = self.parts[p]
        msgs, opened = st.msgs, st.opened
        st.msgs, st.opened, st.force_end = [], None, None
        prepared = self.ing._pool.submit(self._prepare, msgs)
        before, self._inflight = self._inflight, (p, msgs, opened, prepared)
        if before is not None:
            self._finish(*before)

    def _drain(self, *, only_done: bool = False) -> None:
        """Finish the batch in flight (with ``only_done``, only when its decode and check are done)."""
        if self._inflight is not None and (not only_done or self._inflight[3].done()):
            before, self._inflight = self._inflight, None
            self._finish(*before)

    def _prepare(self, msgs: list[tuple[int, bytes | None, int]]) -> tuple[RawBatch, Any]:
        raw = self.decoder.decode(msgs)
        return raw, self.ing._check(raw, self.plan)

    def _finish(self, p: int, msgs: list[tuple[int, bytes | None, int]], opened: float | None,
                prepared: Future) -> None:
        first, last = msgs[0][0], msgs[-1][0]
        bid = batch_id(self.dataset, self.topic, p, last)
        raw, checked_out = prepared.result()
        checked: Future = Future()
        checked.set_result(checked_out)
        frep = FileReport(source=self._source(p))
        txn = Transaction(app_id(self.dataset, self.topic, p), last)
        stamps = np.fromiter((m[2] for m in msgs), dtype=np.float64, count=len(msgs))

        def committed(n_acc: int, n_q: int) -> None:
            now_ms = time.time() * 1000
            with self._lock:
                rep = self.report.partitions.setdefault(p, PartitionReport(p))
                rep.rows_read += len(msgs)
                rep.rows_accepted += n_acc
                rep.rows_quarantined += n_q
                rep.batches += 1
                rep.first_offset = first if rep.first_offset is None else rep.first_offset
                rep.last_offset = last
                lat = now_ms - stamps[stamps > 0]
                self.report.latencies_ms.extend(lat.tolist())
                if opened is not None:
                    self.report.batch_seconds.append(self.clock() - opened)
                self._to_commit[p] = last + 1
                self._last_commit = self.clock()
                if p in self.parts:
                    self.parts[p].committed = last
            lbl = self.metrics.labels
            self.metrics.records.labels(*lbl, "accepted").inc(n_acc)
            self.metrics.records.labels(*lbl, "quarantined").inc(n_q)
            for v in lat[:: max(1, len(lat) // 1000)]:  # a sample is enough for the histogram
                self.metrics.latency.labels(*lbl).observe(v / 1000)
            self.metrics.last_commit.labels(*lbl).set(time.time())

        if len(msgs) != raw.rows_read:  # never expected: decoding accounts for every message
            raise StreamError(f"{self._source(p)}: {len(msgs)} messages but {raw.rows_read} rows decoded")
        self.ing._finish(raw, bid, checked, frep, txn=txn, on_commit=committed)
        self.report.reasons.update(self.ing.reasons)
        self.ing.reasons.clear()
        if self.progress:
            self.progress(self._source(p), len(msgs))

    def _commit_offsets(self) -> None:
        from confluent_kafka import TopicPartition

        with self._lock:
            pending, self._to_commit = self._to_commit, {}
        if pending:
            try:
                self.consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in pending.items()],
                                     asynchronous=True)
            except Exception:  # noqa: BLE001 - informational only: the stream resumes from the tables
                pass

    def _update_lag(self) -> None:
        from confluent_kafka import TopicPartition

        for p, st in list(self.parts.items()):
            try:
                _lo, hi = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=2, cached=False)
            except Exception:  # noqa: BLE001 - the next round tries again
                continue
            st.high = hi
            done = -1 if st.committed is None else st.committed
            lag = 0 if (st.eof and not st.msgs) else max(0, hi - (done + 1))
            self.report.partitions.setdefault(p, PartitionReport(p)).lag = lag
            self.metrics.lag.labels(self.dataset, self.topic, str(p)).set(lag)

    # -- the loop ---------------------------------------------------------------------
    def run(self, *, until_idle: float | None, max_seconds: float | None, max_batches: int | None,
            stop: threading.Event | None, lag_every: float = 5.0) -> StreamReport:
        from confluent_kafka import KafkaError

        t0 = self.clock()
        idle_since: float | None = None
        next_lag = t0
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        try:
            while True:
                now = self.clock()
                if stop is not None and stop.is_set():
                    self.report.stopped = "stopped"
                    break
                if max_seconds is not None and now - t0 >= max_seconds:
                    self.report.stopped = f"ran {max_seconds:g}s"
                    break
                if max_batches is not None and self.report.batches >= max_batches:
                    self.report.stopped = f"{max_batches} batches"
                    break
                msgs = self.consumer.consume(num_messages=min(self.batch_records, 10_000), timeout=0.1)
                now = self.clock()
                parts, batch_records = self.parts, self.batch_records
                for m in msgs:  # per record: kept lean, it runs for every message
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if m.partition() in parts:
                                parts[m.partition()].eof = True
                            continue
                        if err.fatal():
                            raise StreamError(f"the Kafka client failed: {err.str()}")
                        continue  # transient: librdkafka retries
                    p = m.partition()
                    st = parts.get(p)
                    if st is None:
                        continue  # revoked meanwhile
                    off = m.offset()
                    if st.committed is not None and off <= st.committed:
                        continue  # already in the tables (a seek raced a fetch)
                    st.eof = False
                    if self._first_record is None:
                        self._first_record = now
                    end = st.force_end
                    if end is not None and off > end:
                        # The crashed batch's last records are gone (retention): close what is there.
                        if st.msgs:
                            self._close(p)
                        st.force_end = end = None
                    buf = st.msgs
                    if not buf:
                        st.opened = now
                    buf.append((off, m.value(), m.timestamp()[1]))
                    if (off >= end) if end is not None else len(buf) >= batch_records:
                        self._close(p)
                for p, st in list(self.parts.items()):
                    if self._due(st, now):
                        self._close(p)
                self._drain(only_done=True)
                self._commit_offsets()
                if now >= next_lag:
                    self._update_lag()
                    next_lag = now + lag_every
                # Caught up: every partition at its end. A batch still open is not waited for (it
                # could wait batch_seconds): the run leaves once idle, committing it first.
                caught_up = self.parts and all(st.eof for st in self.parts.values())
                if until_idle is not None:
                    pending = self.ing._pending
                    if caught_up and self._inflight is None and (pending is None or pending.done()):
                        idle_since = now if idle_since is None else idle_since
                        if now - idle_since >= until_idle:
                            self.report.stopped = f"caught up, idle {until_idle:g}s"
                            break
                    else:
                        idle_since = None
            # Leaving: what is buffered is committed (a replay would give the same batch anyway).
            for p, st in list(self.parts.items()):
                if st.msgs and (st.force_end is None or st.msgs[-1][0] >= st.force_end):
                    self._close(p)
            self._drain()
            self.ing.wait()
            self._commit_offsets()
            self._update_lag()
        finally:
            self.report.seconds = self.clock() - t0
            if self._first_record is not None and self._last_commit is not None:
                self.report.busy_seconds = self._last_commit - self._first_record
            self.report.versions = dict(self.ing.versions)
        return self.report

    def close(self) -> None:
        try:
            self.ing.close()
        finally:
            try:
                self.consumer.close()
            finally:
                self.metrics.close()


def stream(
    ws: Workspace,
    actor: Actor,
    dataset: str,
    topic: str,
    *,
    bootstrap: str | None = None,
    group: str | None = None,
    batch_records: int | None = None,
    batch_seconds: float = 10.0,
    until_idle: float | None = None,
    max_seconds: float | None = None,
    max_batches: int | None = None,
    stop: threading.Event | None = None,
    metrics_port: int | None = None,
    progress: Callable[[str, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    options: Mapping[str, str] | None = None,
) -> StreamReport:
    """Consume ``topic`` into ``dataset`` until stopped (see the module docstring). The gate decides first.

    A batch closes at ``batch_records`` records (default: the dataset's file batch size) or when
    its first record has waited ``batch_seconds``. The run ends when ``stop`` is set, after
    ``max_seconds`` or ``max_batches``, or once every assigned partition is caught up and has
    been idle ``until_idle`` seconds; what is buffered is committed first.

    Raises:
        AccessDenied: the actor may not ingest into the dataset.
        PolicyError: no policy governs the dataset.
        StreamError: the broker cannot be reached, the topic does not exist, or it keeps records
            longer than the policy's ``stream.max_topic_retention``.
    """
    TableRef("bronze", dataset)
    if batch_records is not None and batch_records < 1:
        raise StreamError(f"batch size must be at least 1 record (got {batch_records})")
    if batch_seconds <= 0:
        raise StreamError(f"batch time must be positive (got {batch_seconds})")
    ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(dataset))
    if batch_records is None:
        batch_records = default_batch_rows(ws.policies.dataset(dataset))
    s = StreamIngest(ws, actor, dataset, topic, bootstrap=bootstrap, group=group, batch_records=batch_records,
                     batch_seconds=batch_seconds, clock=clock, metrics_port=metrics_port, progress=progress,
                     options=options)
    ws.audit.record("stream.start", actor=actor.name, outcome="ok", stage=Stage.INGEST.value,
                    resource=f"dataset:{dataset}",
                    details={"topic": topic, "batch_records": batch_records, "batch_seconds": batch_seconds})
    try:
        with batch_memory(), ws.lineage.run(f"stream.{dataset}", inputs=[DatasetRef(f"kafka.{topic}", kind="topic")]) as run:
            rep = s.run(until_idle=until_idle, max_seconds=max_seconds, max_batches=max_batches, stop=stop)
            for name, version in sorted(rep.versions.items()):
                run.add_output(DatasetRef(name, version=version))
    finally:
        s.close()
    unbalanced = [p for p in rep.partitions.values() if not p.balanced]
    if unbalanced:  # never expected: it would mean a record was lost
        raise StreamError(f"{topic}: counts do not add up on partition(s) {[p.partition for p in unbalanced]}")
    ws.audit.record("stream.stop", actor=actor.name, outcome="ok", stage=Stage.INGEST.value,
                    resource=f"dataset:{dataset}",
                    details={"topic": topic, "rows_read": rep.rows_read, "accepted": rep.rows_accepted,
                             "quarantined": rep.rows_quarantined, "batches": rep.batches, "stopped": rep.stopped})
    ws.audit.flush()
    return rep


def status(ws: Workspace, dataset: str, topic: str) -> list[dict[str, Any]]:
    """Per partition, from the ledger: batches, rows read, accepted, quarantined, the last offset,
    and each table's watermark (what a restart resumes from)."""
    uri = ws.config.table_uri(LEDGER)
    cat = Catalog(ws.config)
    if not DeltaTable.is_deltatable(uri, storage_options=cat.storage_options):
        return []
    prefix = f"kafka:{topic}/"
    t = DeltaTable(uri, storage_options=cat.storage_options).to_pyarrow_dataset().to_table(
        filter=(pc.field("dataset") == dataset) & pc.starts_with(pc.field("source"), prefix))
    out = []
    for src in sorted(set(t["source"].to_pylist()), key=lambda s: int(s[len(prefix):])):
        rows = t.filter(pc.equal(t["source"], src))
        p = int(src[len(prefix):])
        w = watermarks(ws, dataset, topic, p)
        out.append({
            "partition": p, "batches": rows.num_rows, "rows_read": pc.sum(rows["rows_read"]).as_py() or 0,
            "accepted": pc.sum(rows["rows_accepted"]).as_py() or 0,
            "quarantined": pc.sum(rows["rows_quarantined"]).as_py() or 0,
            "last_offset": w["ledger"], "watermarks": {k: v for k, v in w.items() if k != "ledger"},
        })
    return out




def produce(ws: Workspace, actor: Actor, dataset: str, topic: str, paths: Iterable[str], *,
            bootstrap: str | None = None, chunk: int = 10_000,
            progress: Callable[[str, int], None] | None = None) -> int:
    """Send the records of JSON Lines or CSV files to ``topic``, each sealed for its subject
    (:class:`SealedProducer`: the gate decides, each chunk is audited). Returns the records sent.

    Raises:
        IngestError: a file is missing, of another type, or a line is not a JSON object.
        StreamError: a record has no subject key, or the broker did not take every record.
    """
    import csv

    from lakehouse.errors import IngestError
    from lakehouse.ingest import expand

    files = expand(paths)
    sent = 0
    with SealedProducer(ws, actor, dataset, topic, bootstrap=bootstrap) as prod:
        for path in files:
            suffix = path.suffix.lower()
            if suffix not in (".jsonl", ".ndjson", ".json", ".csv"):
                raise IngestError(f"{path.name}: produce reads .jsonl or .csv records (got '{suffix or '(none)'}')")
            buf: list[dict] = []
            with open(path, encoding="utf-8", newline="") as fh:
                if suffix == ".csv":
                    rows: Iterable[dict] = csv.DictReader(fh)
                else:
                    rows = (_json_line(path.name, i, line) for i, line in enumerate(fh, 1) if line.strip())
                for rec in rows:
                    buf.append(rec)
                    if len(buf) >= chunk:
                        sent += prod.send(buf)
                        if progress:
                            progress(path.name, len(buf))
                        buf = []
            if buf:
                sent += prod.send(buf)
                if progress:
                    progress(path.name, len(buf))
    return sent


def _json_line(name: str, lineno: int, line: str) -> dict:
    from lakehouse.errors import IngestError

    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise IngestError(f"{name}, line {lineno}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise IngestError(f"{name}, line {lineno}: a record must be a JSON object")
    return obj


__all__ = ["ENVELOPE", "PartitionReport", "SealedProducer", "StreamReport", "app_id", "batch_id", "broker_down",
           "broker_up", "client_options", "create_topic",
           "end_offsets", "produce", "seal_dataset", "status", "stream", "watermarks"]


def end_offsets(ws: Workspace, topic: str, bootstrap: str | None = None, *, timeout: float = 10.0) -> dict[str, int]:
    """Each partition's high watermark now (``{"0": 1234, ...}``): what a stream would read up to.

    Raises:
        StreamError: the broker cannot be reached, or the topic does not exist.
    """
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    c = Consumer({**client_options(ws, bootstrap), "group.id": "lakewarden.offsets", "enable.auto.commit": False})
    try:
        md = c.list_topics(topic, timeout=timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None:
            raise StreamError(f"topic {topic!r} does not exist on {client_options(ws, bootstrap)['bootstrap.servers']}")
        return {str(p): c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
                for p in sorted(t.partitions)}
    except KafkaException as exc:
        raise StreamError(f"cannot reach the broker for topic {topic!r}: {exc}") from None
    finally:
        c.close()


def _broker_dir(ws: Workspace, data_dir: str | os.PathLike | None):
    """The local broker's folder: ``data_dir``, else ``<workspace>/kafka`` (where stop finds what start began)."""
    return ws.config.path(str(data_dir)) if data_dir else ws.config.workspace_dir / "kafka"


def broker_up(ws: Workspace, actor: Actor, *, port: int = 9092, data_dir: str | os.PathLike | None = None):
    """Install (once, from Maven Central) and start a local Kafka broker for this workspace.

    Stage ``maintain`` on ``system:kafka`` decides first (as ``trino up`` does); the start is
    audited (``broker.start``). Returns the running :class:`lakehouse.broker.LocalBroker`.
    """
    from lakehouse.broker import LocalBroker

    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("kafka"))
    b = LocalBroker(_broker_dir(ws, data_dir), port=port).start()
    ws.audit.record("broker.start", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource="system:kafka", details={"bootstrap": b.bootstrap, "data_dir": str(b.data_dir)})
    ws.audit.flush()
    return b


def broker_down(ws: Workspace, actor: Actor, *, data_dir: str | os.PathLike | None = None) -> None:
    """Stop the local broker ``broker_up`` started (stage ``maintain``; audited as ``broker.stop``)."""
    from lakehouse.broker import LocalBroker

    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("kafka"))
    b = LocalBroker(_broker_dir(ws, data_dir))
    b.stop()
    ws.audit.record("broker.stop", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource="system:kafka", details={"data_dir": str(b.data_dir)})
    ws.audit.flush()


def create_topic(ws: Workspace, actor: Actor, topic: str, *, partitions: int = 1,
                 retention_hours: float | None = None, bootstrap: str | None = None) -> None:
    """Create a topic (an existing one is left as it is): stage ``maintain`` on ``system:kafka``,
    audited as ``broker.create_topic``. ``retention_hours`` sets the topic's ``retention.ms``
    (a dataset whose policy caps ``stream.max_topic_retention`` refuses a topic that keeps longer)."""
    from lakehouse.broker import BrokerError, create_topic as admin_create

    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("kafka"))
    if partitions < 1:
        raise StreamError(f"partitions must be at least 1 (got {partitions})")
    if retention_hours is not None and retention_hours <= 0:
        raise StreamError(f"retention_hours must be positive (got {retention_hours:g})")
    cfg = {"retention.ms": str(int(retention_hours * 3_600_000))} if retention_hours is not None else {}
    servers = client_options(ws, bootstrap)["bootstrap.servers"]
    try:
        admin_create(servers, topic, partitions=partitions, config=cfg)
    except BrokerError as exc:
        raise StreamError(str(exc)) from None
    ws.audit.record("broker.create_topic", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource="system:kafka", details={"topic": topic, "partitions": partitions, **cfg})
    ws.audit.flush()


def _scan_roots(ws: Workspace) -> list:
    """The brokers' log folders named in ``streaming.log_dirs`` (a local broker's folder in the
    workspace is scanned anyway): their segments hold a copy of every record."""
    return [ws.config.path(d) for d in ws.config.streaming.log_dirs]


from governance.erasure.handlers import ErasureHandler  # noqa: E402 - the handler sits with what it scans

HANDLER = ErasureHandler(name="streams", order=46, scan_roots=_scan_roots)
"""Entry point ``streams`` of ``lakewarden.erasure_handlers``: Kafka brokers' log segments (scanned,
decoded; records sealed per subject are made unreadable by the shred, not rewritten)."""
