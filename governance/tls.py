"""TLS for servers Lakewarden starts itself: a local certificate authority and the files a server reads.

Recipes, no knobs up front (pyca's ``cryptography`` does the work):

* :meth:`LocalCA.create` makes a CA key and a self-signed CA certificate (ECDSA P-256, short
  validity). The CA key stays in memory unless :meth:`LocalCA.save` writes it (0600).
* :meth:`LocalCA.issue_server` issues a server certificate for loopback (``127.0.0.1``, ``::1``,
  ``localhost`` by default) or any other host names and addresses, signed by the CA.
* :meth:`ServerCertificate.write_pem` writes what Trino's ``http-server.https.keystore.path``
  (and most servers: Jetty, nginx, Go's ``tls.LoadX509KeyPair`` with the same file twice) accepts:
  the private key (PKCS#8, unencrypted) followed by the certificate chain, leaf first.
* :meth:`LocalCA.write_cert` writes the CA certificate alone: what a client trusts
  (``verify=<path>`` in requests and the ``trino`` client, ``--cacert`` in curl).

Every file that holds a private key is written by :func:`write_private`: created with mode 0600
(its new parent folders 0700), replaced atomically, and refused inside a git work tree unless
git ignores the path, so that no key can be committed by accident.

    ca = LocalCA.create("Lakewarden test CA")
    cert = ca.issue_server(["127.0.0.1", "localhost"])
    cert.write_pem(etc / "tls" / "server.pem")   # key + chain, 0600
    ca.write_cert(etc / "tls" / "ca.pem")        # public: clients trust it

Errors: a caller's mistake (an empty host list, a bad validity) is ``ValueError``; a file that
cannot be written, or would land in git, is :class:`TlsError`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.config import ProjectConfig

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
_Clock = Callable[[], dt.datetime]


class TlsError(LakewardenError):
    """A certificate or key file could not be written (or would have been written into git)."""


class PlaintextRefused(LakewardenError):
    """``auth.enabled`` is on and a connection or a server would carry requests without TLS (exit 2:
    the configuration must change, nothing was sent)."""

    exit_code = 2


def refuse_plaintext(config: "ProjectConfig", server: str, where: str, *, hint: str) -> None:
    """Raise :class:`PlaintextRefused` when authentication is on: tokens, passwords and personal data
    then never travel in clear. Callers call it only on their plaintext branch, before connecting or
    listening. With auth off (laptop mode, loopback) plain connections stay allowed."""
    if config.auth.enabled:
        raise PlaintextRefused(f"auth is on, and {server} at {where} would be reached without TLS: refused", hint=hint)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lakewarden"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(h))
    if not names:
        raise ValueError("a server certificate needs at least one host name or address")
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_not_in_git(path: Path) -> None:
    """Refuse a path inside a git work tree that git does not ignore (a key must never be committable)."""
    top = next((d for d in (path.parent, *path.parent.parents) if (d / ".git").exists()), None)
    if top is None:
        return
    try:
        ignored = subprocess.run(["git", "-C", str(top), "check-ignore", "-q", "--no-index", str(path)],
                                 capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ignored = False  # no git to ask: fail closed
    if not ignored:
        raise TlsError(f"refusing to write a private file into the git work tree {top}: {path}",
                       hint="write it into the workspace (.lakewarden/, ignored by git) or another folder outside git")


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` readable by this user only (0600; new parent folders 0700), atomically.

    Raises:
        TlsError: the path is in a git work tree and not ignored by git, or it cannot be written.
    """
    path = Path(path).absolute()
    _check_not_in_git(path)
    try:
        missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
        for d in reversed(missing):
            d.mkdir(mode=0o700, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        raise TlsError(f"cannot write {path}: {exc.strerror}") from None
    return path


@dataclass(frozen=True)
class ServerCertificate:
    """A server's key and certificate, and the CA certificate that signed it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca_cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        """The chain, leaf first (no key): what a server that takes key and chain apart reads."""
        return _cert_pem(self.cert) + _cert_pem(self.ca_cert)

    def write_pem(self, path: Path) -> Path:
        """Write key + chain to one PEM file, mode 0600 (Trino's ``http-server.https.keystore.path``)."""
        return write_private(path, _key_pem(self.key) + self.cert_pem)


class LocalCA:
    """A certificate authority of this machine's own: its key signs server certificates for tests and
    local clusters. Nothing trusts it but the clients that are handed :meth:`write_cert`'s file."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, *, clock: _Clock = _now) -> None:
        self.key = key
        self.cert = cert
        self._clock = clock

    @classmethod
    def create(cls, common_name: str = "Lakewarden local CA", *, valid: dt.timedelta = dt.timedelta(days=30),
               clock: _Clock = _now) -> "LocalCA":
        """A new CA key (ECDSA P-256) and self-signed certificate, valid from now for ``valid``."""
        if valid <= dt.timedelta(0):
            raise ValueError("valid must be a positive duration")
        key = ec.generate_private_key(ec.SECP256R1())
        now = clock()
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + valid)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, clock=clock)

    @classmethod
    def load(cls, key_path: Path, cert_path: Path, *, clock: _Clock = _now) -> "LocalCA":
        """A CA written by :meth:`save`."""
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} does not hold an EC private key")
        return cls(key, x509.load_pem_x509_certificate(Path(cert_path).read_bytes()), clock=clock)

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    def write_cert(self, path: Path) -> Path:
        """Write the CA certificate (public, 0644): the file a client trusts."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return path

    def save(self, key_path: Path, cert_path: Path) -> None:
        """Keep the CA to issue more certificates later: the key 0600 (never into git), the certificate public."""
        write_private(key_path, _key_pem(self.key))
        self.write_cert(cert_path)

    def issue_server(self, hosts: Iterable[str] = LOOPBACK_HOSTS, *, common_name: str | None = None,
                     valid: dt.timedelta = dt.timedelta(days=7)) -> ServerCertificate:
        """A new key and a server certificate for ``hosts`` (IP addresses and DNS names), signed by this CA.

        Raises:
            ValueError: ``hosts`` is empty, or ``valid`` is not positive.
        """
        hosts = list(hosts)
        if valid <= dt.timedelta(0):
            raise ValueError("valid must be a positive duration")
        san = _san(hosts)
        key = ec.generate_private_key(ec.SECP256R1())
        now = self._clock()
        not_after = min(now + valid, self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder().subject_name(_name(common_name or hosts[0])).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return ServerCertificate(key, cert, self.cert)


__all__ = ["LocalCA", "PlaintextRefused", "ServerCertificate", "TlsError", "refuse_plaintext", "write_private", "LOOPBACK_HOSTS"]
