# Two commands for a fresh machine (see README):
#   make demo   install, then run the main job on embedded defaults
#   make test   install, then run the test suite
# (make test-fast: the suite less the tests marked slow, for the edit-test loop; it starts no Trino)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
# The native core (native/: Rust, PyO3, built by maturin from crates.io); rebuilt when its sources change,
# or RUSTFLAGS does (`RUSTFLAGS= make install`: a portable build instead of native/.cargo/config.toml's).
NATIVE := $(VENV)/.native-$(shell (cat native/Cargo.toml native/pyproject.toml native/.cargo/config.toml native/src/*.rs; \
                                   echo "RUSTFLAGS=$${RUSTFLAGS-(unset)}") | sha1sum | cut -c1-12)
LW     := $(BIN)/lakewarden

.PHONY: install trino kafka objectstore keycloak system oracle demo test test-fast bench bench-deps clean-demo

# What CI also runs without the native core, so both paths stay green.
FALLBACK_TESTS := tests/test_native_core.py tests/test_stream_decode.py tests/test_crypto_vectors.py tests/test_keys.py tests/test_keys_concurrency.py tests/test_pgstore.py \
                  tests/test_ingest.py tests/test_ingest_parallel.py

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,scale]'
	rm -f $(VENV)/.installed-* && touch $@

# Without cargo the library runs its pure-Python fallback (same bytes, slower; see README).
$(NATIVE): $(STAMP) native/Cargo.toml native/pyproject.toml native/.cargo/config.toml $(wildcard native/src/*.rs)
	@if command -v cargo >/dev/null 2>&1 || test -x $$HOME/.cargo/bin/cargo; then \
	  PATH="$$PATH:$$HOME/.cargo/bin" $(BIN)/python -m pip install --quiet ./native && \
	  rm -f $(VENV)/.native-* && touch $@; \
	else echo "no Rust toolchain (cargo): Lakewarden will run its pure-Python fallback"; fi

install: $(STAMP) $(NATIVE)

# A pinned Trino server from Maven Central (into ~/.cache/lakewarden, outside git), for analyst SQL.
trino:
	PYTHON=$(BIN)/python bash infra/trino/install.sh >/dev/null

# A pinned Kafka broker (KRaft) from Maven Central jars (into ~/.cache/lakewarden, outside git), for streaming.
kafka:
	bash infra/kafka/install.sh >/dev/null

# A pinned Keycloak from Maven Central (into ~/.cache/lakewarden, outside git), pre-built for loopback and a
# file database: the identity provider of the bearer-token tests.
keycloak:
	bash infra/keycloak/install.sh >/dev/null

# A pinned S3-compatible server (versitygw) built from the Go module proxy (into ~/.cache/lakewarden), for
# tables on object storage.
objectstore:
	bash infra/objectstore/install.sh >/dev/null

# pycanon in its own virtualenv (it pins numpy/pandas versions this project does not use): the test
# oracle for k-anonymity and l-diversity (tests/test_anonymity.py runs it out of process).
oracle:
	test -x .venv-oracle/bin/python || $(PYTHON) -m venv .venv-oracle
	.venv-oracle/bin/python -c 'import pycanon' 2>/dev/null || .venv-oracle/bin/pip install -q pycanon==1.3.6

# Debian packages the tests need (the tests start the servers themselves; chromium renders the HTML report;
# postgresql: the shared key store's tests start a throw-away cluster).
system:
	@command -v redis-server >/dev/null && command -v promtool >/dev/null && command -v chromium >/dev/null && \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq redis-server prometheus chromium postgresql >/dev/null; }

demo: install
	$(BIN)/python -m lakewarden.demo

test: install trino kafka objectstore keycloak system oracle
	LAKEWARDEN_REQUIRE_ORACLE=1 LAKEWARDEN_REQUIRE_RAY=1 LAKEWARDEN_REQUIRE_POSTGRES=1 LAKEWARDEN_REQUIRE_OBJECTSTORE=1 LAKEWARDEN_REQUIRE_TRINO=1 LAKEWARDEN_REQUIRE_REDIS=1 LAKEWARDEN_REQUIRE_PROMTOOL=1 LAKEWARDEN_REQUIRE_CHROMIUM=1 \
	  LAKEWARDEN_REQUIRE_NATIVE=1 LAKEWARDEN_REQUIRE_KAFKA=1 LAKEWARDEN_REQUIRE_KEYCLOAK=1 $(BIN)/python -m pytest -q --durations=25
	@echo "== the key and ingest tests again on the pure-Python fallback (LAKEWARDEN_NATIVE=0)"
	LAKEWARDEN_NATIVE=0 $(BIN)/python -m pytest -q $(FALLBACK_TESTS)

# Everything but the long end-to-end tests (@pytest.mark.slow: DVC pipeline runs, Trino, demo-like and
# at-scale runs). Servers that are not installed are skipped, not required.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# the native load generator of benchmarks/bench_serving.py (Debian's wrk package)
bench-deps:
	command -v wrk >/dev/null || { apt-get update && apt-get install -y wrk; }

bench: install
	$(BIN)/python benchmarks/bench_governance.py

# The workspace, and what DVC keeps about it: the pipeline's manifests point into the workspace,
# so they go with it (otherwise DVC would restore manifests of tables that no longer exist).
clean-demo:
	rm -rf .lakewarden .dvc/cache .dvc/tmp/runs
	find pipeline -mindepth 1 ! -name .gitignore -exec rm -rf {} + 2>/dev/null || true
