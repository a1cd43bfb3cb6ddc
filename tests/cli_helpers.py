"""Running the ``lakewarden`` command as a user would: in this process (``lw_in``) or in a subprocess (``lw``).

``lw_in`` is what most tests use: it calls ``lakewarden.cli.main``, the function the installed
command runs (user errors become one line and an exit code, bugs a crash file), without paying for
a fresh interpreter that imports Feast and torch again. ``lw`` stays for what only a real process
shows: the status through the installed entry point, the warnings hook ``lakewarden.cli.run``
installs, what a start imports, how a process ends.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_CRASH = re.compile(r"\(a bug; the traceback is in (.+?)\)\s*$", re.M)


def _env_for(user: str | None, env: dict | None) -> dict[str, str]:
    """This process's environment less its LAKEWARDEN_* variables, plus ``env`` and the user."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_")}
    e.update(env or {})
    if user:
        e["LAKEWARDEN_USER"] = user
    return e


def _no_traceback(p: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in p.stdout + p.stderr, p.stderr


def lw(cwd: Path, *args: str, user: str | None = None, env: dict | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m lakewarden ARGS`` in ``cwd``, as ``user``, with none of the caller's LAKEWARDEN_* variables.

    A traceback in the output fails the test: user mistakes must end in one clear line.
    """
    p = subprocess.run([sys.executable, "-m", "lakewarden", *args], cwd=cwd, env=_env_for(user, env),
                       capture_output=True, text=True, timeout=timeout)
    _no_traceback(p)
    return p


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` is exactly ``values`` inside, and exactly what it was after."""
    saved = dict(os.environ)
    try:
        for k in [k for k in os.environ if k not in values]:
            del os.environ[k]
        os.environ.update(values)
        yield
    finally:
        for k in [k for k in os.environ if k not in saved]:
            del os.environ[k]
        os.environ.update(saved)


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def lw_in(cwd: Path, *args: str, user: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``lakewarden ARGS`` through ``lakewarden.cli.main`` in this process, as ``lw`` would run it.

    In ``cwd``, as ``user``, with none of the caller's LAKEWARDEN_* variables (the environment,
    the working folder, stdin/stdout/stderr and ``sys.excepthook`` are restored after). The output
    is what the command printed (rich's consoles write to ``sys.stdout``/``sys.stderr`` as they
    print); ``SystemExit`` becomes ``returncode``. Returns a ``CompletedProcess`` like ``lw``.

    Stricter than ``lw`` in one way: a bug (``main`` saved a crash file) fails the test with the
    saved traceback, whatever the status the test expected. A traceback in the output fails it too.
    """
    out, err = io.StringIO(), io.StringIO()
    hook = sys.excepthook
    code = 0
    with _environ(_env_for(user, env)), _cwd(cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), _stdin(io.StringIO("")):
        # imported here, with stdout not a terminal: the CLI's consoles choose width and colour on import
        from lakewarden.cli import main

        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        finally:
            sys.excepthook = hook  # typer installs its own on every call
    p = subprocess.CompletedProcess(["lakewarden", *args], code, out.getvalue(), err.getvalue())
    _no_traceback(p)
    crash = _CRASH.search(p.stderr)
    if crash:
        f = Path(crash.group(1))
        pytest.fail(f"lakewarden {' '.join(args)} crashed:\n" + (f.read_text() if f.exists() else p.stderr))
    return p


@contextlib.contextmanager
def _stdin(stream: io.StringIO) -> Iterator[None]:
    before = sys.stdin
    sys.stdin = stream
    try:
        yield
    finally:
        sys.stdin = before


def server_env() -> dict[str, str]:
    """The environment for a third-party server a test starts (redis-server, Chromium): this process's,
    less a moved clock. infra/testing/at-dates.sh preloads libfaketime, which redis-server's allocator
    and Chromium's launcher do not survive; their clocks decide nothing here."""
    drop = ("LD_PRELOAD", "FAKETIME")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
