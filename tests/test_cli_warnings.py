"""The installed command shows the project's warnings, never libraries' deprecation notes.

Feast turns DeprecationWarnings on when it is imported, and ibis calls DuckDB's deprecated
``fetch_arrow_table()`` under every training set: a user saw that note after their command.
``lakewarden.cli.run`` holds such notes back in its own process (lakewarden.process
``quiet_library_warnings``); this process — the tests — keeps Python's behaviour.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import lw
from governance.keys import generate_kek_file
from governance.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
NOISE = ("DeprecationWarning", "FutureWarning", "PendingDeprecationWarning")
ARGS = ["features", "training-set", "--purpose", "credit_scoring", "--label", "defaulted",
        "--features", "customer_profile:income,customer_profile:region"]


@pytest.fixture
def lake(project: Path, tmp_path: Path) -> Path:
    from features.store import Features
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    ws = Workspace.open(project / "lakewarden.yaml")
    res = generate(tmp_path / "landing", people=200, transactions_per_person=0, seed=3)
    ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
    build_silver(ws, ws.actor("dana"), "customers")
    Features(ws).apply(ws.actor("pipeline"))
    ws.close()
    return project


def _env() -> dict[str, str]:
    return {"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]}


@pytest.mark.slow  # two fresh interpreters importing Feast, ~13 s and more on 2 cores
def test_a_training_set_from_the_command_line_prints_no_library_deprecation(lake: Path):
    # Subprocesses on purpose, both: the hook is lakewarden.cli.run's, in the command's own process; and
    # the control's note comes only in a fresh interpreter (run in this one, after the lake's set-up, the
    # same command raised no library deprecation at all, even recorded with simplefilter("always")).
    p = lw(lake, *ARGS, user="sam", env=_env())
    assert p.returncode == 0, p.stderr
    assert "200 rows" in p.stdout
    assert not any(w in p.stderr for w in NOISE), p.stderr
    # The same command through cli.main in a plain interpreter does meet one: the test is not vacuous.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEWARDEN_")}
    env.update(_env(), LAKEWARDEN_USER="sam")
    code = f"from lakewarden.cli import main\ntry:\n    main({ARGS!r})\nexcept SystemExit as e:\n    assert not e.code"
    raw = subprocess.run([sys.executable, "-c", code], cwd=lake, env=env, capture_output=True, text=True, timeout=300)
    assert raw.returncode == 0, raw.stderr
    assert "DeprecationWarning" in raw.stderr, raw.stderr


def test_the_projects_own_warnings_still_show(project: Path):
    """A KEK file others can read: InsecureKeyFileWarning (the project's) reaches the user."""
    kek = project / "kek.key"
    generate_kek_file(kek)
    kek.chmod(0o644)
    cfg = project / "lakewarden.yaml"
    cfg.write_text(cfg.read_text().replace("kek: {provider: env, var: LAKEWARDEN_KEK}", "kek: {provider: file, path: kek.key}"))
    p = lw(project, "keys", "status", user="carla")  # a subprocess: the warning as the installed command shows it
    assert p.returncode == 0, p.stderr
    assert "InsecureKeyFileWarning" in p.stderr and "chmod 600" in p.stderr, p.stderr
