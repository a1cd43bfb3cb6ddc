#!/usr/bin/env bash
# Run the test suite with the clock moved: each date in turn, every process of the run (Python, the
# Rust inside deltalake, DuckDB, the Trino JVM, redis) seeing that date through libfaketime.
#
#   bash infra/testing/at-dates.sh                      # the five dates below, the whole suite
#   bash infra/testing/at-dates.sh -- tests/test_requests.py -k sla     # pytest arguments after --
#   DATES="2027-02-28T09:00:00|UTC" bash infra/testing/at-dates.sh
#
# Each entry is "start|TZ": the clock starts there (and ticks); TZ is the machine's zone for that run,
# so a test that mixes local and UTC time shows up too. libfaketime is built from the PyPI source
# distribution of python-libfaketime (it vendors libfaketime), without faking sleeps, and the
# monotonic clock is left alone: timeouts and waits keep working.
#
# What it cannot move, and so leaves out:
# - file modification times: the kernel stamps them with the real time, and Rust (delta-rs) reads
#   them with statx, which libfaketime does not see. Tests that compare the clock with file times
#   are marked real_clock and deselected here (they reason in relative times, so the real clock of
#   any day is as good a test for them);
# - the servers' own clocks: the tests start redis-server and Chromium without the preload
#   (tests/cli_helpers.py server_env: redis-server's allocator and Chromium's launcher do not survive
#   libfaketime), and Trino's JVM is skipped (FAKETIME_SKIP_CMDS); none decides anything by the date.
# Each run's full log is kept in $LOGS (printed), with the failures' tracebacks.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
CACHE=${LAKEWARDEN_CACHE:-$HOME/.cache/lakewarden}/libfaketime
LIB=$CACHE/libfaketime.so.1
VERSION=3.0.1
if [ ! -f "$LIB" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "libfaketime==$VERSION"
  tar -xzf "$tmp"/libfaketime-$VERSION.tar.gz -C "$tmp"
  env FAKETIME_COMPILE_CFLAGS="-UFAKE_STAT -UFAKE_UTIME -UFAKE_SLEEP" \
    make -s -C "$tmp/libfaketime-$VERSION/libfaketime/vendor/libfaketime" >/dev/null
  mkdir -p "$CACHE"
  cp "$tmp/libfaketime-$VERSION/libfaketime/vendor/libfaketime/src/libfaketime.so.1" "$LIB"
  rm -rf "$tmp"
fi
args=()
if [ "${1:-}" = "--" ]; then shift; args=("$@"); fi
DATES=${DATES:-"2027-01-31T09:00:00|UTC 2027-02-28T12:00:00|America/Los_Angeles 2027-04-30T18:00:00|Asia/Kolkata 2026-12-02T04:00:00|UTC 2026-12-31T23:30:00|Pacific/Kiritimati"}
LOGS=${LOGS:-$(mktemp -d /tmp/at-dates.XXXXXX)}
mkdir -p "$LOGS"
echo "logs in $LOGS"
status=0
for entry in $DATES; do
  start=${entry%%|*}; zone=${entry#*|}
  echo "=== clock starts at ${start/T/ } UTC, TZ=$zone"
  log=$LOGS/${start%%T*}.log
  set +e
  LD_PRELOAD=$LIB FAKETIME_DONT_FAKE_MONOTONIC=1 FAKETIME="@${start/T/ }" TZ=$zone \
    FAKETIME_SKIP_CMDS=redis-server,java,chromium,chrome,chrome_crashpad_handler \
    LAKEWARDEN_REQUIRE_TRINO=1 LAKEWARDEN_REQUIRE_REDIS=1 LAKEWARDEN_REQUIRE_PROMTOOL=1 LAKEWARDEN_REQUIRE_CHROMIUM=1 \
    "$PY" -m pytest -q -p no:cacheprovider -m "not real_clock" "${args[@]}" >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^(FAILED|ERROR) " "$log" || true
  tail -n 1 "$log"
  [ $rc -eq 0 ] || status=1
done
exit $status
