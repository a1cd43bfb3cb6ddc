"""How a Lakewarden process ends: after its work is durable, without C++ teardown.

pyarrow's native thread pools can abort the interpreter as it finalizes: a worker that is
still alive when Arrow's globals are destroyed makes ``std::thread``'s destructor call
``std::terminate`` ("terminate called without an active exception", exit -6). It is timing
dependent and rare (apache/arrow#34314, #36980, #39862), and it happened here after a
compliance request had finished its work: the caller saw a crash for a request that was done.

So the command-line entry points end through ``exit_process``: they let Python finish
what it owns (other non-daemon threads, atexit handlers such as logging's flush, the
standard streams), then leave with ``os._exit``, which skips the C++ static destructors
where the abort happens. Every table commit, audit flush and key-store write is complete
before this point; nothing that matters lives in a native destructor. Code that imports
Lakewarden as a library (tests, notebooks) is not affected.

An unexpected exception (a bug, not a user error) is not shown as a traceback either:
:func:`save_crash` writes the traceback, with personal-looking spans redacted, to
``<workspace>/crash/`` and the command prints one line naming that file (:func:`crash_line`).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

CRASH_DIR = "crash"


def exit_code(exc: SystemExit) -> int:
    """The status a SystemExit stands for: None is 0, a message is printed and is 1."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def crash_dir(workspace_dir: Path | None) -> Path:
    """Where tracebacks go: ``<workspace>/crash``, or a per-user temp folder when no workspace opened."""
    if workspace_dir is not None:
        return workspace_dir / CRASH_DIR
    return Path(tempfile.gettempdir()) / f"lakewarden-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / CRASH_DIR


def save_crash(exc: BaseException, directory: Path, *, command: str, now: datetime | None = None) -> Path:
    """Write ``exc``'s traceback to a new file in ``directory`` (mode 0600) and return its path.

    The text passes through :func:`governance.pii.redact` first: an exception message can quote a
    value, and this file lives outside the vault.
    """
    from governance.pii import redact

    when = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    body, _ = redact(f"command: {command}\n{text}")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{when}-{os.getpid()}-{type(exc).__name__}.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(body)
    return path


def crash_line(exc: BaseException, path: Path) -> str:
    """One line for the user: what broke, redacted and shortened, and where the traceback is."""
    from governance.pii import redact

    msg = redact(" ".join(str(exc).split()))[0]
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"unexpected {type(exc).__name__}{': ' + msg if msg else ''} (a bug; the traceback is in {path})"


OWN_PACKAGES = frozenset({"lakewarden", "governance", "lakehouse", "features", "training", "serving"})
_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _own(module: str | None) -> bool:
    return bool(module) and module.split(".", 1)[0] in OWN_PACKAGES  # type: ignore[union-attr]


def quiet_library_warnings() -> None:
    """In a command's own process: show the project's warnings, not libraries' deprecation notes.

    A user running ``lakewarden features training-set`` was shown ibis's
    ``fetch_arrow_table() is deprecated`` — a note for ibis's developers about DuckDB, not for
    them. Warning *filters* cannot hold this back: Feast calls
    ``warnings.simplefilter("once", DeprecationWarning)`` when it is imported, in front of any
    filter set before. So the display itself decides (``warnings.showwarning``, Python's hook
    for it): a ``DeprecationWarning``, ``PendingDeprecationWarning`` or ``FutureWarning`` is
    shown only if its class is one of the project's; every other warning (the project's own
    ``UserWarning`` subclasses such as an insecure key file's, a runtime warning) is shown as
    before. Called by :func:`lakewarden.cli.run` only: tests and library users keep Python's
    behaviour.
    """
    import warnings

    show = warnings.showwarning
    if getattr(show, "_lakewarden_quiet", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        if issubclass(category, _LIBRARY_NOISE) and not _own(getattr(category, "__module__", None)):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._lakewarden_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def exit_process(code: int) -> NoReturn:
    """Finish Python's own shutdown work, then end the process with ``code``."""
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join()
    try:
        atexit._run_exitfuncs()
    except BaseException:  # an atexit handler's failure must not hide the command's own status
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written
            pass
    os._exit(code)


def run_and_exit(fn: Callable[[], object]) -> NoReturn:
    """Run a command's main function and end the process with its status (see module doc)."""
    try:
        fn()
        code = 0
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:  # a bug, not a user error: show it as Python would, then exit 1
        traceback.print_exc()
        code = 1
    exit_process(code)
