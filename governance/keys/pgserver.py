"""A throw-away PostgreSQL server on loopback, from Debian's ``postgresql`` package, for the tests
and a laptop trying the shared key store (``keys.store: postgresql://...``).

    pg = LocalPostgres(Path(".lakewarden/pg")).start()   # initdb on first use, then pg_ctl start
    os.environ.update(pg.env())                          # PGPASSWORD: never in the DSN or a file of ours
    dsn = pg.dsn                                         # postgresql://lakewarden@127.0.0.1:PORT/lakewarden
    ...
    pg.stop()

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` system user the
package creates (through ``runuser``), in a folder it owns (under the system temp folder when a
folder above ``data_dir`` lets no other user through). Password authentication
(SCRAM-SHA-256) on 127.0.0.1 only; the password is made at start and handed out by :meth:`env`.

With ``tls=`` (a :class:`~governance.tls.ServerCertificate`, e.g. from ``LocalCA.issue_server``)
the server speaks TLS only (issue #19)::

    ca = LocalCA.create()
    pg = LocalPostgres(folder, tls=ca.issue_server(["127.0.0.1"])).start()
    pg.dsn    # postgresql://lakewarden@127.0.0.1:PORT/lakewarden?sslmode=verify-full&sslrootcert=<folder>/ca.pem

Its key (``server.key``, 0600, the server's user's), its chain (``server.crt``) and the CA
certificate clients trust (``ca.pem``) lie in its folder; ``ssl=on`` and the file names are passed
to the server (paths only: no key or password in any argument), and ``pg_hba.conf`` accepts only
``hostssl`` with SCRAM-SHA-256 on 127.0.0.1: a connection without TLS is rejected (``hostnossl
... reject``).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.tls import ServerCertificate


class PostgresError(LakewardenError):
    """The local PostgreSQL server could not be found, initialised or started."""


def bindir() -> Path:
    """The newest installed PostgreSQL's programs (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresError("PostgreSQL is not installed (Debian: apt-get install postgresql)")


def _reachable_by_others(folder: Path) -> bool:
    """Whether every folder from the root down to ``folder`` lets other users through (o+x)."""
    p = folder.resolve()
    while True:
        try:
            if not p.stat().st_mode & 0o001:
                return False
        except FileNotFoundError:
            pass  # created later, with the default mode
        if p.parent == p:
            return True
        p = p.parent


