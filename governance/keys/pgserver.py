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

from governance.errors import LakewardenError


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """One PostgreSQL cluster in ``data_dir`` on 127.0.0.1:``port``, database ``lakewarden``."""

    USER = "lakewarden"
    DB = "lakewarden"

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = False) -> None:
        self.base = Path(data_dir).resolve()
        self.durable = durable  # False: fsync=off (tests: a crash may lose the cluster, which is thrown away)
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
    def dsn(self) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{self.DB}"

    def env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def _run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})}, cwd="/")
        if r.returncode:
            raise PostgresError(f"{Path(args[0]).name} failed: {(r.stderr or r.stdout).strip()[-600:]}")
        return r

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
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"), "-o", opts,
                  "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10)
        if fresh:
            self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, self.DB,
                      env=self.env())
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
