#!/usr/bin/env bash
# Install a pinned Versity S3 Gateway (versitygw, Apache-2.0) from the Go module proxy into a cache
# folder outside git. It serves the S3 API over a POSIX folder: the tests' object store on loopback,
# and a laptop's stand-in for S3. It refuses `If-None-Match: *` on an existing key (412), so
# concurrent delta-rs writers stay safe (tests/test_objectstore.py checks both).
# Idempotent: a second run prints the binary's path and exits. Prints the binary path on stdout;
# progress on stderr. About 3 minutes on 2 cores the first time.
#
#   VERSITYGW_VERSION  pinned version (v1.8.0)
#   LAKEWARDEN_CACHE   cache root (default ~/.cache/lakewarden)
set -euo pipefail
VERSION="${VERSITYGW_VERSION:-v1.8.0}"
CACHE="${LAKEWARDEN_CACHE:-$HOME/.cache/lakewarden}/objectstore"
HOME_DIR="$CACHE/versitygw-$VERSION"
BIN="$HOME_DIR/bin/versitygw"
STAMP="$HOME_DIR/.lakewarden-installed"

if [ -f "$STAMP" ] && [ -x "$BIN" ]; then
  echo "$BIN"
  exit 0
fi
command -v go >/dev/null || { echo "error: go is required to build versitygw from the Go module proxy" >&2; exit 1; }
rm -rf "$HOME_DIR.partial" && mkdir -p "$HOME_DIR.partial/bin"
echo "building github.com/versity/versitygw@$VERSION from the Go module proxy (about 3 min the first time)" >&2
start=$(date +%s)
GOBIN="$HOME_DIR.partial/bin" GOFLAGS=-mod=mod go install "github.com/versity/versitygw/cmd/versitygw@$VERSION" >&2
rm -rf "$HOME_DIR" && mv "$HOME_DIR.partial" "$HOME_DIR"
touch "$STAMP"
echo "versitygw $VERSION installed in $HOME_DIR in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
