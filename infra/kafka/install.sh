#!/usr/bin/env bash
# Install a pinned Apache Kafka broker (KRaft mode, no ZooKeeper) from Maven Central jars into a
# cache folder outside git: org.apache.kafka:kafka_2.13 and kafka-tools with their runtime
# dependencies, fetched with mvn. Idempotent: a second run prints the install path and exits.
# Prints the Kafka home on stdout; progress on stderr. Runs on the machine's Java 17+.
#
#   KAFKA_VERSION     pinned version (4.4.0)
#   LAKEWARDEN_CACHE  cache root (default ~/.cache/lakewarden)
set -euo pipefail
VERSION="${KAFKA_VERSION:-4.4.0}"
CACHE="${LAKEWARDEN_CACHE:-$HOME/.cache/lakewarden}/kafka"
HOME_DIR="$CACHE/kafka-$VERSION"
STAMP="$HOME_DIR/.lakewarden-installed"

if [ -f "$STAMP" ] && [ -d "$HOME_DIR/libs" ]; then
  echo "$HOME_DIR"
  exit 0
fi
command -v mvn >/dev/null || { echo "error: mvn is required to fetch Kafka from Maven Central (apt-get install maven)" >&2; exit 1; }
command -v java >/dev/null || { echo "error: java (17+) is required to run Kafka" >&2; exit 1; }
rm -rf "$HOME_DIR.partial" && mkdir -p "$HOME_DIR.partial/libs"
# A throwaway POM whose only job is to resolve the broker's runtime classpath.
cat > "$HOME_DIR.partial/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>lakewarden</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.25.5</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
  </dependencies>
</project>
POM
echo "fetching org.apache.kafka:kafka_2.13:$VERSION and kafka-tools with dependencies from Maven Central" >&2
mvn -q -B -f "$HOME_DIR.partial/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$HOME_DIR.partial/libs" >&2
cat > "$HOME_DIR.partial/log4j2.properties" <<'LOG'
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
LOG
rm -rf "$HOME_DIR" && mv "$HOME_DIR.partial" "$HOME_DIR"
touch "$STAMP"
echo "Kafka $VERSION installed in $HOME_DIR ($(ls "$HOME_DIR/libs" | wc -l) jars)" >&2
echo "$HOME_DIR"
