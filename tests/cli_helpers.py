"""Running the real ``lakewarden`` command in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def lw(cwd: Path, *args: str, user: str | None = None, env: dict | None = None,
       timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m lakewarden ARGS`` in ``cwd``, as ``user``, with none of the caller's LAKEWARDEN_* variables.

    A traceback in the output fails the test: user mistakes must end in one clear line.
    """
    e = {k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_")}
    e.update(env or {})
    if user:
        e["LAKEWARDEN_USER"] = user
    p = subprocess.run([sys.executable, "-m", "lakewarden", *args], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=timeout)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    return p


def server_env() -> dict[str, str]:
    """The environment for a third-party server a test starts (redis-server, Chromium): this process's,
    less a moved clock. infra/testing/at-dates.sh preloads libfaketime, which redis-server's allocator
    and Chromium's launcher do not survive; their clocks decide nothing here."""
    drop = ("LD_PRELOAD", "FAKETIME")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
