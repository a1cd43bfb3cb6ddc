"""Tables on an S3-compatible object store: how Lakewarden reaches it, and a local server.

``storage.root: s3://bucket/prefix`` puts every table (bronze, silver, vault, quarantine, the
audit log, lineage, the ledgers) in that bucket. The endpoint and the credentials come from the
environment, never from ``lakewarden.yaml``: the standard AWS variables that delta-rs, pyarrow and
every S3 client read (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for a store other than AWS, ``AWS_ALLOW_HTTP=true`` for plain HTTP on
loopback). Concurrent writers are safe on a store that honours ``If-None-Match: *`` (delta-rs 1.x
commits with it): AWS S3 since 2024, versitygw, SeaweedFS, R2. A store that ignores it (Garage,
measured) loses commits under concurrent writers.

:class:`LocalObjectStore` runs the Versity S3 Gateway (``infra/objectstore/install.sh``, built once
per machine from the Go module proxy, cached outside git) on loopback over a local folder: the
tests' server, and a laptop's stand-in for S3. Its credentials are made at start, passed to the
server through its environment (never its arguments) and handed to clients by :meth:`env`.

    store = LocalObjectStore(Path(".lakewarden/s3"))
    store.start()                      # returns when the port answers
    store.create_bucket("lakewarden")
    os.environ.update(store.env())     # what a client needs: endpoint, keys, region
    ...
    store.stop()

:func:`filesystem` gives a pyarrow filesystem for any table URI (local or ``s3://``), for the few
places that list or read objects directly (the erasure scanner, the Delta log readers).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from governance.errors import LakewardenError

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "infra" / "objectstore" / "install.sh"
REMOTE_SCHEMES = ("s3", "s3a")


class ObjectStoreError(LakewardenError):
    """The object store could not be installed, started or reached."""


def is_remote(uri: str) -> bool:
    """Whether a table URI names an object store (``s3://...``) rather than a local folder."""
    return urlparse(uri).scheme.lower() in REMOTE_SCHEMES


def _endpoint() -> str | None:
    """The S3 endpoint from the environment (None: AWS itself); plain HTTP only when allowed.
    ``AWS_ENDPOINT_URL`` only: the variable delta-rs reads too, so every reader goes to one store."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and urlparse(endpoint).scheme == "http" and os.environ.get("AWS_ALLOW_HTTP", "").lower() not in (
        "1", "true", "yes"
    ):
        raise ObjectStoreError(
            f"AWS_ENDPOINT_URL is plain HTTP ({endpoint}); set AWS_ALLOW_HTTP=true for a loopback store, or use https"
        )
    return endpoint or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``uri`` and the path within it (``bucket/prefix`` for S3).

    For S3 the endpoint and credentials come from the environment (the ``AWS_*`` variables), as for
    delta-rs; ``AWS_ALLOW_HTTP=true`` allows a plain-HTTP endpoint (loopback)."""
    u = urlparse(uri)
    if u.scheme.lower() not in REMOTE_SCHEMES:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), path
    endpoint = _endpoint()
    kw: dict = {"region": _region()}
    if endpoint:
        e = urlparse(endpoint)
        kw.update(endpoint_override=e.netloc, scheme=e.scheme or "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kw), (u.netloc + u.path).rstrip("/")


_REACHED: set[tuple[str, str | None]] = set()


def check_root(uri: str) -> None:
    """Refuse, by name, a storage root on an object store that cannot be used: an endpoint that
    does not answer, credentials it refuses, a bucket that does not exist. Checked once per
    bucket and endpoint in a process; a local root is not checked here."""
    if not is_remote(uri):
        return
    endpoint = _endpoint()
    bucket = urlparse(uri).netloc
    if (bucket, endpoint) in _REACHED:
        return
    fs, _ = filesystem(uri)
    where = endpoint or "AWS S3"
    try:
        info = fs.get_file_info(bucket)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ObjectStoreError(
            f"cannot use the storage root {uri} at {where}: {first}",
            hint="check AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and AWS_REGION",
        ) from None
    if info.type == pafs.FileType.NotFound:
        raise ObjectStoreError(f"the bucket {bucket!r} of storage.root {uri} does not exist at {where}",
                               hint="create the bucket, or fix storage.root in lakewarden.yaml")
    _REACHED.add((bucket, endpoint))


def s3_client(**config: Any):
    """A boto3 S3 client from the environment (the same ``AWS_*`` variables; a plain-HTTP endpoint
    only with ``AWS_ALLOW_HTTP=true``), for what pyarrow's filesystem cannot do: object versions.
    ``config``: more ``botocore.config.Config`` settings (timeouts, retries)."""
    import boto3
    from botocore.config import Config

    endpoint = _endpoint()
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=_region(),
                        config=Config(s3={"addressing_style": "path"} if endpoint else {}, **config))


