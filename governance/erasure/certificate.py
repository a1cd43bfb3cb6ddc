"""Erasure certificates: a signed statement of what an erasure did and verified.

The body is canonical JSON signed with the audit's Ed25519 signing key and written once into
the audit log (action ``requests.certificate``); :func:`verify_certificate` reads it back and
checks the signature against the audit's public key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from governance.erasure.errors import RequestError
from governance.erasure.ledger import RequestStatus, now_utc
from governance.gate import Actor, Resource
from governance.policy import Stage

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = ["Certificate", "verify_certificate"]


@dataclass(frozen=True, slots=True)
class Certificate:
    """A signed statement of what an erasure did and verified. ``body`` is canonical JSON."""

    body: str
    signature: str  # Ed25519, hex, over the body's bytes
    key_id: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()

    @property
    def data(self) -> dict[str, Any]:
        return json.loads(self.body)


def make_certificate(ws: "Workspace", actor: Actor, st: RequestStatus, detail: Mapping[str, Any],
                     subjects: int) -> Certificate:
    """Sign what the request's ledger ``detail`` says it did and verified."""
    from governance.audit import key_id
    from governance.workspace import AUDIT_SIGNING_KEY

    d = detail
    body = {
        "certificate": "lakewarden-erasure/1",
        "request_id": st.request_id,
        "regime": st.regime,
        "filed_at": st.filed_at.isoformat(),
        "due_at": st.due_at.isoformat(),
        "certified_at": now_utc(ws).isoformat(),
        "certified_by": actor.name,
        "subjects": subjects,
        "subject_digests": list(st.subject_digests),
        "policy_digest": ws.policies.digest,
        "done": {
            "rows_deleted": d.get("erased", {}),
            "keys_destroyed": d.get("keys_shredded_total"),
            "history_purged": d.get("purged", {}),
            "purge_now": d.get("purge_now", False),
            "models_flagged": d.get("models_flagged", []),
            "model_actions": d.get("model_actions", {}),
        },
        "verified": d.get("verification", {}),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    sk = Ed25519PrivateKey.from_private_bytes(ws.keyring.system_key(AUDIT_SIGNING_KEY))
    return Certificate(text, sk.sign(text.encode()).hex(), key_id(sk.public_key()))


def write_certificate(ws: "Workspace", actor: Actor, cert: Certificate) -> None:
    """Record the certificate in the audit log, once (a rerun after a crash writes nothing)."""
    rid = cert.data["request_id"]
    if find_certificate(ws, rid) is not None:
        return
    ws.audit.record("requests.certificate", actor=actor.name, outcome="ok", stage=Stage.REQUEST.value,
                    resource=f"request:{rid}",
                    details={"certificate": cert.body, "signature": cert.signature, "key_id": cert.key_id})
    ws.audit.flush()


def find_certificate(ws: "Workspace", request_id: str) -> Certificate | None:
    tbl = ws.audit.query(action="requests.certificate", resource=f"request:{request_id}")
    rows = tbl.to_pylist() if tbl is not None else []
    if not rows:
        return None
    det = json.loads(rows[-1]["details"])
    return Certificate(det["certificate"], det["signature"], det["key_id"])


def verify_certificate(ws: "Workspace", actor: Actor, request_id: str, *,
                       public_key: Ed25519PublicKey | None = None) -> Certificate:
    """Read a request's certificate from the audit log and check its Ed25519 signature.

    The gate decides first (stage ``request`` on ``system:requests``). Uses the audit's public
    key (``<workspace>/audit/public_key.hex``, or the pin in lakewarden.yaml) unless
    ``public_key`` is given.

    Raises:
        AccessDenied: the actor may not read requests.
        RequestError: no certificate for the request, or the signature does not verify.
    """
    ws.gate.enforce(Stage.REQUEST, actor, Resource.system("requests"), {"request_id": request_id})
    cert = find_certificate(ws, request_id)
    if cert is None:
        raise RequestError(f"no certificate for request {request_id!r} in the audit log",
                           hint="a request gets its certificate when it is verified")
    pk = public_key or _audit_public_key(ws)
    try:
        pk.verify(bytes.fromhex(cert.signature), cert.body.encode())
    except (InvalidSignature, ValueError):
        raise RequestError(f"the certificate of request {request_id} does not verify (edited or forged)") from None
    if cert.data.get("request_id") != request_id:
        raise RequestError(f"the certificate found for {request_id} names another request")
    return cert


def _audit_public_key(ws: "Workspace") -> Ed25519PublicKey:
    pinned = ws.config.audit.public_key
    if pinned:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(pinned))
    p = ws.config.workspace_dir / "audit" / "public_key.hex"
    if p.exists():
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(p.read_text().strip()))
    return ws.audit._pk  # type: ignore[return-value]
