"""The audit log: append-only, tamper-evident, queryable with SQL.

Events live in a Delta table created with ``delta.appendOnly=true``. Each event
is hashed over a canonical encoding of its fields together with the previous
event's hash (a hash chain). Every ``checkpoint_every`` events, and at the end
of every flush (the *head*), the chain position is signed with Ed25519: the
checkpoints go to a second append-only Delta table, the head to a small file.

:meth:`AuditLog.verify` recomputes the chain and checks every signature. It
detects an edited event (its content no longer matches its hash), a deleted one
(a gap in ``seq``), an inserted one (a duplicate ``seq`` or a link that skips
an event), reordering (a link that points to a later event), a rewrite of the
whole table with recomputed hashes (the chain no longer matches a signed
checkpoint) and truncation (the log ends before the signed head), and names the
first bad event.

What the log cannot show from inside (a rollback of both the table and the head file, or a log
rewritten and re-signed by whoever holds the KEK and the key store) it shows against a *witness*
(:mod:`governance.witness`): with ``witness=`` every flush publishes its signed head there, where
the writer cannot change it, and ``verify(witness=True)`` compares the log with every witnessed
head. A publication that fails does not fail the flush (the events are committed and signed): the
head is recorded as unpublished in ``<state_dir>/WITNESS_PENDING.json``, the next flush's head
covers it (a head vouches for the whole chain before it), and ``verify(witness=True)`` publishes
the current head when the log checks out, or reports ``witness-unpublished``.

Canonical encoding (version ``lw1``), one line per event::

    lw1|<seq>|<ts µs since epoch>|<actor>|<action>|<stage>|<resource>|<subject_token>|<outcome>|<rule_ids>|<details>

with ``\\`` and ``|`` escaped by a backslash and NULL written as ``\\N``;
``details`` is JSON with sorted keys and no spaces. ``hash = sha256(prev_hash
+ "|" + line)`` in hex; the first event's ``prev_hash`` is 64 zeros. The
encoding is built column-wise with Arrow compute, which is what lets verify run
at hundreds of thousands of events per second in Python.

Events never hold plaintext personal data: subjects appear only as
pseudonymous tokens (``sub_…``), and the strings in ``details`` and ``resource``
pass through :func:`governance.pii.redact` before they are written (numbers in
``details`` are typed values and are never taken for identifiers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from governance.errors import AuditError, AuditTampered
from governance.keys.store import TOKEN_RE
from governance.locks import file_lock
from governance.pii import maybe_pii, redact, redact_value

if TYPE_CHECKING:
    from governance.witness import Witness

GENESIS = "0" * 64
ENCODING = "lw1"
_TEXT_COLUMNS = ("actor", "action", "stage", "resource", "subject_token", "outcome", "rule_ids", "details")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("actor", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("stage", pa.string()),
        pa.field("resource", pa.string()),
        pa.field("subject_token", pa.string()),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("rule_ids", pa.string()),
        pa.field("details", pa.string()),
        pa.field("prev_hash", pa.string(), nullable=False),
        pa.field("hash", pa.string(), nullable=False),
    ]
)
CHECKPOINT_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("hash", pa.string(), nullable=False),
        pa.field("signed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("signature", pa.string(), nullable=False),
    ]
)
_APPEND_ONLY = {"delta.appendOnly": "true"}
# Every append of events carries this application transaction, its version the commit's last seq.
# Two writers that read the same tail (two machines on one bucket: their file locks are their own)
# both commit it, and Delta's conflict check refuses the second: it re-reads the tail and re-chains.
CHAIN_APP_ID = "lakewarden.audit.chain"
_CHAIN_ATTEMPTS = 50


def canonical_lines(tbl: pa.Table) -> list[str]:
    """The canonical encoding of each event row (without the chain link), as Python strings."""
    return canonical_lines_array(tbl).to_pylist()


def canonical_lines_array(tbl: pa.Table) -> pa.Array:
    """The canonical encoding of each event row (without the chain link), built column-wise."""
    cols: list[pa.Array | pa.ChunkedArray] = [
        pc.cast(tbl["seq"], pa.string()),
        pc.cast(pc.cast(tbl["ts"], pa.int64()), pa.string()),
    ]
    for name in _TEXT_COLUMNS:
        c = pc.replace_substring(tbl[name], "\\", "\\\\")
        c = pc.replace_substring(c, "|", "\\|")
        cols.append(pc.fill_null(c, "\\N"))
    prefix = pa.array([ENCODING] * tbl.num_rows, pa.string())
    out = pc.binary_join_element_wise(prefix, *cols, "|")
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def chain(prev: str, line: str) -> str:
    return hashlib.sha256(f"{prev}|{line}".encode()).hexdigest()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes_raw()
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def _signed_message(kind: str, seq: int, h: str) -> bytes:
    return f"lakewarden-audit-{kind}:v1|{seq}|{h}".encode()


@dataclass(frozen=True)
class Finding:
    seq: int | None
    kind: str
    message: str


@dataclass
class VerifyReport:
    """What :meth:`AuditLog.verify` found. ``ok`` is True when nothing is wrong."""

    events: int = 0
    checkpoints: int = 0
    head_seq: int | None = None
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    #: what the comparison with the witness checked and could not (``verify(witness=True)`` only):
    #: uri, reachable, heads, last_seq, last_stored_at, lock, caught_up, unwitnessed, checked, not_checked
    witness: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "checkpoints": self.checkpoints,
            "head_seq": self.head_seq,
            "seconds": round(self.seconds, 4),
            "findings": [{"seq": f.seq, "kind": f.kind, "message": f.message} for f in self.findings],
            **({"witness": self.witness} if self.witness is not None else {}),
        }

    def raise_if_bad(self) -> "VerifyReport":
        if self.first:
            raise AuditTampered(self.first.message, seq=self.first.seq, kind=self.first.kind)
        return self


def _read_state(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON state file of the log (the head, the witness's pending record); None when absent."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read {what}{path}: {exc}") from None


class AuditLog:
    """Append, verify and query the audit log.

    Args:
        table_uri: the events Delta table.
        checkpoints_uri: the checkpoints Delta table.
        state_dir: a local folder for the signed head and the writers' lock.
        signing_key: the Ed25519 key that signs checkpoints and the head (None: read-only).
        public_key: the key verify trusts (default: the signing key's public half).
        checkpoint_every: sign a checkpoint every this many events.
        flush_every: write buffered events once this many are waiting.
        flush_interval: seconds an event may wait in the buffer before a background thread writes
            it (0: only at ``flush_every``, after a deny and at close). It bounds what a SIGKILL
            of a long-running process (a predictor, a notebook) can lose to that many seconds.
        clock: returns "now" as an aware datetime; injectable for tests.
        witness: where every flush publishes its signed head (:mod:`governance.witness`; None: nowhere).
            A failed publication never fails the flush: see :attr:`witness_pending`.
    """

    def __init__(
        self,
        table_uri: str,
        checkpoints_uri: str,
        state_dir: str | Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
        checkpoint_every: int = 1000,
        flush_every: int = 10_000,
        storage_options: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] | None = None,
        flush_interval: float = 0.0,
        witness: "Witness | None" = None,
    ) -> None:
        self.table_uri = table_uri
        self.checkpoints_uri = checkpoints_uri
        self.state_dir = Path(state_dir)
        self._sk = signing_key
        self._pk = public_key or (signing_key.public_key() if signing_key else None)
        self.checkpoint_every = checkpoint_every
        self.flush_every = flush_every
        self._so = dict(storage_options or {})
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._buf: dict[str, list[Any]] = {n: [] for n in ("ts", *_TEXT_COLUMNS)}
        self.flush_interval = flush_interval
        self.compact_every = 100  # commits of the events table between compactions
        self._version = -1  # the events table's version before this writer's commit (set by _tail)
        self._snapshot: DeltaTable | None = None  # the events table as _tail read it (the append's base)
        from governance.objectstore import is_remote

        self._shared = is_remote(table_uri)  # a bucket several machines may write: see _append
        self._buf_lock = threading.Lock()  # one event's fields go in together; the swap is atomic
        self._flush_lock = threading.RLock()  # flushes write in the order they took their events
        self._oldest: float | None = None  # monotonic time of the oldest buffered event
        self._flusher: tuple[int, threading.Thread, threading.Event] | None = None  # (pid, thread, stop)
        self.redactions = 0
        self.witness = witness

    # -- writing --------------------------------------------------------------------
    def record(
        self,
        action: str,
        *,
        actor: str,
        outcome: str,
        stage: str | None = None,
        resource: str | None = None,
        rule_ids: Sequence[str] = (),
        subject_token: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Buffer one event; it is written at the next :meth:`flush` (or when the buffer is full).

        Raises:
            ValueError: ``subject_token`` is not a pseudonymous token — events
                never carry raw identifiers.
        """
        if subject_token is not None and not TOKEN_RE.match(subject_token):
            raise ValueError("audit events carry pseudonymous subject tokens (sub_...), never identifiers")
        det = None
        if details:
            det = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
            if maybe_pii(det):
                # Strings are redacted field by field; numbers are typed values, never read as identifiers.
                clean, n = redact_value(details)
                if n:
                    det = json.dumps(clean, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
                    self.redactions += n
        if resource is not None:
            resource, n = redact(resource)
            self.redactions += n
        ts = self._clock()
        rules = ",".join(rule_ids) if rule_ids else None
        with self._buf_lock:
            b = self._buf
            b["ts"].append(ts)
            b["actor"].append(actor)
            b["action"].append(action)
            b["stage"].append(stage)
            b["resource"].append(resource)
            b["subject_token"].append(subject_token)
            b["outcome"].append(outcome)
            b["rule_ids"].append(rules)
            b["details"].append(det)
            pending = len(b["ts"])
            if self._oldest is None:
                self._oldest = time.monotonic()
        if self.flush_interval > 0:
            self._ensure_flusher()
        if pending >= self.flush_every:
            self.flush()

    def _ensure_flusher(self) -> None:
        """Start this process's background flusher (once; again in a forked child)."""
        pid = os.getpid()
        if self._flusher is not None and self._flusher[0] == pid:
            return
        with self._buf_lock:
            if self._flusher is not None and self._flusher[0] == pid:
                return
            stop = threading.Event()
            thread = threading.Thread(target=self._flush_loop, args=(stop,), name="lakewarden-audit-flush", daemon=True)
            self._flusher = (pid, thread, stop)
        thread.start()

    def _flush_loop(self, stop: threading.Event) -> None:
        interval = self.flush_interval
        while not stop.wait(min(interval, 1.0) / 2):
            oldest = self._oldest
            if oldest is not None and time.monotonic() - oldest >= interval:
                try:
                    self.flush()
                except Exception as exc:  # noqa: BLE001 - keep the events; the next flush retries
                    import logging

                    logging.getLogger(__name__).warning("audit flush failed (events kept in memory): %s", exc)

    @property
    def pending(self) -> int:
        return len(self._buf["ts"])

    def flush(self) -> int:
        """Write buffered events as one Delta commit, extend the chain and sign. Returns the count.

        If the write fails before the events' commit, they go back to the front of the buffer
        (nothing is dropped); once committed they are never written twice (a failure signing the
        head afterwards is recovered from the table by the next writer)."""
        with self._flush_lock:
            if self.pending == 0:
                return 0
            if self._sk is None:
                raise AuditError("this audit log was opened read-only (no signing key); cannot append")
            with self._buf_lock:
                buf, self._buf = self._buf, {k: [] for k in self._buf}
                oldest, self._oldest = self._oldest, None
            written: list[bool] = []
            try:
                return self._append(buf, written)
            except BaseException:
                if written:
                    raise
                with self._buf_lock:
                    for k, vals in buf.items():
                        self._buf[k][:0] = vals
                    if oldest is not None:
                        self._oldest = oldest if self._oldest is None else min(oldest, self._oldest)
                raise

    def _append(self, buf: dict[str, list[Any]], written: list[bool]) -> int:
        n = len(buf["ts"])
        for attempt in range(_CHAIN_ATTEMPTS):
            with self._writer_lock():
                last_seq, last_hash = self._tail()
                seqs = pa.array(range(last_seq + 1, last_seq + 1 + n), pa.int64())
                arrays = [seqs, pa.array(buf["ts"], pa.timestamp("us", tz="UTC"))]
                arrays += [pa.array(buf[c], pa.string()) for c in _TEXT_COLUMNS]
                partial = pa.Table.from_arrays(arrays, names=["seq", "ts", *_TEXT_COLUMNS])
                prevs, hashes = [], []
                h = last_hash
                for line in canonical_lines(partial):
                    prevs.append(h)
                    h = chain(h, line)
                    hashes.append(h)
                tbl = partial.append_column("prev_hash", pa.array(prevs, pa.string())).append_column(
                    "hash", pa.array(hashes, pa.string())
                ).select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA)
                if self._write_events(tbl, last_seq + n):  # False: another writer extended the chain first
                    written.append(True)
                    first = last_seq + 1
                    cps = [
                        (s, hashes[s - first])
                        for s in range(first, first + n)
                        if (s + 1) % self.checkpoint_every == 0
                    ]
                    if self._shared and (not cps or cps[-1][0] != first + n - 1):
                        # On a shared root the head file is one machine's: sign each flush's end
                        # where every writer's verify sees it.
                        cps.append((first + n - 1, hashes[-1]))
                    if cps:
                        self._write_checkpoints(cps)
                    head = self._write_head(first + n - 1, hashes[-1])
                    self._publish(head)  # under the writers' lock: heads reach the witness in order
                    self._maybe_compact(self._version + 1)
                    return n
            time.sleep(min(0.5, 0.01 * (2 ** min(attempt, 6))) * (0.5 + int.from_bytes(os.urandom(1), "big") / 255))
        raise AuditError(f"cannot append to the audit table {self.table_uri}: the chain moved under "
                         f"{_CHAIN_ATTEMPTS} attempts in a row (too many concurrent writers)")

    def _write_events(self, tbl: pa.Table, last_seq: int) -> bool:
        """Append events on the snapshot their tail was read from; False when another writer's
        append (same chain transaction) committed first."""
        txn = CommitProperties(app_transactions=[Transaction(app_id=CHAIN_APP_ID, version=last_seq)])
        try:
            write_deltalake(self._snapshot, tbl, mode="append", storage_options=self._so or None,  # type: ignore[arg-type]
                            commit_properties=txn)
            return True
        except CommitFailedError:
            return False
        except Exception as exc:  # deltalake raises several unrelated types
            raise AuditError(f"cannot append to the audit table {self.table_uri}: {exc}") from exc

    def _maybe_compact(self, version: int) -> None:
        """Every ``compact_every`` commits of the events table, compact its files (OPTIMIZE, which
        moves events between files without changing them: ``dataChange=false``, allowed on an
        append-only table). Frequent small flushes (``flush_interval``) would otherwise leave one
        file per flush, and every flush and verify opens them all. Under the writers' lock."""
        if self.compact_every <= 0 or version <= 0 or version % self.compact_every:
            return
        try:
            DeltaTable(self.table_uri, storage_options=self._so or None).optimize.compact()
        except Exception as exc:  # noqa: BLE001 - the events are committed; compaction can wait
            import logging

            logging.getLogger(__name__).warning("audit table not compacted (it will be at a later flush): %s", exc)

    def close(self) -> None:
        if self._flusher is not None and self._flusher[0] == os.getpid():
            _, thread, stop = self._flusher
            stop.set()
            thread.join(timeout=30)
            self._flusher = None
        self.flush()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- verification -----------------------------------------------------------------
    def verify(self, *, progress: Callable[[int, int], None] | None = None, witness: bool = False) -> VerifyReport:
        """Recompute the chain and check every signature; return a report (never raises for tampering).

        With ``witness=True`` the log is also compared with every head its witness holds (see
        :meth:`verify_witness`): a rollback of both the table and the head file, and a log
        rewritten and re-signed with the real key, are found only this way.
        """
        t0 = time.perf_counter()
        rep = VerifyReport()
        try:
            events = self._read(self.table_uri)
        except AuditError:
            # Delta refuses a data file whose size no longer matches its log entry: that is itself
            # tampering. Read the files directly so the chain can still name the event.
            events = self._read_files_directly(rep)
        cps = self._read(self.checkpoints_uri)
        head = self._read_head()
        if events is None:
            events = EVENT_SCHEMA.empty_table()
        idx = pc.sort_indices(events["seq"])
        if events.num_rows and not pc.all(pc.equal(idx, pa.array(range(events.num_rows), pa.uint64()))).as_py():
            events = events.take(idx)
        n = rep.events = events.num_rows
        found: list[Finding] = rep.findings
        hashes_arr = events["hash"]
        bad = self._first_chain_break(events) if n else None
        if bad is not None:
            found.append(self._classify(bad, events))
        # Up to the first break, row index == seq, so signed positions can be looked up by index.
        good = n if bad is None else bad
        if progress:
            progress(n, n)
        # Signed checkpoints: each must verify and match the chain at its position.
        prev_ok = -1  # the last signed checkpoint that matches the chain
        if cps is not None and cps.num_rows:
            rep.checkpoints = cps.num_rows
            for row in cps.sort_by("seq").to_pylist():
                s = row["seq"]
                if not self._signature_ok("checkpoint", s, row["hash"], row["signature"]):
                    found.append(Finding(s, "forged-checkpoint", f"checkpoint at seq={s} has an invalid signature"))
                    break
                if bad is not None and s >= good:
                    break  # past the break the chain says it all
                if s >= n:
                    found.append(
                        Finding(n, "truncated", f"the log ends at seq={n - 1} but a signed checkpoint covers seq={s}: truncated")
                    )
                    break
                if hashes_arr[s].as_py() != row["hash"]:
                    found.append(
                        Finding(
                            prev_ok + 1,
                            "rewritten",
                            f"events seq={prev_ok + 1}..{s} were rewritten: the chain no longer matches the checkpoint "
                            f"signed at seq={s}",
                        )
                    )
                    break
                prev_ok = s
        # The signed head: the log must reach it, and nothing unsigned may follow it.
        if bad is not None:
            pass  # the chain is already broken; the head cannot add anything
        elif head is None:
            if self._shared and n and prev_ok == n - 1:
                pass  # a shared root signs each flush's end in the checkpoints; this machine never wrote
            elif self._shared and n and prev_ok >= 0:
                found.append(Finding(prev_ok + 1, "unsigned-tail",
                                     f"events seq={prev_ok + 1}..{n - 1} follow the last signed checkpoint"))
            elif n:
                found.append(Finding(None, "head-missing", f"the signed head file is missing ({self._head_path()})"))
        else:
            rep.head_seq = head["seq"]
            if not self._signature_ok("head", head["seq"], head["hash"], head["signature"]):
                found.append(Finding(head["seq"], "forged-head", "the head file's signature is invalid"))
            elif head["seq"] >= n:
                found.append(
                    Finding(
                        n,
                        "truncated",
                        f"the log ends at seq={n - 1} but the signed head records seq={head['seq']}: "
                        f"events seq={n}..{head['seq']} were truncated",
                    )
                )
            elif hashes_arr[head["seq"]].as_py() != head["hash"]:
                found.append(Finding(head["seq"], "rewritten", f"event seq={head['seq']} differs from the signed head"))
            elif max(head["seq"], prev_ok) < n - 1:  # signed by this machine's head, or a checkpoint
                signed = max(head["seq"], prev_ok)
                found.append(
                    Finding(
                        signed + 1,
                        "unsigned-tail",
                        f"events seq={signed + 1}..{n - 1} follow the signed head: appended outside Lakewarden "
                        "or by a writer that crashed (the next flush re-signs)",
                    )
                )
        if witness:
            self._check_witness(rep, events)
        # The chain's own finding (most precise) comes first, then signatures, then file-level ones.
        found.sort(key=lambda f: f.kind in ("file-modified", "unreadable"))
        rep.seconds = time.perf_counter() - t0
        return rep

    # -- the witness -----------------------------------------------------------------------
    def verify_witness(self, report: VerifyReport | None = None) -> VerifyReport:
        """Compare the log with its witness, adding to ``report`` (a plain :meth:`verify`'s) or a new one.

        Findings (each names the seq):

        * ``rolled-back``: the witness holds a head past the log's end (the table and the head
          file were rolled back or truncated);
        * ``witness-mismatch``: an event differs from the head witnessed for its seq (the log was
          rewritten after it was witnessed: re-signed with the real key if nothing else is found);
        * ``witness-conflict``: the witness holds two heads for one seq;
        * ``witness-tampered``: a witnessed head's object was overwritten or deleted (the store
          kept the locked first version, which is the one compared);
        * ``witness-forged``: a witnessed head's signature does not verify;
        * ``witness-unpublished``: the signed head is ahead of the witness and could not be
          published now (the last failure is named);
        * ``witness-unreachable`` / ``witness-missing``: nothing could be compared.

        When nothing is wrong and the local head is ahead of the witness (a publication failed or
        a writer stopped before it), the head is published now (``caught_up``). Events after the
        last witnessed head are reported in ``report.witness["unwitnessed"]``: the witness cannot
        vouch for them yet. Never raises for tampering.
        """
        rep = report if report is not None else VerifyReport()
        t0 = time.perf_counter()
        try:
            events = self._read(self.table_uri)
        except AuditError:
            events = self._read_files_directly(VerifyReport())  # what it finds, the plain verify names
        events = (events if events is not None else EVENT_SCHEMA.empty_table()).select(["seq", "hash"]).sort_by("seq")
        self._check_witness(rep, events)
        rep.seconds += time.perf_counter() - t0
        return rep

    @property
    def witness_pending(self) -> dict[str, Any] | None:
        """The record of heads not yet published to the witness (``since_seq``, ``head``, ``error``,
        ``failed_at``, ``attempts``), or None when the witness is up to date (or there is none)."""
        return _read_state(self._pending_path(), "")

    def publish_witness(self) -> int | None:
        """Publish the current signed head to the witness now (catching up after a failure).

        Returns the seq published (or found already there), or None when there is no witness or no head.

        Raises:
            WitnessError: the witness refused or could not be reached (the record stays).
        """
        head = self._read_head()
        if self.witness is None or head is None:
            return None
        with self._writer_lock():
            head = self._read_head() or head
            try:
                self.witness.publish(head)
            except Exception as exc:
                self._mark_unpublished(head, exc)
                raise
            self._pending_path().unlink(missing_ok=True)
        return int(head["seq"])

    def _pending_path(self) -> Path:
        return self.state_dir / "WITNESS_PENDING.json"

    def _publish(self, head: dict[str, Any]) -> None:
        """Publish a head just signed; a failure is recorded, logged and left to the next flush."""
        if self.witness is None:
            return
        try:
            self.witness.publish(head)
        except Exception as exc:  # noqa: BLE001 - the events are committed: never lose them over the witness
            import logging

            self._mark_unpublished(head, exc)
            logging.getLogger(__name__).warning(
                "audit head seq=%s not published to the witness (the next flush publishes it): %s", head["seq"], exc)
        else:
            self._pending_path().unlink(missing_ok=True)  # this head vouches for every earlier one

    def _mark_unpublished(self, head: Mapping[str, Any], exc: BaseException) -> None:
        try:
            prev = self.witness_pending or {}
        except AuditError:
            prev = {}
        rec = {
            "since_seq": min(int(prev.get("since_seq", head["seq"])), int(head["seq"])),
            "head": dict(head),
            "error": str(exc)[:500],
            "failed_at": self._clock().isoformat(),
            "attempts": int(prev.get("attempts", 0)) + 1,
        }
        tmp = self._pending_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, sort_keys=True))
        os.replace(tmp, self._pending_path())

    def _check_witness(self, rep: VerifyReport, events: pa.Table) -> None:
        """Compare ``events`` (seq and hash, sorted by seq) with the witness; add findings and ``rep.witness``."""
        from governance.witness import WitnessError

        w = self.witness
        info: dict[str, Any] = {"uri": getattr(w, "uri", None), "reachable": False, "heads": 0, "last_seq": None,
                                "checked": [], "not_checked": []}
        rep.witness = info
        found = rep.findings
        if w is None:
            found.append(Finding(None, "witness-missing", "no witness is configured for this audit log "
                                 "(audit.witness in lakewarden.yaml)"))
            info["not_checked"].append("everything: no witness")
            return
        try:
            state = w.read()
        except WitnessError as exc:
            info["error"] = str(exc)
            found.append(Finding(None, "witness-unreachable", f"the witness could not be read: {exc}"))
            info["not_checked"].append("rollback and re-signing: the witness was not reachable")
            return
        info["reachable"] = True
        info["heads"] = len(state.heads)
        n = events.num_rows
        seqs, hashes = events["seq"], events["hash"]
        last_table = seqs[-1].as_py() if n else -1
        dense = bool(n) and pc.all(pc.equal(seqs, pa.array(range(n), pa.int64()))).as_py()
        by_seq = {} if dense else dict(zip(seqs.to_pylist(), hashes.to_pylist()))  # gaps, duplicates

        def table_hash(s: int) -> str | None:
            if not dense:
                return by_seq.get(s)
            return hashes[s].as_py() if 0 <= s < n else None

        fetches = [0]

        def signed(h: Any) -> tuple[bool, dict[str, Any] | None]:
            """Whether a witnessed head's body carries a valid signature (a bounded number of fetches)."""
            if fetches[0] >= 20:
                return True, None
            fetches[0] += 1
            try:
                body = w.fetch(h)
            except WitnessError as exc:
                info["not_checked"].append(f"the signature of {h.key}: {exc}")
                return True, None
            ok = (body.get("seq") == h.seq and body.get("hash") == h.hash
                  and self._signature_ok("head", h.seq, h.hash, str(body.get("signature", ""))))
            return ok, body

        def when(h: Any) -> str:
            return f"stored {h.stored_at.isoformat()}" if h.stored_at else "stored at an unknown time"

        forged: set[tuple[int, str]] = set()
        rolled = mismatched = False
        for h in state.heads:
            th = table_hash(h.seq)
            if th == h.hash or (rolled and th is None) or (mismatched and th is not None):
                continue
            ok, _ = signed(h)
            if not ok:
                if not forged:
                    found.append(Finding(h.seq, "witness-forged", f"the witnessed head {h.key} has no valid signature: "
                                         "someone holding the witness credentials but not the signing key wrote it"))
                forged.add((h.seq, h.hash))
                continue
            if th is None and h.seq > last_table:
                rolled = True
                found.append(Finding(last_table + 1, "rolled-back",
                                     f"the witness holds a signed head at seq={h.seq} ({when(h)}) but the log ends at "
                                     f"seq={last_table}: the log and its head were rolled back or truncated "
                                     f"(events seq={last_table + 1}..{h.seq} are gone)"))
            elif not mismatched:
                mismatched = True
                what = "is missing from the log" if th is None else "differs from the head witnessed for it"
                found.append(Finding(h.seq, "witness-mismatch",
                                     f"event seq={h.seq} {what} ({when(h)}): the log was rewritten after it was "
                                     "witnessed (rolled back and extended again, or re-signed with the signing key)"))
        per_seq: dict[int, set[str]] = {}
        for h in state.heads:
            if (h.seq, h.hash) not in forged:
                per_seq.setdefault(h.seq, set()).add(h.hash)
        for s, hs in sorted(per_seq.items()):
            if len(hs) > 1:
                found.append(Finding(s, "witness-conflict", f"the witness holds {len(hs)} different heads for seq={s}: "
                                     "a log was rolled back and extended again, or re-signed and published"))
                break
        for key in state.overwritten:
            found.append(Finding(None, "witness-tampered", f"the witnessed head {key} was overwritten (it has several "
                                 "versions; the locked first one is the one compared)"))
        for key in state.deleted:
            found.append(Finding(None, "witness-tampered", f"someone tried to delete the witnessed head {key} (a "
                                 "delete marker; the locked version is still there and was compared)"))
        if len(forged) > 1:
            info["forged"] = len(forged)
        if state.strays:
            info["not_checked"].append(f"{len(state.strays)} objects under the witness's heads/ that are not heads")
        valid = [h for h in state.heads if (h.seq, h.hash) not in forged]
        last = max(valid, key=lambda h: h.seq) if valid else None
        last_seq = last.seq if last else -1
        # Catch up: a head signed here but not witnessed (a failed publication, a writer stopped before it).
        head = self._read_head()
        pending = None
        with contextlib.suppress(AuditError):
            pending = self.witness_pending
        if head is not None and head["seq"] > last_seq:
            clean = (not found and table_hash(head["seq"]) == head["hash"]
                     and self._signature_ok("head", head["seq"], head["hash"], head["signature"]))
            err: Any = None
            if clean:
                try:
                    self.publish_witness()
                    info["caught_up"] = head["seq"]
                    last_seq = head["seq"]
                except Exception as exc:  # noqa: BLE001 - reported below
                    err = exc
            if last_seq < head["seq"]:
                why = err or (pending or {}).get("error") or "no failure was recorded (a writer stopped before it)"
                if not clean:
                    why = f"{why}; not published now, because the log does not check out"
                found.append(Finding(last_seq + 1, "witness-unpublished",
                                     f"events seq={last_seq + 1}..{head['seq']} are signed here but not witnessed: "
                                     f"{why}. The next flush or `lakewarden audit verify --witness` publishes them"))
        info["last_seq"] = last_seq if last_seq >= 0 else None
        if last is not None:
            info["last_stored_at"] = last.stored_at.isoformat() if last.stored_at else None
            if info.get("caught_up") is None:
                ok, body = signed(last)
                info["lock"] = (body or {}).get("lock")
        if last_table > last_seq:
            info["unwitnessed"] = [last_seq + 1, last_table]
            info["not_checked"].append(f"events seq={last_seq + 1}..{last_table}: not witnessed yet (the unpublished "
                                       "tail); the witness cannot vouch for them")
        info["checked"].append(f"witness {w.uri} reachable: {len(state.heads)} heads, last seq {info['last_seq']}; "
                               f"every witnessed head compared with the log ({fetches[0]} bodies fetched)")

    @staticmethod
    def _first_chain_break(events: pa.Table) -> int | None:
        """Index of the first row that breaks seq order, its link, or its own hash (all checked column-wise)."""
        n = events.num_rows
        seq_ok = pc.equal(events["seq"], pa.array(range(n), pa.int64()))
        prevs, hashes = events["prev_hash"], events["hash"]
        expected_prev = pa.concat_arrays([pa.array([GENESIS], pa.string()), hashes.slice(0, n - 1).combine_chunks()])
        link_ok = pc.equal(prevs, expected_prev)
        lines = pc.binary_join_element_wise(prevs, pa.chunked_array([canonical_lines_array(events)]), "|")
        sha = hashlib.sha256
        computed = pa.array([sha(b).hexdigest() for b in pc.cast(lines, pa.binary()).to_pylist()], pa.string())
        self_ok = pc.equal(hashes, computed)
        ok = pc.and_(pc.and_(seq_ok, link_ok), self_ok)
        first = pc.index(ok, False).as_py()
        return None if first < 0 else first

    @staticmethod
    def _classify(i: int, events: pa.Table) -> Finding:
        """Say what happened at row ``i``, the first row whose seq, link or hash is wrong."""
        seqs = events["seq"]
        s = seqs[i].as_py()
        if i + 1 < len(seqs) and seqs[i + 1].as_py() == s:
            return Finding(s, "inserted", f"event seq={s} appears twice: an event was inserted")
        if s != i:
            if i > 0 and s == seqs[i - 1].as_py():
                return Finding(s, "inserted", f"event seq={s} appears twice: an event was inserted")
            if s > i:
                gap = f"seq={i}" if s == i + 1 else f"seq={i}..{s - 1}"
                return Finding(i, "deleted", f"event {gap} is missing: deleted from the log")
            return Finding(s, "reordered", f"event seq={s} is out of order")
        prev = events["prev_hash"][i].as_py()
        expected = events["hash"][i - 1].as_py() if i else GENESIS
        if prev != expected:
            hashes = events["hash"].to_pylist()
            j = hashes.index(prev) if prev in hashes else -1
            if j > i:
                return Finding(i, "reordered", f"event seq={i} links to the later event seq={j}: events were reordered")
            if 0 <= j < i - 1:
                return Finding(i - 1, "inserted", f"event seq={i - 1} is not in the chain: it was inserted")
            return Finding(
                i - 1 if i else 0,
                "edited",
                f"event seq={i} does not link to event seq={i - 1}: event seq={i - 1} was edited and re-hashed, "
                "or events were inserted or deleted here",
            )
        return Finding(s, "edited", f"event seq={s} does not match its hash: it was edited")

    # -- queries ----------------------------------------------------------------------
    def head(self) -> dict[str, Any] | None:
        """The signed head (``seq``, ``hash``, ``signed_at``, ``key_id``, ``signature``); None before the first flush."""
        return self._read_head()

    def query(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        resource: str | None = None,
        subject_token: str | None = None,
        outcome: str | None = None,
        stage: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> pa.Table:
        """Events matching every given filter, oldest first. ``resource`` matches a prefix."""
        try:
            ds = DeltaTable(self.table_uri, storage_options=self._so or None).to_pyarrow_dataset()
        except TableNotFoundError:
            return EVENT_SCHEMA.empty_table()
        expr = None
        for col, val in (("actor", actor), ("action", action), ("subject_token", subject_token), ("outcome", outcome), ("stage", stage)):
            if val is not None:
                e = pc.field(col) == val
                expr = e if expr is None else expr & e
        if since is not None:
            e = pc.field("ts") >= pa.scalar(since, pa.timestamp("us", tz="UTC"))
            expr = e if expr is None else expr & e
        if until is not None:
            e = pc.field("ts") < pa.scalar(until, pa.timestamp("us", tz="UTC"))
            expr = e if expr is None else expr & e
        tbl = ds.to_table(filter=expr)
        if resource is not None:
            tbl = tbl.filter(pc.starts_with(tbl["resource"], resource))
        tbl = tbl.sort_by("seq")
        if limit is not None:
            tbl = tbl.slice(max(tbl.num_rows - limit, 0)) if limit >= 0 else tbl
        return tbl

    # -- internals --------------------------------------------------------------------
    def _writer_lock(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.state_dir / ".lock")

    def _head_path(self) -> Path:
        return self.state_dir / "HEAD.json"

    def _read_head(self) -> dict[str, Any] | None:
        return _read_state(self._head_path(), "the audit head ")

    def _tail(self) -> tuple[int, str]:
        """(last seq, last hash), from the signed head; recovers if a writer crashed after its commit."""
        head = self._read_head()
        last_seq, last_hash = (-1, GENESIS) if head is None else (head["seq"], head["hash"])
        self._snapshot = None
        try:
            dt = DeltaTable(self.table_uri, storage_options=self._so or None)
        except TableNotFoundError:
            if head is not None:
                raise AuditError(
                    f"the audit head records seq={last_seq} but the audit table {self.table_uri} is missing"
                ) from None
            # Created empty first, so that every append of events has a snapshot to be checked
            # against: two writers creating the table with their first events would both be seq 0.
            try:
                DeltaTable.create(self.table_uri, EVENT_SCHEMA, mode="ignore", configuration=_APPEND_ONLY,
                                  storage_options=self._so or None)
            except Exception:  # noqa: BLE001 - another writer created it first; read it below
                pass
            dt = DeltaTable(self.table_uri, storage_options=self._so or None)
        self._version = dt.version()
        ds = dt.to_pyarrow_dataset()
        self._snapshot = dt
        later = ds.to_table(columns=["seq", "hash"], filter=pc.field("seq") > last_seq)
        if later.num_rows:
            later = later.sort_by("seq")
            last_seq, last_hash = later["seq"][-1].as_py(), later["hash"][-1].as_py()
        return last_seq, last_hash

    def _write(self, uri: str, tbl: pa.Table) -> None:
        try:
            write_deltalake(uri, tbl, mode="append", configuration=_APPEND_ONLY, storage_options=self._so or None)
        except Exception as exc:  # deltalake raises several unrelated types
            raise AuditError(f"cannot append to the audit table {uri}: {exc}") from exc

    def _write_checkpoints(self, cps: list[tuple[int, str]]) -> None:
        now = self._clock()
        kid = key_id(self._pk)  # type: ignore[arg-type]
        rows = {
            "seq": [s for s, _ in cps],
            "hash": [h for _, h in cps],
            "signed_at": [now] * len(cps),
            "key_id": [kid] * len(cps),
            "signature": [self._sk.sign(_signed_message("checkpoint", s, h)).hex() for s, h in cps],  # type: ignore[union-attr]
        }
        self._write(self.checkpoints_uri, pa.table(rows, schema=CHECKPOINT_SCHEMA))

    def _write_head(self, seq: int, h: str) -> dict[str, Any]:
        head = {
            "seq": seq,
            "hash": h,
            "signed_at": self._clock().isoformat(),
            "key_id": key_id(self._pk),  # type: ignore[arg-type]
            "signature": self._sk.sign(_signed_message("head", seq, h)).hex(),  # type: ignore[union-attr]
        }
        tmp = self._head_path().with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(head, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._head_path())
        return head

    def _signature_ok(self, kind: str, seq: int, h: str, sig_hex: str) -> bool:
        if self._pk is None:
            raise AuditError("no public key to verify the audit log with")
        try:
            self._pk.verify(bytes.fromhex(sig_hex), _signed_message(kind, seq, h))
            return True
        except (InvalidSignature, ValueError):
            return False

    def _read_files_directly(self, rep: VerifyReport) -> pa.Table:
        import pyarrow.parquet as pq

        try:
            dt = DeltaTable(self.table_uri, storage_options=self._so or None)
            parts = []
            for add in pa.table(dt.get_add_actions(flatten=True)).to_pylist():
                uri = self.table_uri.rstrip("/") + "/" + add["path"]
                try:
                    t = pq.read_table(uri)
                except Exception as exc:
                    rep.findings.append(Finding(None, "unreadable", f"audit data file {add['path']} cannot be read: {exc}"))
                    continue
                size = os.path.getsize(uri) if "://" not in uri else add["size_bytes"]
                if size != add["size_bytes"]:
                    rep.findings.append(
                        Finding(None, "file-modified", f"audit data file {add['path']} was modified outside Delta "
                                f"({size} bytes, the log says {add['size_bytes']})")
                    )
                parts.append(t.select(EVENT_SCHEMA.names).cast(EVENT_SCHEMA))
        except Exception as exc:
            raise AuditError(f"cannot read the audit table {self.table_uri}: {exc}") from exc
        return pa.concat_tables(parts) if parts else EVENT_SCHEMA.empty_table()

    def _read(self, uri: str) -> pa.Table | None:
        try:
            return DeltaTable(uri, storage_options=self._so or None).to_pyarrow_table()
        except TableNotFoundError:
            return None
        except Exception as exc:
            raise AuditError(f"cannot read the audit table {uri}: {exc}") from exc