def install() -> Path:
    """Install (once per machine) and return the versitygw binary."""
    cached = os.environ.get("LAKEWARDEN_VERSITYGW")
    if cached and Path(cached).is_file():
        return Path(cached)
    try:
        out = subprocess.run(["bash", str(INSTALL)], check=True, capture_output=True, text=True, timeout=1800)
    except subprocess.CalledProcessError as exc:
        raise ObjectStoreError(f"installing versitygw failed: {exc.stderr.strip()[-500:]}") from None
    except FileNotFoundError:
        raise ObjectStoreError("bash is needed to install versitygw (infra/objectstore/install.sh)") from None
    return Path(out.stdout.strip().splitlines()[-1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalObjectStore:
    """The Versity S3 Gateway on 127.0.0.1:``port``, serving the folder ``data_dir`` (one
    sub-folder per bucket), with ``versions_dir`` for buckets that keep old versions."""

    def __init__(self, data_dir: Path, *, port: int | None = None, region: str = "us-east-1") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.region = region
        self.access_key = "lw" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def root(self) -> Path:
        """The folder whose sub-folders are the buckets (what the erasure scanner of a laptop reads)."""
        return self.data_dir / "buckets"

    @property
    def versions_dir(self) -> Path:
        return self.data_dir / "versions"

    def env(self) -> dict[str, str]:
        """The variables a client (delta-rs, pyarrow, boto3, Trino's launcher) needs to reach this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def start(self, *, timeout: float = 30.0) -> "LocalObjectStore":
        if _port_open(self.port):
            raise ObjectStoreError(f"port {self.port} is already in use (another object store?)")
        binary = install()
        for d in (self.root, self.versions_dir):
            d.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "ROOT_ACCESS_KEY": self.access_key, "ROOT_SECRET_KEY": self.secret_key,
               "VGW_REGION": self.region}
        log = open(self.data_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(binary), "--port", f"127.0.0.1:{self.port}", "posix", "--versioning-dir", str(self.versions_dir),
             str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.data_dir / "server.log").read_text(errors="replace")[-800:]
                raise ObjectStoreError(f"versitygw exited (code {self.proc.returncode}): {tail}")
            if _port_open(self.port):
                return self
            time.sleep(0.1)
        self.stop()
        raise ObjectStoreError(f"versitygw did not answer on port {self.port} within {timeout:.0f}s")

    def _fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                                 access_key=self.access_key, secret_key=self.secret_key, region=self.region,
                                 allow_bucket_creation=True)

    def create_bucket(self, name: str) -> str:
        """Create a bucket (no error if it exists); returns ``s3://name``."""
        fs = self._fs()
        if fs.get_file_info(name).type == pafs.FileType.NotFound:
            fs.create_dir(name)
        return f"s3://{name}"

    def stop(self, *, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def remove(self) -> None:
        """Stop and delete the store's folder (every bucket in it)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def purge_old_versions(uri: str) -> int:
    """Delete, for good, every older version and delete marker under ``uri`` (a table's prefix on
    a bucket that keeps versions); the current objects are untouched. Returns versions deleted.

    On a versioned bucket a Delta ``VACUUM`` (or any delete) only hides an object behind a delete
    marker: the erased bytes stay readable by version id. An erasure calls this after vacuuming.
    A bucket without versioning has nothing to purge (0). A version the bucket refuses to delete
    (object lock) raises :class:`ObjectStoreError` naming how many stayed."""
    import botocore.exceptions

    if not is_remote(uri):
        return 0
    u = urlparse(uri)
    bucket, prefix = u.netloc, u.path.strip("/") + "/"
    client = s3_client()
    doomed: list[dict[str, str]] = []
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                if not v.get("IsLatest", True) and v.get("VersionId") not in (None, "null"):
                    doomed.append({"Key": v["Key"], "VersionId": v["VersionId"]})
            for m in page.get("DeleteMarkers", []):
                doomed.append({"Key": m["Key"], "VersionId": m["VersionId"]})
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NotImplemented", "MethodNotAllowed"):
            return 0  # a store without versions keeps no older copies
        raise ObjectStoreError(f"cannot list the object versions under {uri}: {exc}") from None
    kept = 0
    for i in range(0, len(doomed), 1000):
        r = client.delete_objects(Bucket=bucket, Delete={"Objects": doomed[i:i + 1000], "Quiet": True})
        kept += len(r.get("Errors", []))
    if kept:
        raise ObjectStoreError(
            f"{kept} older object version(s) under {uri} could not be deleted (object lock or permissions): "
            "the erased rows' bytes stay there; crypto-shredding leaves their sealed values unreadable"
        )
    return len(doomed)


# --------------------------------------------------------------------------- objects under a prefix


class _HashingReader:
    """A read-only, non-seekable view of a file that hashes what it hands out, in order (boto3's
    managed upload reads a non-seekable stream sequentially), so a file is read once for both."""

    def __init__(self, fh) -> None:  # noqa: ANN001 - a binary file
        import hashlib

        self._fh = fh
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self.sha256.update(data)
        return data


class ObjectPrefix:
    """The objects under one ``s3://bucket/prefix``, addressed by keys relative to it.

    For what keeps plain objects (not Delta tables) in the bucket: the model registry's artifacts.
    Reads and writes go through boto3 (:func:`s3_client`: the ``AWS_*`` variables), because
    pyarrow's filesystem cannot make a conditional put. ``put(..., if_absent=True)`` sends
    ``If-None-Match: *``: it returns False, writing nothing, when the key exists (HTTP 412), so of
    several machines putting one key exactly one gets True. A missing key raises
    ``FileNotFoundError``; any other failure :class:`ObjectStoreError`, naming the object.

        p = ObjectPrefix("s3://lake/prod/models")
        p.put("credit/3/.claim", b"{}", if_absent=True)   # True: version 3 is ours
        p.put("credit/3/model.pt", weights)
        p.list("credit/3")                               # {"model.pt": 1234, ".claim": 2}
    """

    def __init__(self, uri: str, *, client=None) -> None:  # noqa: ANN001 - a boto3 S3 client
        if not is_remote(uri):
            raise ValueError(f"ObjectPrefix needs an s3:// URI, got {uri!r}")
        u = urlparse(uri)
        self.bucket = u.netloc
        self.prefix = u.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._client = client

    def __repr__(self) -> str:
        return f"ObjectPrefix({self.uri!r})"

    @property
    def client(self):  # noqa: ANN201 - boto3's client
        if self._client is None:
            self._client = s3_client()
        return self._client

    def key(self, rel: str = "") -> str:
        """The bucket key of ``rel`` (``prefix/rel``)."""
        rel = rel.strip("/")
        return "/".join(p for p in (self.prefix, rel) if p)

    def uri_of(self, rel: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    def _fail(self, exc: Exception, verb: str, rel: str) -> ObjectStoreError:
        import botocore.exceptions

        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            what = f"{err.get('Code', '?')}: {err.get('Message', '')}".strip().rstrip(":")
        else:
            what = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return ObjectStoreError(f"cannot {verb} {self.uri_of(rel)}: {what}",
                                hint="check AWS_ENDPOINT_URL, the credentials and the bucket's permissions")

    @staticmethod
    def _status(exc: Exception) -> int | None:
        import botocore.exceptions

        if isinstance(exc, botocore.exceptions.ClientError):
            return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return None

    def put(self, rel: str, data: bytes | Path, *, if_absent: bool = False) -> bool:
        """Write ``data`` (bytes, or a file to upload) at ``rel``. With ``if_absent`` the put is
        conditional (``If-None-Match: *``) and returns False when the key already exists (412), or
        when the store answers that another conditional write of the key is in flight (409)."""
        import botocore.exceptions

        try:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                if if_absent:
                    raise ValueError("a conditional put takes bytes (a claim), not a file")
                self.upload(rel, Path(data))
                return True
            kw = {"IfNoneMatch": "*"} if if_absent else {}
            self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=bytes(data), **kw)
        except botocore.exceptions.ClientError as exc:
            if if_absent and self._status(exc) in (409, 412):
                return False
            raise self._fail(exc, "write", rel) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "write", rel) from None
        return True

    def upload(self, rel: str, path: Path) -> str:
        """Upload the file ``path`` to ``rel`` (multipart when large), reading it once; returns the
        sha256 of the bytes sent."""
        import botocore.exceptions

        try:
            with open(path, "rb") as fh:
                reader = _HashingReader(fh)
                self.client.upload_fileobj(reader, self.bucket, self.key(rel))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "write", rel) from None
        return reader.sha256.hexdigest()

    def _body(self, rel: str):  # noqa: ANN202 - botocore's StreamingBody
        import botocore.exceptions

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"]
        except botocore.exceptions.ClientError as exc:
            if self._status(exc) == 404 or exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.uri_of(rel)) from None
            raise self._fail(exc, "read", rel) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "read", rel) from None

    def get(self, rel: str) -> bytes:
        """The bytes of the object at ``rel`` (``FileNotFoundError`` when there is none)."""
        import botocore.exceptions

        body = self._body(rel)
        try:
            return body.read()
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "read", rel) from None
        finally:
            body.close()

    def download(self, rel: str, dest: Path, *, chunk: int = 1 << 20) -> str:
        """Stream the object at ``rel`` into the file ``dest`` (a temporary file in its folder,
        renamed over it when complete); returns the sha256 of the bytes written."""
        import hashlib

        import botocore.exceptions

        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(8)}.tmp")
        body = self._body(rel)
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for part in body.iter_chunks(chunk):
                    h.update(part)
                    out.write(part)
            os.replace(tmp, dest)
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "read", rel) from None
        finally:
            body.close()
            if tmp.exists():
                tmp.unlink()
        return h.hexdigest()

    def folders(self, rel: str = "") -> list[str]:
        """The names of the "folders" right under ``rel/`` (common prefixes up to the next ``/``)."""
        import botocore.exceptions

        base = self.key(rel)
        start = f"{base}/" if base else ""
        out: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start,
                                                                              Delimiter="/"):
                out += [p["Prefix"][len(start):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "list", rel) from None
        return sorted(out)

    def exists(self, rel: str = "") -> bool:
        """Whether any object lies at or under ``rel``."""
        import botocore.exceptions

        base = self.key(rel)
        try:
            r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=base, MaxKeys=1)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "list", rel) from None
        return bool(r.get("KeyCount") or r.get("Contents"))

    def list(self, rel: str = "") -> dict[str, int]:  # noqa: A003 - a listing
        """Every object under ``rel/`` (recursively): key relative to ``rel`` -> size in bytes."""
        import botocore.exceptions

        base = self.key(rel)
        start = f"{base}/" if base else ""
        out: dict[str, int] = {}
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for o in page.get("Contents", []):
                    out[o["Key"][len(start):]] = int(o.get("Size", 0))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "list", rel) from None
        return out

    def delete(self, rel: str) -> int:
        """Delete the object at ``rel`` and every object under ``rel/``, then, on a bucket that keeps
        versions, the older versions and delete markers under ``rel/`` (:func:`purge_old_versions`).
        Returns the objects deleted."""
        import botocore.exceptions

        keys = [self.key(f"{rel.strip('/')}/{k}") for k in self.list(rel)]
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
            keys.append(self.key(rel))
        except botocore.exceptions.ClientError as exc:
            if self._status(exc) != 404:
                raise self._fail(exc, "read", rel) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "read", rel) from None
        try:
            for i in range(0, len(keys), 1000):
                r = self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
                if r.get("Errors"):
                    raise ObjectStoreError(f"{len(r['Errors'])} object(s) under {self.uri_of(rel)} could not be deleted")
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, "delete", rel) from None
        purge_old_versions(self.uri_of(rel))
        return len(keys)
