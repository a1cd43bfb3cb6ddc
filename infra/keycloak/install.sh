#!/usr/bin/env bash
# Install a pinned Keycloak (the identity provider of the tests and of a laptop) from Maven Central
# into a cache folder outside git, and pre-build it for a loopback server with a file database, so
# that each start skips Quarkus' build step (measured here: 50 s for `start-dev`, 11 s for
# `start --optimized` on an existing database). Idempotent: a second run prints the install path
# and exits. Prints the Keycloak home on stdout; progress on stderr.
#
#   KEYCLOAK_VERSION  pinned version (26.7.3: the newest keycloak-quarkus-dist served here)
#   LAKEWARDEN_CACHE  cache root (default ~/.cache/lakewarden)
#   MAVEN_REPO        Maven's local repository (default ~/.m2/repository), where the .sha1 lands
#
# The tarball is checked against the .sha1 Maven Central serves beside it (fetched by Maven with
# strict checksums, then compared again here). Keycloak 26 runs on Java 17 or 21+ (17 is
# deprecated upstream); the JDK is looked up in LAKEWARDEN_KEYCLOAK_JAVA_HOME, then
# /usr/lib/jvm/temurin-25-jdk-amd64, then any /usr/lib/jvm/* of Java 21+, then of Java 17+, and
# recorded in <home>/.java-home for governance/idp.py.
set -euo pipefail
VERSION="${KEYCLOAK_VERSION:-26.7.3}"
CACHE="${LAKEWARDEN_CACHE:-$HOME/.cache/lakewarden}"
HOME_DIR="$CACHE/keycloak-$VERSION"
STAMP="$HOME_DIR/.lakewarden-installed"
M2="${MAVEN_REPO:-$HOME/.m2/repository}"
ARTIFACT="org.keycloak:keycloak-quarkus-dist:$VERSION:tar.gz"

java_major() { "$1/bin/java" -version 2>&1 | awk -F'"' '/version/ {split($2,v,"."); print v[1]; exit}'; }

find_java() {
  local min j m
  for min in 21 17; do
    for j in "${LAKEWARDEN_KEYCLOAK_JAVA_HOME:-}" /usr/lib/jvm/temurin-25-jdk-amd64 /usr/lib/jvm/*; do
      [ -n "$j" ] && [ -x "$j/bin/java" ] || continue
      m=$(java_major "$j")
      if [ -n "$m" ] && [ "$m" -ge "$min" ]; then echo "$j"; return 0; fi
    done
  done
  echo "error: Keycloak $VERSION needs Java 17+ (set LAKEWARDEN_KEYCLOAK_JAVA_HOME)" >&2
  exit 1
}

if [ -f "$STAMP" ] && [ -x "$HOME_DIR/bin/kc.sh" ]; then
  echo "$HOME_DIR"
  exit 0
fi

command -v mvn >/dev/null || { echo "error: mvn is required to fetch Keycloak from Maven Central (apt-get install maven)" >&2; exit 1; }
mkdir -p "$CACHE/dl"
TARBALL="$CACHE/dl/keycloak-quarkus-dist-$VERSION.tar.gz"
if [ ! -f "$TARBALL" ]; then
  echo "fetching $ARTIFACT from Maven Central" >&2
  mvn -q -B -C dependency:copy -Dartifact="$ARTIFACT" -DoutputDirectory="$CACHE/dl" >&2
fi
SHA_FILE="$M2/org/keycloak/keycloak-quarkus-dist/$VERSION/keycloak-quarkus-dist-$VERSION.tar.gz.sha1"
[ -f "$SHA_FILE" ] || { echo "error: Maven kept no checksum for $ARTIFACT ($SHA_FILE)" >&2; rm -f "$TARBALL"; exit 1; }
WANT=$(awk '{print $1; exit}' "$SHA_FILE")
GOT=$(sha1sum "$TARBALL" | awk '{print $1}')
if [ "$WANT" != "$GOT" ]; then
  echo "error: checksum mismatch for $ARTIFACT: Maven Central says $WANT, the file is $GOT" >&2
  rm -f "$TARBALL"
  exit 1
fi
echo "checksum ok (sha1 $GOT)" >&2
rm -rf "$HOME_DIR" "$CACHE/unpack-keycloak" && mkdir -p "$CACHE/unpack-keycloak"
echo "unpacking Keycloak $VERSION" >&2
tar -xzf "$TARBALL" -C "$CACHE/unpack-keycloak"
mv "$CACHE/unpack-keycloak/keycloak-$VERSION" "$HOME_DIR"
rm -rf "$CACHE/unpack-keycloak"
JAVA_HOME_FOUND=$(find_java)
echo "building Keycloak for a file database and a local cache (Java: $JAVA_HOME_FOUND)" >&2
# Build-time options: the file database (one per server, its path given at start) and no cluster.
JAVA_HOME="$JAVA_HOME_FOUND" "$HOME_DIR/bin/kc.sh" build --db=dev-file --cache=local >"$HOME_DIR/build.log" 2>&1 \
  || { echo "error: kc.sh build failed; see $HOME_DIR/build.log" >&2; exit 1; }
rm -rf "$HOME_DIR/data"
echo "$JAVA_HOME_FOUND" > "$HOME_DIR/.java-home"
rm -f "$TARBALL"  # the install is what we keep; Maven's own cache holds the tarball
touch "$STAMP"
echo "Keycloak $VERSION installed in $HOME_DIR (Java: $JAVA_HOME_FOUND)" >&2
echo "$HOME_DIR"
