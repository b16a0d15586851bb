#!/usr/bin/env bash
# Installs what edgeloop needs beyond cargo's own dependencies, once:
# Apache Kafka 4.4.0's broker, whose jars `edgeloop up`, `edgeloop chaos`,
# `edgeloop bench --local` and the tests start Kafka from (Maven
# coordinates pinned in kafka/pom.xml, copied by Maven into a cache outside
# the checkout); the Python readers (DuckDB, pyarrow) the tests check the
# data set with; TensorFlow Lite Micro's interpreter (tflite-micro) for the
# int8 model test; and kubernetes-validate for the offline checks of k8s/
# (tests/tests/k8s.rs; they also need kubectl, which this script does not
# install). Each step is skipped when what it installs is already there.
#
# Kafka needs Java 17 or newer and Maven 3 (on Debian: apt-get install
# openjdk-17-jre-headless maven). The jars go to
# ${EDGELOOP_KAFKA_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeloop/kafka-4.4.0/libs}
# (43 MiB); the first install takes about 10 s with a fast link to Maven's
# registry (README, "The two commands").
set -euo pipefail
cd "$(dirname "$0")/.."

KAFKA_VERSION="4.4.0"
MIN_JAVA=17

java_bin="java"
if [ -n "${JAVA_HOME:-}" ]; then
    java_bin="${JAVA_HOME}/bin/java"
fi
if ! command -v "$java_bin" >/dev/null 2>&1; then
    echo "setup: Java ${MIN_JAVA} or newer is needed to run Apache Kafka ${KAFKA_VERSION}, and ${java_bin} was not found;" >&2
    echo "setup: install a JDK (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME" >&2
    exit 1
fi
java_version=$("$java_bin" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)
java_major=${java_version%%[.+-]*}
if [ "$java_major" = "1" ]; then
    java_major=$(echo "$java_version" | cut -d. -f2)
fi
if ! [ "${java_major:-0}" -ge "$MIN_JAVA" ] 2>/dev/null; then
    echo "setup: Java ${MIN_JAVA} or newer is needed to run Apache Kafka ${KAFKA_VERSION}; ${java_bin} is Java ${java_version:-unknown}" >&2
    echo "setup: install a newer JDK or point JAVA_HOME at one" >&2
    exit 1
fi

kafka_libs="${EDGELOOP_KAFKA_LIBS:-${XDG_CACHE_HOME:-$HOME/.cache}/edgeloop/kafka-${KAFKA_VERSION}/libs}"
pom_sum=$(sha256sum kafka/pom.xml | cut -d' ' -f1)
if [ -f "${kafka_libs}/kafka_2.13-${KAFKA_VERSION}.jar" ] && [ "$(cat "${kafka_libs}/.pom.sha256" 2>/dev/null)" = "$pom_sum" ]; then
    echo "setup: Apache Kafka ${KAFKA_VERSION} already installed in ${kafka_libs}"
else
    if ! command -v mvn >/dev/null 2>&1; then
        echo "setup: Maven 3 (mvn) is needed to install Apache Kafka ${KAFKA_VERSION}'s jars, and it was not found;" >&2
        echo "setup: install it (Debian: apt-get install maven)" >&2
        exit 1
    fi
    echo "setup: installing Apache Kafka ${KAFKA_VERSION} (jars from Maven, kafka/pom.xml) into ${kafka_libs}"
    started=$(date +%s)
    rm -rf "${kafka_libs}.partial"
    mkdir -p "$(dirname "$kafka_libs")"
    mvn -B -q -Dstyle.color=never -f kafka/pom.xml \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
        -DoutputDirectory="${kafka_libs}.partial" -DincludeScope=runtime
    echo "$pom_sum" > "${kafka_libs}.partial/.pom.sha256"
    rm -rf "$kafka_libs"
    mv "${kafka_libs}.partial" "$kafka_libs"
    echo "setup: Apache Kafka ${KAFKA_VERSION} installed ($(ls "$kafka_libs" | wc -l) jars) in $(( $(date +%s) - started )) s"
fi

# Python packages the tests use, each pinned (the tests rely on their APIs and
# messages); installed with pip unless that exact version is already there.
pip_pinned() {
    local name="$1" version="$2"
    if python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('${name}') != '${version}')" >/dev/null 2>&1; then
        echo "setup: ${name} ${version} already installed"
    else
        echo "setup: installing ${name} ${version} (pip)"
        python3 -m pip install --quiet --disable-pip-version-check "${name}==${version}"
    fi
}

# DuckDB and pyarrow: independent readers of the Parquet data set.
pip_pinned duckdb 2.0.1
pip_pinned pyarrow 26.0.1
# paho-mqtt: an MQTT client this project did not write, for the broker's
# identity, ACL and TLS tests (MQTT 3.1.1 and 5).
pip_pinned paho-mqtt 2.2.0
# kubernetes-validate: validates the rendered k8s/ overlays offline (it ships
# the Kubernetes schemas), in tests/tests/k8s.rs.
pip_pinned kubernetes-validate 1.37.0
# A real SVG renderer: the report test renders `edgeloop report`'s picture.
pip_pinned resvg-cli 0.44.0
# tflite-micro: TensorFlow Lite Micro's interpreter, the reference the int8
# kernel must match bit for bit on the exported .tflite (tests/tests/tflite.rs).
pip_pinned tflite-micro 0.dev20261023182759