# pg_hba.conf with TLS on: every TCP connection must be TLS (and SCRAM-SHA-256) from loopback; the
# Unix socket (in the server's own 0700 folder) keeps password authentication
_HBA_TLS = """\
# written by Lakewarden (LocalPostgres, tls=...): TLS only on TCP
local     all  all                scram-sha-256
hostnossl all  all  0.0.0.0/0     reject
hostnossl all  all  ::/0          reject
hostssl   all  all  127.0.0.1/32  scram-sha-256
"""
# what initdb --auth-host=scram-sha-256 --auth-local=scram-sha-256 allows: restored when a cluster
# that ran with TLS is started without it
_HBA_PLAIN = """\
local   all  all                scram-sha-256
host    all  all  127.0.0.1/32  scram-sha-256
host    all  all  ::1/128       scram-sha-256
local   replication  all                scram-sha-256
host    replication  all  127.0.0.1/32  scram-sha-256
host    replication  all  ::1/128       scram-sha-256
"""
_HBA_MARK = "# written by Lakewarden (LocalPostgres, tls=...)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One PostgreSQL cluster in ``data_dir`` on 127.0.0.1:``port``, database ``lakewarden``.

    Args:
        data_dir: the cluster's folder (made on first start).
        port: the TCP port on 127.0.0.1 (default: a free one).
        durable: False (the default) runs with ``fsync=off``: a crash may lose a throw-away cluster.
        tls: the server's certificate and key: TLS only, see the module's docstring. None: plain
            TCP (SCRAM-SHA-256 on loopback), as a laptop's throw-away server.
    """

    USER = "lakewarden"
    DB = "lakewarden"

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = False,
                 tls: "ServerCertificate | None" = None) -> None:
        self.base = Path(data_dir).resolve()
        self.durable = durable  # False: fsync=off (tests: a crash may lose the cluster, which is thrown away)
        self.tls = tls
        self.port = port or _free_port()
        self.password = secrets.token_urlsafe(24)
        self.bin = bindir()
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresError("running as root needs the 'postgres' system user (Debian's postgresql package)") from None
            self._as = ["runuser", "-u", "postgres", "--"]
            if not _reachable_by_others(self.base.parent):
                # a root-only folder above it (pytest's, a home) would lock the server out of its
                # own files: keep the cluster in a folder of its own under the system temp folder
                self.base = Path(tempfile.mkdtemp(prefix="lakewarden-pg-"))

    @property
    def data(self) -> Path:
        """The cluster's files (heap, WAL): what a test searches for residual key bytes."""
        return self.base / "data"

    @property
    def ca_file(self) -> Path | None:
        """The CA certificate a client trusts (``sslrootcert``), or None without TLS."""
        return self.base / "ca.pem" if self.tls is not None else None

    @property
    def dsn(self) -> str:
        """The DSN of database ``lakewarden``: with TLS, ``sslmode=verify-full`` and ``sslrootcert``."""
        return self.dsn_for(self.DB)

    def dsn_for(self, database: str) -> str:
        """The DSN of another database on this server, with the same TLS parameters as :attr:`dsn`."""
        dsn = f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"
        if self.ca_file is not None:
            dsn += f"?sslmode=verify-full&sslrootcert={quote(str(self.ca_file), safe='/')}"
        return dsn

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def _run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})}, cwd="/")
        if r.returncode:
            raise PostgresError(f"{Path(args[0]).name} failed: {(r.stderr or r.stdout).strip()[-600:]}")
        return r

    def _own(self, path: Path, mode: int) -> None:
        """Give ``path`` to the server's user (as root: ``postgres``) with ``mode``."""
        if self._as:
            shutil.chown(path, "postgres")
        os.chmod(path, mode)

    def _write_tls(self) -> list[str]:
        """Write the key (0600, the server's user's), the chain and the CA certificate; return the
        server's ``-c`` options (file names only) and make ``pg_hba.conf`` TLS-only."""
        from cryptography.hazmat.primitives import serialization

        from governance.tls import write_private

        assert self.tls is not None
        key_pem = self.tls.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        key = write_private(self.base / "server.key", key_pem)
        self._own(key, 0o600)  # PostgreSQL refuses a key others may read
        crt = self.base / "server.crt"
        crt.write_bytes(self.tls.cert_pem)
        self._own(crt, 0o644)
        ca = self.base / "ca.pem"
        ca.write_bytes(self.tls.ca_cert.public_bytes(serialization.Encoding.PEM))
        self._own(ca, 0o644)
        self._write_hba(_HBA_TLS)
        return ["-c ssl=on", f"-c ssl_cert_file={crt}", f"-c ssl_key_file={key}"]

    def _write_hba(self, text: str) -> None:
        hba = self.data / "pg_hba.conf"
        hba.write_text(text)
        self._own(hba, 0o600)

    def start(self, *, timeout: float = 60) -> "LocalPostgres":
        self.base.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.base, "postgres")
        os.chmod(self.base, 0o700)
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            pwfile = self.base / "pw"
            pwfile.write_text(self.password + "\n")
            if self._as:
                shutil.chown(pwfile, "postgres")
            os.chmod(pwfile, 0o600)
            try:
                self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER, f"--pwfile={pwfile}",
                          "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-sync")
            finally:
                pwfile.unlink(missing_ok=True)
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.base}"
        if not self.durable:
            opts += " -c fsync=off"
        if self.tls is not None:
            opts += " " + " ".join(self._write_tls())
        elif (self.data / "pg_hba.conf").exists() and _HBA_MARK in (self.data / "pg_hba.conf").read_text():
            self._write_hba(_HBA_PLAIN)  # this cluster ran with TLS before: plain TCP again, as initdb made it
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", opts,
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        if fresh:
            tls_env = {"PGSSLMODE": "require"} if self.tls is not None else {}  # the TLS-only pg_hba.conf: never plain
            self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, self.DB,
                      env={**self.env(), **tls_env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                               capture_output=True)
            if r.returncode == 0:
                return self
            time.sleep(0.2)
        raise PostgresError(f"PostgreSQL did not answer on port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            except PostgresError:
                pass

    def remove(self) -> None:
        """Stop the server and delete its files."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
