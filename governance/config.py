"""Project configuration: ``lakewarden.yaml``.

Where tables live, where keys, audit and lineage are kept, how to reach Trino,
and which policy files apply. Relative paths are resolved against the folder
that holds the configuration file.

Example::

    version: 1
    name: demo
    storage:
      root: .lakewarden/tables          # or s3://bucket/prefix (credentials from AWS_* variables)
    keys:
      store: .lakewarden/keys/keystore.db
      kek: {provider: file, path: .lakewarden/secrets/kek.key}
    policies: [policies/*.yaml]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from governance._files import validate_file
from governance.errors import ConfigError

CONFIG_FILENAME = "lakewarden.yaml"
CONFIG_ENV = "LAKEWARDEN_CONFIG"
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class KekConfig(_Strict):
    """Where the key-encryption key comes from. It is never written unwrapped by Lakewarden."""

    provider: Literal["env", "file", "plugin"]
    var: str | None = None
    path: str | None = None
    factory: str | None = Field(default=None, description="'package.module:callable' returning a KeyEncryptionKey")
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs(self) -> "KekConfig":
        need = {"env": "var", "file": "path", "plugin": "factory"}[self.provider]
        if not getattr(self, need):
            raise ValueError(f"provider '{self.provider}' needs the field '{need}'")
        if self.factory and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.factory):
            raise ValueError(f"factory must look like 'package.module:callable' (got {self.factory!r})")
        return self


class KeysConfig(_Strict):
    store: str = Field(default=".lakewarden/keys/keystore.db",
                       description="an SQLite file (the laptop default), or postgresql://user@host:port/db for a key "
                                   "store a cluster shares (password from PGPASSWORD or ~/.pgpass, never here)")
    kek: KekConfig = KekConfig(provider="file", path=".lakewarden/secrets/kek.key")

    @field_validator("store")
    @classmethod
    def _no_password(cls, v: str) -> str:
        problem = dsn_problem(v) if _URI.match(v) else None
        if problem:
            raise ValueError(problem)
        return v


def dsn_problem(dsn: str) -> str | None:
    """What is wrong with a key store URI, or None: a password in it (the config is no place for
    secrets; ``sslpassword``, a client key's passphrase, neither), an ``sslmode`` libpq does not
    know, no database name, or a scheme other than ``postgresql://``. TLS parameters
    (``sslmode=verify-full&sslrootcert=/path/ca.pem``) are accepted."""
    from urllib.parse import parse_qs, urlparse

    u = urlparse(dsn)
    if u.scheme.lower() not in ("postgresql", "postgres"):
        return f"key store {u.scheme}:// is not supported: an SQLite file path or postgresql://"
    query = parse_qs(u.query)
    if u.password is not None or {k.lower() for k in query} & {"password", "sslpassword"}:
        return ("the key store DSN holds a password: a config file is not a place for secrets. "
                "Set PGPASSWORD in the environment or use ~/.pgpass")
    modes = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    bad = [m for m in query.get("sslmode", []) if m not in modes]
    if bad:
        return f"the key store DSN's sslmode={bad[0]!r} is not one of {', '.join(modes)} (verify-full checks the server)"
    if not u.path.strip("/"):
        return "the key store DSN names no database (postgresql://user@host:port/DBNAME)"
    return None


_SECRET_OPTION = re.compile(r"secret|password|token|access_key|key_id|credential|sas_key|account_key", re.IGNORECASE)


class StorageConfig(_Strict):
    root: str = Field(default=".lakewarden/tables",
                      description="a folder, or s3://bucket/prefix on an S3-compatible store (endpoint and "
                                  "credentials from the AWS_* environment variables)")
    options: dict[str, str] = Field(default_factory=dict, description="storage_options passed to deltalake "
                                    "(never credentials: those come from the environment)")
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"

    @field_validator("root")
    @classmethod
    def _scheme(cls, v: str) -> str:
        m = _URI.match(v)
        if m and m.group(0).lower() not in ("s3://", "s3a://", "file://"):
            raise ValueError(
                f"storage root {v!r}: Lakewarden supports a local folder or an S3-compatible store (s3://bucket/prefix)"
            )
        return v

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted(k for k in v if _SECRET_OPTION.search(k))
        if bad:
            raise ValueError(
                f"storage.options holds credentials ({', '.join(bad)}): a config file is not a place for secrets. "
                "Set them in the environment instead (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)"
            )
        return v


class AuditConfig(_Strict):
    table: str = "_audit/events"
    checkpoints_table: str = "_audit/checkpoints"
    checkpoint_every: int = Field(default=1000, ge=1, le=1_000_000)
    flush_every: int = Field(default=10_000, ge=1, le=10_000_000)
    flush_interval: float = Field(
        default=5.0, ge=0, le=3600,
        description="seconds a buffered event may wait before a background thread writes it (0: only at "
                    "flush_every, after a deny and at exit); bounds what a SIGKILL of a long-running process loses",
    )
    repeat_window: float = Field(
        default=1.0, ge=0, le=3600,
        description="seconds a run of identical allow decisions on a hot path (online lookups) is counted "
                    "under its first audited decision before its count is written (0: audit each one)",
    )
    public_key: str | None = Field(default=None, description="pinned Ed25519 public key (hex); verify refuses others")
    witness: str | None = Field(
        default=None,
        description="s3://bucket/prefix on a bucket created with S3 Object Lock: every flush publishes its signed "
                    "head there under COMPLIANCE retention, and `audit verify --witness` compares the log with it "
                    "(off by default; endpoint and credentials from the AWS_* environment variables, never here)",
    )
    witness_retention_days: int = Field(default=365, ge=1, le=36_500,
                                        description="how long the witness keeps each head beyond anyone's reach")

    @field_validator("witness")
    @classmethod
    def _witness_uri(cls, v: str | None) -> str | None:
        from governance.witness import witness_uri_problem

        problem = witness_uri_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v


class LineageConfig(_Strict):
    table: str = "_lineage/events"
    namespace: str = "lakewarden"


class TrinoConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    catalog: str = "delta_lake"
    schema_: str = Field(default="lakewarden", alias="schema")
    http_scheme: Literal["http", "https"] = "http"
    verify: bool | str = True


class OnlineStoreConfig(_Strict):
    """Feast's online store. Redis: ``connection_string`` in Feast's format (``host:port,db=1,ssl=true,
    ssl_ca_certs=ca.pem``), never with a password: that comes from $LAKEWARDEN_REDIS_PASSWORD
    (features/online.py adds it in memory)."""

    type: Literal["sqlite", "redis"] = "sqlite"
    path: str = ".lakewarden/feast/online.db"
    connection_string: str = Field(
        default="127.0.0.1:6379",
        description="Redis as host:port,param=value,... (Feast's format, passed to redis.Redis): ssl=true, "
                    "ssl_ca_certs=<CA file>, db=N, username=...; the password from $LAKEWARDEN_REDIS_PASSWORD, "
                    "never here; with auth.enabled only verified TLS is accepted",
    )

    @field_validator("connection_string")
    @classmethod
    def _no_secrets(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",")]
        bad = sorted({p.split("=", 1)[0] for p in parts if "=" in p and "password" in p.split("=", 1)[0].lower()})
        if any("@" in p for p in parts if "=" not in p):
            bad.append("user:password@host")
        if bad:
            raise ValueError(
                f"features.online.connection_string holds a secret ({', '.join(bad)}): a config file is not a place "
                "for secrets. Set LAKEWARDEN_REDIS_PASSWORD in the environment instead (the value is not shown here)"
            )
        return v


class FeaturesConfig(_Strict):
    """The Feast feature store: embedded default (Delta via deltalake + SQLite), or Redis online."""

    project: str = Field(default="lakewarden", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    registry: str = ".lakewarden/feast/registry.db"
    online: OnlineStoreConfig = OnlineStoreConfig()
    offline: Literal["delta", "trino"] = Field(
        default="delta", description="delta: deltalake + DuckDB in process; trino: the Trino server (trino.*)"
    )


class RequestsConfig(_Strict):
    """Compliance requests: the legal regime a request falls under unless the officer names one."""

    regime: Literal["gdpr", "ccpa"] = "gdpr"
    due_soon_days: int = Field(default=7, ge=0, le=60, description="an open request this close to its deadline is 'due soon'")


class StreamingConfig(_Strict):
    """Kafka for ``lakewarden stream``: the brokers, client options, and the brokers' log folders
    the erasure scanner reads (the broker keeps its own copy of every record)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    options: dict[str, str] = Field(
        default_factory=dict,
        description="librdkafka client options (security.protocol, ssl.ca.location, ...); passwords come from "
                    "the environment (LAKEWARDEN_KAFKA_<OPTION>, dots as underscores), never from this file",
    )
    log_dirs: list[str] = Field(
        default_factory=list,
        description="the brokers' log.dirs as this machine sees them (a mount); the scanner decodes their segments",
    )


class ServingConfig(_Strict):
    """The predictor (``lakewarden serve``): HTTPS when a certificate is given. With ``auth.enabled``
    it must be: bearer tokens are not sent in clear, so the server refuses to start without one."""

    tls_cert: str | None = Field(default=None, description="PEM certificate chain the predictor serves (leaf first)")
    tls_key: str | None = Field(default=None, description="its PEM private key (a file readable by its owner only)")
    tls_ca: str | None = Field(default=None, description="the CA file clients of the predictor trust (deploy's "
                               "health probe; default: the system's trust store)")

    @model_validator(mode="after")
    def _pair(self) -> "ServingConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("serving.tls_cert and serving.tls_key go together: give both or neither")
        return self


class AuthConfig(_Strict):
    """Bearer-token authentication (governance/authn.py): an OIDC issuer whose signed tokens name the
    caller and, in ``groups_claim``, the policy roles it holds. Off by default; nothing secret here."""

    enabled: bool = False
    issuer: str | None = Field(default=None, description="the OIDC issuer URL (the tokens' iss), e.g. https://idp.example/realms/lakewarden")
    audience: str = Field(default="lakewarden-predictor", description="the aud a token must carry")
    groups_claim: str = "groups"
    username_claim: str = "preferred_username"
    jwks_url: str | None = Field(default=None, description="default: jwks_uri of the issuer's discovery document")
    leeway_seconds: int = Field(default=30, ge=0, le=300, description="clock skew tolerated on exp/nbf/iat")
    cli_client: str = Field(
        default="lakewarden-cli", min_length=1,
        description="the OAuth client `lakewarden login` asks for (device flow) and refreshes with; a cached "
                    "CLI token whose azp names another client is refused. $LAKEWARDEN_AUTH_CLIENT, when set, "
                    "takes precedence over this field, which takes precedence over the default lakewarden-cli")

    @model_validator(mode="after")
    def _issuer(self) -> "AuthConfig":
        from urllib.parse import urlparse

        if self.enabled and not self.issuer:
            raise ValueError("auth.enabled needs auth.issuer (the identity provider's issuer URL)")
        for name, url in (("issuer", self.issuer), ("jwks_url", self.jwks_url)):
            if url is None:
                continue
            u = urlparse(url)
            if u.scheme != "https" and not (u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost", "::1")):
                raise ValueError(f"auth.{name} must be https (plain http only on loopback): {url}")
        return self


class ProjectConfig(_Strict):
    version: Literal[1] = 1
    name: str = Field(default="lakewarden", pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    workspace: str = ".lakewarden"
    storage: StorageConfig = StorageConfig()
    keys: KeysConfig = KeysConfig()
    audit: AuditConfig = AuditConfig()
    lineage: LineageConfig = LineageConfig()
    trino: TrinoConfig = TrinoConfig()
    features: FeaturesConfig = FeaturesConfig()
    requests: RequestsConfig = RequestsConfig()
    streaming: StreamingConfig = StreamingConfig()
    auth: AuthConfig = AuthConfig()
    serving: ServingConfig = ServingConfig()
    policies: list[str] = Field(default_factory=lambda: ["policies/*.yaml"], min_length=1)

    # Set by load_config: the file itself, and the folder relative paths are resolved against.
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("policies")
    @classmethod
    def _globs(cls, v: list[str]) -> list[str]:
        for g in v:
            if not g.strip():
                raise ValueError("policy paths must not be empty")
        return v

    def path(self, value: str) -> Path:
        """Resolve a configured local path against the configuration's folder."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def workspace_dir(self) -> Path:
        return self.path(self.workspace)

    def table_uri(self, name: str) -> str:
        """URI of a table under the storage root (``name`` like ``silver/customers``)."""
        root = self.storage.root
        if _URI.match(root) and not root.startswith("file://"):
            return root.rstrip("/") + "/" + name
        if root.startswith("file://"):
            root = root[len("file://") :]
        return str(self.path(root) / name)

    def policy_files(self) -> list[Path]:
        files: list[Path] = []
        for pattern in self.policies:
            p = Path(pattern)
            if p.is_absolute():
                matches = sorted(Path(p.anchor).glob(str(p.relative_to(p.anchor))))
            else:
                matches = sorted(self.base_dir.glob(pattern))
            if not matches and not any(c in pattern for c in "*?["):
                raise ConfigError(
                    f"policy file not found: {pattern}", path=str(self.source or self.base_dir / CONFIG_FILENAME), field="policies"
                )
            files.extend(m for m in matches if m.is_file())
        seen: set[Path] = set()
        return [f for f in files if not (f in seen or seen.add(f))]


def find_config(start: Path | None = None) -> Path | None:
    """The configuration file: $LAKEWARDEN_CONFIG, else lakewarden.yaml here or in a parent folder."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        candidate = d / CONFIG_FILENAME
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | Path | None = None) -> ProjectConfig:
    """Load and validate the configuration.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid; the message names
            the file, the field, the line and what is wrong.
    """
    cfg_path = Path(path) if path is not None else find_config()
    if cfg_path is None:
        raise ConfigError(
            f"no {CONFIG_FILENAME} found here or in any parent folder",
            hint="run `lakewarden init` to create one, or set LAKEWARDEN_CONFIG",
        )
    cfg = validate_file(ProjectConfig, cfg_path)
    return cfg.model_copy(update={"base_dir": cfg_path.resolve().parent, "source": cfg_path})
