# Two commands for a fresh machine (see README):
#   make demo   install, then run the main job on embedded defaults
#   make test   install, then run the test suite
# (make test-fast: the suite less the tests marked slow, for the edit-test loop; it starts no Trino)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
LW     := $(BIN)/lakewarden

.PHONY: install trino system demo test test-fast bench clean-demo

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# A pinned Trino server from Maven Central (into ~/.cache/lakewarden, outside git), for analyst SQL.
trino:
	PYTHON=$(BIN)/python bash infra/trino/install.sh >/dev/null

# Debian packages the tests need (the tests start the servers themselves; chromium renders the HTML report).
system:
	@command -v redis-server >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq redis-server prometheus chromium >/dev/null; }

demo: install
	$(BIN)/python -m lakewarden.demo

test: install trino system
	LAKEWARDEN_REQUIRE_TRINO=1 LAKEWARDEN_REQUIRE_REDIS=1 LAKEWARDEN_REQUIRE_PROMTOOL=1 LAKEWARDEN_REQUIRE_CHROMIUM=1 $(BIN)/python -m pytest -q

# Everything but the long end-to-end tests (@pytest.mark.slow: DVC pipeline runs, Trino, demo-like and
# at-scale runs). Servers that are not installed are skipped, not required.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/bench_governance.py

# The workspace, and what DVC keeps about it: the pipeline's manifests point into the workspace,
# so they go with it (otherwise DVC would restore manifests of tables that no longer exist).
clean-demo:
	rm -rf .lakewarden .dvc/cache .dvc/tmp/runs
	find pipeline -mindepth 1 ! -name .gitignore -exec rm -rf {} + 2>/dev/null || true
