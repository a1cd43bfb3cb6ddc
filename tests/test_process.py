"""How the lakewarden command ends its process (lakewarden/process.py): status, atexit, streams, threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _py(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("body, status, err", [
    ("pass", 0, ""),
    ("raise SystemExit(None)", 0, ""),
    ("raise SystemExit(3)", 3, ""),
    ("raise SystemExit('bad input: x')", 1, "bad input: x"),
    ("raise ValueError('a bug')", 1, "ValueError: a bug"),
])
def test_status_follows_what_the_command_raised(body: str, status: int, err: str):
    p = _py(f"from lakewarden.process import run_and_exit\ndef f():\n    {body}\nrun_and_exit(f)\n")
    assert p.returncode == status, p.stderr
    assert err in p.stderr


def test_buffered_output_atexit_handlers_and_worker_threads_finish_before_exit(tmp_path: Path):
    marker = tmp_path / "atexit.txt"
    p = _py(
        "import atexit, threading, time\n"
        "from lakewarden.process import run_and_exit\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "printed = threading.Event()\n"
        "def work():\n"
        "    printed.wait(60)\n"  # still running when f returns: run_and_exit must wait for it
        "    time.sleep(0.3)\n"
        "    print('worker done')\n"
        "def f():\n"
        "    threading.Thread(target=work).start()\n"
        "    print('x' * 100000)\n"  # a piped stdout is block-buffered: it must still arrive whole
        "    printed.set()\n"
        "run_and_exit(f)\n")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "x" * 100000 and lines[-1] == "worker done"
    assert marker.read_text() == "ran"


def test_the_cli_reports_a_user_error_with_its_status_and_no_traceback(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "lakewarden", "-c", str(tmp_path / "missing.yaml"), "tables", "list"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode not in (0, 1) and p.returncode > 0, (p.returncode, p.stderr)
    assert "missing.yaml" in p.stderr and "Traceback" not in p.stderr
