"""A witness for the audit head: a place outside the machine that the audit writer cannot rewrite.

The audit log's own signatures cannot tell two things apart from an honest log: a log rewritten
and re-signed by whoever holds the KEK and the key store (they can unwrap the signing key), and a
rollback of both the events table and the head file to an earlier consistent state. Both are
closed by publishing every flush's signed head to a witness and comparing against it
(:meth:`governance.audit.AuditLog.verify` with ``witness=True``).

:class:`ObjectLockWitness` is the one kind today: an S3 bucket created with Object Lock. Every
head becomes a new object ``<prefix>/heads/<seq:020d>-<hash>.json`` (the signed head as JSON),
written with ``If-None-Match: *`` and a COMPLIANCE retention of ``retention_days``: until then
nobody, the bucket's root account included, can delete that version or shorten its retention. An
overwrite of the key only adds a second version (the first stays) and a delete only adds a
delete marker; :meth:`ObjectLockWitness.read` lists versions, so both show up as tampering. The
sequence number and hash are in the key, so a verify reads the witness by listing (1,000 heads a
request) and fetches bodies only for the newest head and for heads that disagree with the log.

A bucket without Object Lock is refused (fail closed): it would be a copy, not a witness. The
endpoint and credentials come from the ``AWS_*`` environment variables, never from
``lakewarden.yaml``; give the audit writer credentials of its own for the witness bucket where
the store allows it (a user that may put objects and nothing else).

Measured on versitygw v1.8.0 (the tests' store, ``posix`` backend): a bucket created with
``ObjectLockEnabledForBucket`` has versioning on; a version put with an explicit COMPLIANCE
retention cannot be deleted (403, with or without ``x-amz-bypass-governance-retention``), nor its
retention shortened or changed to GOVERNANCE (403); ``If-None-Match: *`` on an existing key is
refused (412). A version that relied on the bucket's *default* retention reported no retention
and its retention could be set shorter afterwards, so every put here names its retention
explicitly rather than relying on a bucket default.

Errors::

    AuditError
    └── WitnessError       the witness cannot be reached, read or written, or is not a witness
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlparse

from governance.errors import AuditError

__all__ = ["ObjectLockWitness", "Witness", "WitnessError", "WitnessState", "WitnessedHead", "open_witness",
           "witness_uri_problem"]

_HEAD_KEY = re.compile(r"^(?P<seq>\d{20})-(?P<hash>[0-9a-f]{64})\.json$")


class WitnessError(AuditError):
    """The witness cannot be reached, read or written, or it is not a witness (no Object Lock)."""


@dataclass(frozen=True)
class WitnessedHead:
    """One head as the witness holds it: ``seq`` and ``hash`` (from the object's name), where it is
    (``key``, ``version_id``) and when the witness stored it (``stored_at``, the store's clock)."""

    seq: int
    hash: str
    key: str
    version_id: str | None = None
    stored_at: datetime | None = None


@dataclass
class WitnessState:
    """What a witness holds: the heads (by seq, oldest version of each object) and any sign of
    tampering with them (a second version of a head's object, a delete marker, a stray object)."""

    heads: list[WitnessedHead] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)  # keys with more than one version
    deleted: list[str] = field(default_factory=list)  # keys with a delete marker
    strays: list[str] = field(default_factory=list)  # objects under heads/ that are not a head's name

    @property
    def last(self) -> WitnessedHead | None:
        return max(self.heads, key=lambda h: h.seq) if self.heads else None


class Witness(ABC):
    """Where signed audit heads are published and read back. Implementations must make a
    published head impossible for the publisher to change or remove."""

    uri: str

    @abstractmethod
    def publish(self, head: Mapping[str, Any]) -> bool:
        """Store one signed head (``seq``, ``hash``, ``signed_at``, ``key_id``, ``signature``).

        Returns False when that exact head was published before (idempotent).

        Raises:
            WitnessError: it could not be stored (nothing about the audit log changes).
        """

    @abstractmethod
    def read(self) -> WitnessState:
        """Every published head, and any sign of tampering. Raises WitnessError when unreachable."""

    @abstractmethod
    def fetch(self, head: WitnessedHead) -> dict[str, Any]:
        """The signed head's body, plus ``lock`` (what protects it, e.g. ``COMPLIANCE until …``)."""


def witness_uri_problem(uri: str) -> str | None:
    """What is wrong with a witness URI, or None. Only ``s3://bucket/prefix`` today; no credentials in it."""
    u = urlparse(uri)
    if u.scheme.lower() not in ("s3", "s3a"):
        return (f"audit.witness {uri!r}: a witness is s3://bucket/prefix on a bucket created with S3 Object Lock "
                "(the only kind Lakewarden publishes to today)")
    if not u.netloc or "@" in u.netloc or u.query or u.password:
        return (f"audit.witness {uri!r}: give s3://bucket/prefix only; the endpoint and credentials come from the "
                "AWS_* environment variables, never from lakewarden.yaml")
    if not u.path.strip("/"):
        return f"audit.witness {uri!r}: name a prefix under the bucket (s3://bucket/prefix)"
    return None


def open_witness(uri: str, *, retention_days: int = 365, clock: Callable[[], datetime] | None = None) -> Witness:
    """The witness at ``uri`` (``s3://bucket/prefix``).

    Raises:
        ValueError: the URI is not one (see :func:`witness_uri_problem`).
    """
    problem = witness_uri_problem(uri)
    if problem:
        raise ValueError(problem)
    return ObjectLockWitness(uri, retention_days=retention_days, clock=clock)


def _client():  # noqa: ANN202 - a boto3 S3 client
    """A boto3 client from the ``AWS_*`` environment with short timeouts and few retries: a
    witness that does not answer must not hold a flush for minutes (the head is kept and
    published later)."""
    from governance.objectstore import s3_client

    return s3_client(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"})


def _head_body(head: Mapping[str, Any]) -> bytes:
    keep = ("seq", "hash", "signed_at", "key_id", "signature")
    return json.dumps({k: head[k] for k in keep}, sort_keys=True, separators=(",", ":")).encode()


class ObjectLockWitness(Witness):
    """Signed heads as objects under COMPLIANCE retention in an S3 bucket with Object Lock.

    Args:
        uri: ``s3://bucket/prefix``.
        retention_days: how long each head is kept beyond anyone's reach (the store enforces it).
        client: a boto3 S3 client (default: one from the ``AWS_*`` variables, short timeouts).
        clock: "now" for the retention date. The *store* enforces the date with its own clock, so
            this must be real time in production; tests inject one that is.
    """

    def __init__(self, uri: str, *, retention_days: int = 365, client=None,  # noqa: ANN001 - boto3's client
                 clock: Callable[[], datetime] | None = None) -> None:
        problem = witness_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        if retention_days < 1:
            raise ValueError("retention_days must be at least 1")
        u = urlparse(uri)
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}"
        self.retention_days = retention_days
        self._client_obj = client
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._lock_checked = False

    def __repr__(self) -> str:
        return f"ObjectLockWitness({self.uri!r}, retention_days={self.retention_days})"

    @property
    def client(self):  # noqa: ANN201 - boto3's client
        if self._client_obj is None:
            self._client_obj = _client()
        return self._client_obj

    def key(self, seq: int, h: str) -> str:
        return f"{self.prefix}/heads/{seq:020d}-{h}.json"

    def _fail(self, exc: Exception, verb: str) -> WitnessError:
        import botocore.exceptions

        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            what = f"{err.get('Code', '?')}: {err.get('Message', '')}".strip().rstrip(":")
        else:
            what = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return WitnessError(f"cannot {verb} the audit witness {self.uri}: {what}",
                            hint="check AWS_ENDPOINT_URL, the credentials and the witness bucket")

    def check_lock(self) -> None:
        """Refuse a bucket without Object Lock: heads there could be deleted by their writer."""
        if self._lock_checked:
            return
        import botocore.exceptions

        try:
            conf = self.client.get_object_lock_configuration(Bucket=self.bucket)
            enabled = conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code not in ("ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"):
                raise self._fail(exc, "reach") from None
            enabled = False
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "reach") from None
        if not enabled:
            raise WitnessError(
                f"the bucket {self.bucket!r} of the audit witness {self.uri} has no Object Lock: it is not a witness",
                hint="create the witness bucket with Object Lock enabled (it can only be enabled at creation)",
            )
        self._lock_checked = True

    def publish(self, head: Mapping[str, Any]) -> bool:
        import botocore.exceptions

        self.check_lock()
        until = self._clock() + timedelta(days=self.retention_days)
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.key(int(head["seq"]), str(head["hash"])), Body=_head_body(head),
                ContentType="application/json", IfNoneMatch="*",
                ObjectLockMode="COMPLIANCE", ObjectLockRetainUntilDate=until,
            )
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False  # this seq and hash are there already (a retried publication)
            raise self._fail(exc, "write to") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "write to") from None
        return True

    def read(self) -> WitnessState:
        import botocore.exceptions

        self.check_lock()
        base = f"{self.prefix}/heads/"
        versions: dict[str, list[dict[str, Any]]] = {}
        deleted: set[str] = set()
        try:
            for page in self.client.get_paginator("list_object_versions").paginate(Bucket=self.bucket, Prefix=base):
                for v in page.get("Versions", []):
                    versions.setdefault(v["Key"], []).append(v)
                for m in page.get("DeleteMarkers", []):
                    deleted.add(m["Key"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "read") from None
        state = WitnessState(deleted=sorted(deleted))
        for key, vs in sorted(versions.items()):
            if len(vs) > 1:
                state.overwritten.append(key)
            m = _HEAD_KEY.match(key[len(base):])
            if not m:
                state.strays.append(key)
                continue
            first = min(vs, key=lambda v: (v.get("LastModified"), v.get("VersionId") or ""))
            state.heads.append(WitnessedHead(int(m["seq"]), m["hash"], key, first.get("VersionId"),
                                             first.get("LastModified")))
        state.heads.sort(key=lambda h: (h.seq, h.stored_at or datetime.min.replace(tzinfo=timezone.utc)))
        return state

    def fetch(self, head: WitnessedHead) -> dict[str, Any]:
        import botocore.exceptions

        kw = {"VersionId": head.version_id} if head.version_id else {}
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=head.key, **kw)
            body = json.loads(r["Body"].read())
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "read") from None
        except ValueError:
            raise WitnessError(f"the witnessed head {head.key} is not JSON") from None
        mode, until = r.get("ObjectLockMode"), r.get("ObjectLockRetainUntilDate")
        if not mode:  # versitygw's GET does not say; ask for the retention itself
            try:
                ret = self.client.get_object_retention(Bucket=self.bucket, Key=head.key, **kw).get("Retention", {})
                mode, until = ret.get("Mode"), ret.get("RetainUntilDate")
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                mode = None
        body["lock"] = f"{mode} until {until.isoformat() if hasattr(until, 'isoformat') else until}" if mode else "none"
        return body


def witness_for(config: Any) -> Witness | None:
    """The witness ``lakewarden.yaml`` names (``audit.witness``), or None when it names none (the default)."""
    uri = config.audit.witness
    return open_witness(uri, retention_days=config.audit.witness_retention_days) if uri else None
