"""The workspace: one object that opens configuration, policies, keys, audit, gate and lineage.

Every stage and every CLI command starts here::

    with Workspace.open() as ws:                      # finds lakewarden.yaml
        ws.gate.enforce("ingest", ws.actor(), Resource.dataset("customers"))
        ...

Parts are opened lazily, so a command that only reads policies never needs the
key-encryption key. ``close()`` flushes the audit log; use the context manager.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from governance.config import ProjectConfig, load_config
from governance.errors import AuditError
from governance.gate import Actor, Gate
from governance.keys import KeyRing, KeyStore, load_kek
from governance.keys.pgstore import is_dsn
from governance.policy import PolicySet, load_policies

if TYPE_CHECKING:
    from governance.audit import AuditLog
    from governance.lineage import LineageStore

USER_ENV = "LAKEWARDEN_USER"
AUDIT_SIGNING_KEY = "audit-signing"


class Workspace:
    """Configuration plus the governance services built from it."""

    def __init__(self, config: ProjectConfig, *, clock: Callable[[], datetime] | None = None) -> None:
        self.config = config
        self._clock = clock

    def now(self) -> datetime:
        """The workspace's clock (injected by tests), in UTC; the real time when none was given."""
        return (self._clock() if self._clock else datetime.now(timezone.utc)).astimezone(timezone.utc)

    @classmethod
    def open(cls, config_path: str | Path | None = None, **kwargs: object) -> "Workspace":
        return cls(load_config(config_path), **kwargs)  # type: ignore[arg-type]

    # -- parts ------------------------------------------------------------------------
    @cached_property
    def policies(self) -> PolicySet:
        return load_policies(self.config.policy_files())

    @cached_property
    def keyring(self) -> KeyRing:
        store = self.config.keys.store
        if is_dsn(store):  # with auth on, a key store reached without verified TLS: refused before the KEK is read
            from governance.keys.pgstore import refuse_unverified

            refuse_unverified(store, self.config)
        k = self.config.keys.kek
        kek = load_kek(k.provider, var=k.var, path=k.path, factory=k.factory, options=k.options, base_dir=self.config.base_dir)
        if is_dsn(store):  # a PostgreSQL database a cluster's workers share
            from governance.keys.pgstore import PgKeyStore

            return KeyRing(PgKeyStore(store, kek, config=self.config))
        return KeyRing(KeyStore(self.config.path(store), kek))

    @cached_property
    def audit(self) -> "AuditLog":
        # Imported here: the audit log needs pyarrow and deltalake, which a command that only
        # reads (``models list``, ``policy check``) should not pay for at start.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from governance.audit import AuditLog
        from governance.objectstore import check_root
        from governance.witness import witness_for

        check_root(self.config.table_uri("x")[:-2])  # a bucket that is not there: named, before any write
        sk = Ed25519PrivateKey.from_private_bytes(self.keyring.system_key(AUDIT_SIGNING_KEY))
        pinned = self.config.audit.public_key
        if pinned and pinned.lower() != sk.public_key().public_bytes_raw().hex():
            raise AuditError(
                "the audit signing key does not match audit.public_key in lakewarden.yaml",
                hint="the key store was replaced or the pin is stale",
            )
        state = self.config.workspace_dir / "audit"
        state.mkdir(parents=True, exist_ok=True)
        (state / "public_key.hex").write_text(sk.public_key().public_bytes_raw().hex() + "\n")
        return AuditLog(
            self.config.table_uri(self.config.audit.table),
            self.config.table_uri(self.config.audit.checkpoints_table),
            state,
            signing_key=sk,
            checkpoint_every=self.config.audit.checkpoint_every,
            flush_every=self.config.audit.flush_every,
            flush_interval=self.config.audit.flush_interval,
            storage_options=self.config.storage.options,
            clock=self._clock,
            witness=witness_for(self.config),  # every flush publishes its head there (None: not configured)
        )

    @property
    def audit_key_id(self) -> str:
        from governance.audit import key_id

        return key_id(self.audit._pk)  # type: ignore[arg-type]

    @cached_property
    def gate(self) -> Gate:
        return Gate(self.policies, audit=self.audit, repeat_window=self.config.audit.repeat_window, clock=self._clock)

    @cached_property
    def lineage(self) -> "LineageStore":
        from governance.lineage import LineageStore  # openlineage takes ~0.3 s to import: only when used

        return LineageStore(
            self.config.table_uri(self.config.lineage.table),
            namespace=self.config.lineage.namespace,
            repo_dir=str(self.config.base_dir),
        )

    def actor(self, name: str | None = None) -> Actor:
        """The acting user in laptop mode: ``name``, else $LAKEWARDEN_USER, else the OS user; roles from
        the policy. A name is a claim, so with ``auth.enabled`` there is none to make: the actor is a
        :class:`~governance.authn.VerifiedActor` from a token (``Authenticator.actor``, ``lakewarden
        login``), or a process's own :meth:`service_actor`.

        Raises:
            ClaimRefused: ``auth.enabled`` is on.
        """
        if self.config.auth.enabled:
            from governance.tokens import ClaimRefused

            raise ClaimRefused(
                f"auth is on: an actor is not made from a name ({name or 'the environment'}); it comes from a "
                "verified token (lakewarden login; Authenticator.actor), or is the process's own service identity "
                "(Workspace.service_actor)")
        user = name or os.environ.get(USER_ENV) or getpass.getuser()
        return Actor(user, self.policies.roles_of(user))

    def service_actor(self, name: str | None = None) -> Actor:
        """The identity of a process nobody logs in to (a deployed predictor, a pipeline runner):
        ``name``, else $LAKEWARDEN_USER. With ``auth.enabled`` it is a
        :class:`~governance.authn.ServiceActor` (the operator who set the process's environment
        vouches for it; its roles from ``principals:``), and a name must be given one way or the
        other (never the OS user); without auth it is :meth:`actor`'s claim.

        Raises:
            ClaimRefused: auth is on and no name is given.
        """
        if not self.config.auth.enabled:
            return self.actor(name)
        user = name or os.environ.get(USER_ENV)
        if not user:
            from governance.tokens import ClaimRefused

            raise ClaimRefused(f"auth is on: a service identity needs a name (set {USER_ENV} to the service principal)")
        from governance.authn import service_actor

        return service_actor(user, self.policies.roles_of(user))

    # -- lifecycle --------------------------------------------------------------------
    def close(self) -> None:
        if "gate" in self.__dict__:
            self.gate.close()  # the counts of repeated decisions, before the audit log's last flush
        if "audit" in self.__dict__:
            self.audit.close()
        if "keyring" in self.__dict__:
            self.keyring.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
