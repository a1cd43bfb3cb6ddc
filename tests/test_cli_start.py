"""The command line starts light: heavy libraries are imported only by the commands that use them.

Not a timed test (timings depend on the machine and its load; benchmarks/bench_cli_start.py
measures them). What is checked is which modules a start loads, in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "feast", "kserve", "opacus", "fastapi", "duckdb", "openlineage", "pandas")


def _loaded(code: str, cwd: Path, env: dict[str, str] | None = None) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules)))\n"
    p = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env=env or {k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_")})
    assert p.returncode == 0, p.stderr
    return {m.split(".")[0] for m in json.loads(p.stdout.strip().splitlines()[-1])}


def test_importing_the_cli_loads_no_heavy_library():
    mods = _loaded("import lakewarden.cli", REPO)
    heavy = {*HEAVY, "pyarrow", "deltalake", "numpy"}
    assert not mods & heavy, sorted(mods & heavy)


def test_help_loads_no_heavy_library():
    code = "import contextlib, io\nfrom lakewarden.cli import main\n" \
           "with contextlib.redirect_stdout(io.StringIO()):\n" \
           "    try:\n        main(['--help'])\n    except SystemExit:\n        pass"
    mods = _loaded(code, REPO)
    assert not mods & {*HEAVY, "pyarrow", "deltalake", "numpy"}, sorted(mods & {*HEAVY, "pyarrow", "deltalake", "numpy"})


def test_models_list_reads_the_registry_without_pyarrow_torch_or_feast(project: Path):
    from governance.workspace import Workspace
    from training.registry import Registry

    ws = Workspace.open(project / "lakewarden.yaml")
    fields = {"purpose": "credit_scoring", "features": ["customer_profile:income"], "label": "defaulted",
              "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "prv"}, "utility": {"auc": 0.8}}
    for i in range(2):
        Registry(ws).register(ws.actor("sam"), name="credit", dataset="customers", files={"model.pt": b"w%d" % i},
                              card_fields=fields)
    ws.close()
    code = ("import contextlib, io\nfrom lakewarden.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try:\n        main(['models', 'list'])\n"
            "    except SystemExit as e:\n        assert not e.code, e.code\n"
            "assert 'credit@2' in out.getvalue(), out.getvalue()")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_") or k == "LAKEWARDEN_KEK"}
    mods = _loaded(code, project, env)
    assert "deltalake" in mods  # it did read the table
    assert not mods & {*HEAVY, "pyarrow", "numpy"}, sorted(mods & {*HEAVY, "pyarrow", "numpy"})
