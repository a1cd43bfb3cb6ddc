"""The handler registry: each layer's part of erasure and access, found through entry points.

The kernel knows no layer. Each layer declares an :class:`ErasureHandler` and names it in
the ``lakewarden.erasure_handlers`` entry-point group of its distribution
(``pyproject.toml``)::

    [project.entry-points."lakewarden.erasure_handlers"]
    lakehouse = "lakehouse.erasure:HANDLER"

The entry points are loaded lazily, the first time a request starts (:func:`require_handlers`).
Erasure is **closed by default**: every name in :data:`REQUIRED_HANDLERS` must be registered
with the capability it is required for, or no request starts (:class:`MissingHandlers` names
each missing handler and why — an entry point absent, failing to import, or naming something
that is not an ``ErasureHandler`` of that name). :func:`register_handler` adds or replaces a
handler by hand (extra stores, tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.erasure.errors import MissingHandlers
from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = [
    "ENTRY_POINT_GROUP", "REQUIRED_HANDLERS", "SEALED_SHREDDED", "SEALED_UNREADABLE", "AccessItem", "ErasureContext",
    "ErasureHandler", "load_handlers", "open_sealed", "register_handler", "registered_handlers",
    "require_handlers", "unregister_handler",
]

ENTRY_POINT_GROUP = "lakewarden.erasure_handlers"
REQUIRED_HANDLERS: tuple[str, ...] = ("lakehouse", "landing", "features", "models", "serving-logs")
"""Handlers without which no erasure or access request starts."""
_REQUIRED_CAPABILITY = {"models": "models"}  # the rest must erase

SEALED_UNREADABLE = "(sealed; cannot be opened)"
SEALED_SHREDDED = "(sealed; the subject's key was destroyed)"


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
        name: the handler's name, as its entry point is named ("lakehouse", "landing",
            "features", "models", "serving-logs").
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
_FAILED: dict[str, str] = {}  # entry point name -> why it did not load
_FROM_ENTRY_POINTS: set[str] = set()  # names registered by load_handlers (a reload forgets them first)
_LOADED = False


def register_handler(handler: ErasureHandler) -> None:
    """Register (or replace) a handler by hand; entry points register the layers' own."""
    if not isinstance(handler, ErasureHandler):
        raise TypeError(f"expected an ErasureHandler, got {type(handler).__name__}")
    _HANDLERS[handler.name] = handler
    _FAILED.pop(handler.name, None)
    _FROM_ENTRY_POINTS.discard(handler.name)


def unregister_handler(name: str) -> ErasureHandler | None:
    """Remove a handler (it is then missing, if required); returns it, or None if none was registered."""
    return _HANDLERS.pop(name, None)


def _entry_points() -> Sequence[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_handlers(*, reload: bool = False) -> dict[str, str]:
    """Load the handlers named by the ``lakewarden.erasure_handlers`` entry points (once per
    process unless ``reload``, which first forgets what entry points registered before; handlers
    registered by hand stay). Never raises for a broken one: returns ``{name: why}`` of those
    that did not load, and a required one among them makes :func:`require_handlers` refuse."""
    global _LOADED
    if _LOADED and not reload:
        return dict(_FAILED)
    _FAILED.clear()
    for name in _FROM_ENTRY_POINTS:
        _HANDLERS.pop(name, None)
    _FROM_ENTRY_POINTS.clear()
    for ep in _entry_points():
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure leaves the handler missing (fail closed)
            _HANDLERS.pop(ep.name, None)
            _FAILED[ep.name] = f"entry point {ep.value!r} failed to load: {type(exc).__name__}: {exc}"
            continue
        if not isinstance(obj, ErasureHandler) or obj.name != ep.name:
            _HANDLERS.pop(ep.name, None)
            what = f"handler {obj.name!r}" if isinstance(obj, ErasureHandler) else type(obj).__name__
            _FAILED[ep.name] = f"entry point {ep.value!r} names a {what}, not the ErasureHandler {ep.name!r}"
            continue
        _HANDLERS[obj.name] = obj
        _FROM_ENTRY_POINTS.add(obj.name)
    _LOADED = True
    return dict(_FAILED)


def registered_handlers() -> list[ErasureHandler]:
    """The registered handlers in erase order (entry points not loaded yet are not among them)."""
    return sorted(_HANDLERS.values(), key=lambda h: (h.order, h.name))


def require_handlers() -> list[ErasureHandler]:
    """Load the entry points if not done yet; return every handler in erase order.

    Raises:
        MissingHandlers: a name of :data:`REQUIRED_HANDLERS` is not registered, or registered
            without the capability it is required for (``models`` must check models; the others
            must erase).
    """
    load_handlers()
    missing: dict[str, str] = {}
    for name in REQUIRED_HANDLERS:
        h = _HANDLERS.get(name)
        cap = _REQUIRED_CAPABILITY.get(name, "erase")
        if h is None:
            missing[name] = _FAILED.get(name, f"no entry point {name!r} in group {ENTRY_POINT_GROUP!r}")
        elif getattr(h, cap) is None:
            missing[name] = f"registered without {cap!r}"
    if missing:
        raise MissingHandlers(missing)
    return registered_handlers()


# ----------------------------------------------------------------------------- sealed values

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

