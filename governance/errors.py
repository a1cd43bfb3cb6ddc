"""Errors raised by the governance kernel.

Every error a user can cause is a subclass of :class:`LakewardenError`; the CLI
prints its message on one line and exits non-zero, without a traceback.

::

    LakewardenError
    ├── UsageError             a verb called with arguments that cannot go together
    ├── ConfigError            bad lakewarden.yaml (names file, field, problem)
    │   └── PolicyError        bad policies/*.yaml
    ├── AccessDenied           the policy gate said no (carries the Decision)
    ├── AuditError             the audit log cannot be written or read
    │   └── AuditTampered      verification found an edited/missing/extra event
    ├── KeyManagementError     key store or KEK problems
    │   ├── KekUnavailable     the KEK cannot be loaded (env var unset, file missing)
    │   ├── SubjectShredded    the subject's key was destroyed (crypto-shredded)
    │   └── DecryptionError    ciphertext is invalid, tampered or bound elsewhere
    └── LineageError           lineage events cannot be written or read
"""

from __future__ import annotations

from typing import Any


class LakewardenError(Exception):
    """Base of every error the system raises on purpose.

    ``exit_code`` is what the CLI exits with; ``hint`` is an optional
    sentence telling the user what to do next.
    """

    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = context

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(LakewardenError):
    """A verb was called with arguments that do not make sense together (exit 2, like a usage error)."""

    exit_code = 2


class ConfigError(LakewardenError):
    """A configuration file is missing, unparsable or invalid.

    Attributes: ``path`` (the file), ``field`` (dotted location, may be empty),
    ``line`` (1-based line number when known).
    """

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        field: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        where = path or "<config>"
        if line is not None:
            where = f"{where}:{line}"
        prefix = f"{where}: " + (f"{field}: " if field else "")
        super().__init__(prefix + message, hint=hint)
        self.path = path
        self.field = field
        self.line = line
        self.problem = message


class PolicyError(ConfigError):
    """A policy file is invalid or inconsistent."""


class AccessDenied(LakewardenError):
    """The policy gate denied an action; ``decision`` holds the reasons and rule ids."""

    exit_code = 3

    def __init__(self, decision: Any) -> None:
        rules = ", ".join(decision.rule_ids) or "default-deny"
        reasons = "; ".join(decision.reasons) or "no rule allows it"
        super().__init__(f"denied by policy rule {rules}: {reasons}")
        self.decision = decision


class AuditError(LakewardenError):
    """The audit log could not be written or read."""


class AuditTampered(AuditError):
    """Verification failed; ``seq`` is the first bad event (or None), ``kind`` the finding."""

    exit_code = 4

    def __init__(self, message: str, *, seq: int | None, kind: str) -> None:
        super().__init__(message)
        self.seq = seq
        self.kind = kind


class KeyManagementError(LakewardenError):
    """The key store or the KEK could not be used."""


class KekUnavailable(KeyManagementError):
    """The key-encryption key cannot be loaded."""

    exit_code = 2


class SubjectShredded(KeyManagementError):
    """The subject's data key was destroyed: its ciphertexts are unreadable for good."""


class DecryptionError(KeyManagementError):
    """A ciphertext failed authentication (wrong key, wrong binding, or tampered).

    Deliberately opaque, like ``cryptography.fernet.InvalidToken``.
    """


class LineageError(LakewardenError):
    """Lineage events could not be written or read."""
