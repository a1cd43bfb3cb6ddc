"""Erasure and access requests: everything that finds, deletes, shreds, scans and certifies a
subject's data, as durable, resumable state machines.

A request is filed by a compliance officer naming subjects by their plaintext ids. The ids
are resolved at once to pseudonymous tokens through the key store's blind index and never
written anywhere: what must survive a crash is sealed (:mod:`~governance.erasure.probe`) and
destroyed when the request is done. Erasure steps (states after each)::

    filed → models_checked → erased → shredded → awaiting_purge → purged → verified
          → certified → done          (verification_failed: findings; run again after fixing)

Access steps::

    filed → exported → done

Modules: :mod:`~governance.erasure.handlers` (the registry of the layers' handlers, loaded
from the ``lakewarden.erasure_handlers`` entry points; :data:`REQUIRED_HANDLERS`),
:mod:`~governance.erasure.ledger` (the request ledger, deadlines and SLA),
:mod:`~governance.erasure.workflow` (file, run, run pending),
:mod:`~governance.erasure.access` (the export), :mod:`~governance.erasure.scan` (the residual
scan), :mod:`~governance.erasure.certificate` (signed certificates).

Every verb takes the actor and asks the gate first (stage ``request``, kernel rule
``builtin/requests``), which audits its decision; a request refuses to start without every
required handler. Errors::

    LakewardenError
    ├── AccessDenied               the gate said no (exit 3), before anything is read
    └── RequestError               bad input, unknown request or subject (exit 2)
        └── MissingHandlers        a required handler is missing: ``.missing`` = {name: why}

Example (the CLI's ``lakewarden requests erase --subject C-1``)::

    st = file_request(ws, officer, "erase", ["C-1"])
    st = run_request(ws, officer, st.request_id, purge_now=True)
    cert = verify_certificate(ws, officer, st.request_id)
"""

from governance.erasure.access import export_value
from governance.erasure.certificate import Certificate, verify_certificate
from governance.erasure.errors import MissingHandlers, RequestError
from governance.erasure.handlers import (
    ENTRY_POINT_GROUP, REQUIRED_HANDLERS, SEALED_SHREDDED, SEALED_UNREADABLE, AccessItem, ErasureContext,
    ErasureHandler, load_handlers, open_sealed, register_handler, registered_handlers, require_handlers,
    unregister_handler,
)
from governance.erasure.ledger import RequestStatus, due_date, subject_digest
from governance.erasure.scan import Finding, Needles, ScanReport, scan
from governance.erasure.workflow import (
    CRASH_ENV, file_request, list_requests, request_status, run_pending, run_request,
)

__all__ = [
    "CRASH_ENV", "ENTRY_POINT_GROUP", "REQUIRED_HANDLERS", "SEALED_SHREDDED", "SEALED_UNREADABLE",
    "AccessItem", "Certificate", "ErasureContext", "ErasureHandler", "Finding", "MissingHandlers", "Needles",
    "RequestError", "RequestStatus", "ScanReport",
    "due_date", "export_value", "file_request", "list_requests", "load_handlers", "open_sealed", "register_handler",
    "registered_handlers", "request_status", "require_handlers", "run_pending", "run_request", "scan",
    "subject_digest", "unregister_handler", "verify_certificate",
]
