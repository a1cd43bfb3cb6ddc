"""Key-encryption keys (KEKs): the keys that wrap every data key.

A KEK never encrypts data; it wraps the per-subject data keys (DEKs) and the
system keys in the key store. Three providers load one:

* ``env``    — base64 key in an environment variable (default ``LAKEWARDEN_KEK``);
* ``file``   — base64 key in a file readable only by its owner;
* ``plugin`` — ``"package.module:factory"`` returning a :class:`KeyEncryptionKey`
  (the seam for AWS KMS, GCP KMS, Vault transit, ...).

Every loading failure is a :class:`~governance.errors.KekUnavailable` whose
message names the variable, file or plugin and says what to do; secret values
are never echoed.

Example::

    kek = load_kek("env", var="LAKEWARDEN_KEK")
    kek = load_kek("file", path="secrets/lakewarden.kek", base_dir=workspace)
    kek = load_kek("plugin", factory="acme_kms:make_kek", options={"key_arn": arn})
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import importlib
import os
import stat
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from governance.errors import KekUnavailable, KeyManagementError
from governance.keys import hazmat

__all__ = [
    "DEFAULT_KEK_ENV",
    "InsecureKeyFileWarning",
    "KeyEncryptionKey",
    "LocalKek",
    "generate_kek_b64",
    "generate_kek_file",
    "kek_from_env",
    "kek_from_file",
    "kek_from_plugin",
    "load_kek",
]

DEFAULT_KEK_ENV = "LAKEWARDEN_KEK"
PROVIDERS = ("env", "file", "plugin")
_NEW_KEK_HINT = "generate a key with `lakewarden keys new-kek`"


class InsecureKeyFileWarning(UserWarning):
    """A KEK file can be read or written by users other than its owner."""


class KeyEncryptionKey(abc.ABC):
    """A key that wraps and unwraps data keys; implement this to plug in a KMS.

    Contract:
        * ``key_id`` names the key material (for a KMS: key and version). The
          key store records it beside every wrapped key; two KEKs with the same
          ``key_id`` must be able to unwrap each other's blobs.
        * ``wrap(dek, aad)`` returns an opaque blob; ``unwrap(blob, aad)``
          returns the DEK only when ``aad`` is the same bytes, and raises
          :class:`~governance.errors.DecryptionError` when the blob was not
          wrapped by this KEK (or with other ``aad``).
        * ``wrap_many`` / ``unwrap_many`` default to a loop; override them when
          the KMS has a batch call (rotation and bulk ingest use them).
    """

    @property
    @abc.abstractmethod
    def key_id(self) -> str:
        """Stable, non-secret identifier of this KEK."""

    @abc.abstractmethod
    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        """Encrypt ``dek`` bound to ``aad``."""

    @abc.abstractmethod
    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt a blob from :meth:`wrap`; raise ``DecryptionError`` if it is not ours."""

    def wrap_many(self, deks: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        """Wrap several keys; ``aads[i]`` binds ``deks[i]``."""
        return [self.wrap(d, a) for d, a in zip(deks, aads, strict=True)]

    def unwrap_many(self, blobs: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        """Unwrap several blobs; ``aads[i]`` binds ``blobs[i]``."""
        return [self.unwrap(b, a) for b, a in zip(blobs, aads, strict=True)]


class LocalKek(KeyEncryptionKey):
    """A 32-byte KEK held in process memory; wraps with AES-256-GCM.

    ``source`` says where it came from (``"env:LAKEWARDEN_KEK"``,
    ``"file:/path"``) for messages; the key itself never appears in
    ``repr``/``str``.
    """

    __slots__ = ("__key", "_key_id", "_source")

    def __init__(self, key: bytes, *, source: str) -> None:
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError(f"KEK must be bytes, got {type(key).__name__}")
        if len(key) != hazmat.KEY_SIZE:
            raise ValueError(f"KEK must be {hazmat.KEY_SIZE} bytes, got {len(key)}")
        self.__key = bytes(key)
        digest = hashlib.sha256(b"lakewarden-kek-id\x00" + self.__key).hexdigest()
        self._key_id = "kek-" + digest[:16]
        self._source = source

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def source(self) -> str:
        return self._source

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        return hazmat.aesgcm_seal(self.__key, dek, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return hazmat.aesgcm_open(self.__key, blob, aad)

    def _native_material(self) -> bytes:
        """The key bytes, for the native core's bulk key-store path only (it zeroizes its copy)."""
        return self.__key

    def wrap_many(self, deks: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        from governance.keys import native  # the native core when built (same bytes), else Python

        return native.wrap_keys(self.__key, deks, aads)

    def unwrap_many(self, blobs: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
        from governance.keys import native

        return native.unwrap_keys(self.__key, blobs, aads)

    def __repr__(self) -> str:
        return f"LocalKek(key_id={self._key_id!r}, source={self._source!r})"

    __str__ = __repr__


# --------------------------------------------------------------------------- loading


def _decode_key(text: str) -> bytes:
    """Decode standard or urlsafe base64 (padding optional); raise ValueError."""
    s = "".join(text.split())
    if not s:
        raise ValueError("empty")
    s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _key_from_text(text: str, *, what: str, source: str) -> LocalKek:
    try:
        key = _decode_key(text)
    except ValueError as exc:
        if str(exc) == "empty":
            raise KekUnavailable(f"{what} is empty", hint=_NEW_KEK_HINT) from None
        raise KekUnavailable(
            f"{what} is not valid base64; it must hold a {hazmat.KEY_SIZE}-byte key encoded as base64",
            hint=_NEW_KEK_HINT,
        ) from None
    if len(key) != hazmat.KEY_SIZE:
        raise KekUnavailable(
            f"{what} decodes to {len(key)} bytes; a KEK must be exactly {hazmat.KEY_SIZE} bytes (AES-256)",
            hint=_NEW_KEK_HINT,
        )
    return LocalKek(key, source=source)


def kek_from_env(var: str = DEFAULT_KEK_ENV) -> LocalKek:
    """Load a KEK from environment variable ``var`` (base64, standard or urlsafe).

    Raises:
        KekUnavailable: the variable is unset or empty, not base64, or does
            not decode to 32 bytes.
    """
    value = os.environ.get(var)
    if value is None:
        raise KekUnavailable(
            f"environment variable {var} is not set; generate a key with "
            f"`lakewarden keys new-kek` and export it as {var}, or configure the file or plugin KEK provider"
        )
    return _key_from_text(value, what=f"environment variable {var}", source=f"env:{var}")


def kek_from_file(path: str | os.PathLike[str]) -> LocalKek:
    """Load a KEK from a file holding the base64 key (surrounding whitespace ignored).

    Warns with :class:`InsecureKeyFileWarning` when group or others have any
    access to the file.

    Raises:
        KekUnavailable: the file is missing, unreadable, or its content is not
            a base64 32-byte key.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise KekUnavailable(
            f"KEK file {p} does not exist",
            hint=f"generate one with `lakewarden keys new-kek --file {p}`",
        ) from None
    except OSError as exc:
        raise KekUnavailable(f"KEK file {p} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KekUnavailable(f"KEK file {p} is not a regular file")
    if os.name == "posix" and st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        warnings.warn(
            f"KEK file {p} is readable or writable by group or others (mode {mode:#o}); "
            f"restrict it with `chmod 600 {p}`",
            InsecureKeyFileWarning,
            stacklevel=2,
        )
    try:
        text = p.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise KekUnavailable(
            f"KEK file {p} is not valid base64; it must hold a {hazmat.KEY_SIZE}-byte key encoded as base64",
            hint=_NEW_KEK_HINT,
        ) from None
    except OSError as exc:
        raise KekUnavailable(f"KEK file {p} cannot be read: {exc.strerror}") from None
    return _key_from_text(text, what=f"KEK file {p}", source=f"file:{p}")


def kek_from_plugin(spec: str, options: Mapping[str, Any] | None = None) -> KeyEncryptionKey:
    """Import ``"package.module:factory"``, call ``factory(**options)``, return its KEK.

    Raises:
        KekUnavailable: malformed spec, module not importable, no such
            attribute, factory failed, or it returned something other than a
            :class:`KeyEncryptionKey`. A ``KeyManagementError`` raised by the
            factory itself passes through unchanged.
    """
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise KekUnavailable(f"KEK plugin spec {spec!r} is not of the form 'package.module:factory'")
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise KekUnavailable(f"KEK plugin spec {spec!r} is not of the form 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise KekUnavailable(
            f"KEK plugin module {module_name!r} (from {spec!r}) cannot be imported: {exc}",
            hint="install the package that provides it",
        ) from exc
    except Exception as exc:  # a broken plugin must not crash with a bare traceback
        raise KekUnavailable(
            f"KEK plugin module {module_name!r} (from {spec!r}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KekUnavailable(f"KEK plugin {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(obj):
        raise KekUnavailable(f"KEK plugin {spec!r} is not callable (it is a {type(obj).__name__})")
    try:
        kek = obj(**dict(options or {}))
    except KeyManagementError:
        raise
    except Exception as exc:
        raise KekUnavailable(f"KEK plugin factory {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(kek, KeyEncryptionKey):
        raise KekUnavailable(
            f"KEK plugin factory {spec!r} returned {type(kek).__name__}, not a KeyEncryptionKey",
            hint="return an instance of a governance.keys.KeyEncryptionKey subclass",
        )
    return kek


def load_kek(
    provider: str,
    *,
    var: str | None = None,
    path: str | os.PathLike[str] | None = None,
    factory: str | None = None,
    options: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> KeyEncryptionKey:
    """Load the KEK from ``provider`` ("env", "file" or "plugin").

    Args:
        var: environment variable for "env" (default ``LAKEWARDEN_KEK``).
        path: key file for "file"; a relative path is resolved against ``base_dir``.
        factory: ``"package.module:factory"`` for "plugin".
        options: keyword arguments for the plugin factory.
        base_dir: directory that relative paths are resolved against (the workspace).

    Raises:
        KekUnavailable: unknown provider, missing setting, or the provider failed.
    """
    if provider == "env":
        return kek_from_env(var or DEFAULT_KEK_ENV)
    if provider == "file":
        if path is None or str(path) == "":
            raise KekUnavailable("KEK provider 'file' needs a path (keys.kek.path)")
        p = Path(path).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = Path(base_dir) / p
        return kek_from_file(p)
    if provider == "plugin":
        if not factory:
            raise KekUnavailable("KEK provider 'plugin' needs a factory 'package.module:factory' (keys.kek.factory)")
        return kek_from_plugin(factory, options)
    raise KekUnavailable(f"unknown KEK provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


# --------------------------------------------------------------------------- generating


def generate_kek_b64() -> str:
    """Return a new random 32-byte KEK as urlsafe base64 (44 characters)."""
    return base64.urlsafe_b64encode(hazmat.new_key()).decode("ascii")


def generate_kek_file(path: str | os.PathLike[str]) -> str:
    """Write a new random KEK to ``path`` (mode 0600) and return its key id.

    Missing parent directories are created with mode 0700.

    Raises:
        KeyManagementError: the file already exists (a KEK is never
            overwritten: losing it makes everything it wrapped unreadable), or
            it cannot be written.
    """
    p = Path(path).expanduser()
    _makedirs_private(p.parent)
    key = hazmat.new_key()
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyManagementError(
            f"KEK file {p} already exists; refusing to overwrite it "
            "(everything wrapped by that key would become unreadable)",
            hint="choose another path, or rotate to a new KEK with `lakewarden keys rotate`",
        ) from None
    except OSError as exc:
        raise KeyManagementError(f"cannot create KEK file {p}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            if os.name == "posix":
                os.fchmod(fh.fileno(), 0o600)
            fh.write(base64.urlsafe_b64encode(key).decode("ascii") + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        p.unlink(missing_ok=True)
        raise KeyManagementError(f"cannot write KEK file {p}: {exc.strerror}") from None
    return LocalKek(key, source=f"file:{p}").key_id


def _makedirs_private(directory: Path) -> None:
    """Create ``directory`` and missing parents with mode 0700 (existing ones untouched)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        except OSError as exc:
            raise KeyManagementError(f"cannot create directory {d}: {exc.strerror}") from None
        if os.name == "posix":
            os.chmod(d, 0o700)

