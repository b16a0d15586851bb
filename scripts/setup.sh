#!/usr/bin/env bash
# Installs what edgeloop needs beyond cargo's own dependencies, once:
# the Tansu Kafka-API broker that `edgeloop up` and the tests start, the
# Python readers (DuckDB, pyarrow) the tests check the data set with, and
# kubernetes-validate for the offline checks of k8s/ (tests/tests/k8s.rs;
# they also need kubectl, which this script does not install).
# Skipped when tansu is already installed. Building it from scratch takes
# about 20 minutes on a 2-core machine.
set -euo pipefail

TANSU_VERSION="0.6.0"

if command -v tansu >/dev/null 2>&1 || [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
    echo "setup: tansu already installed"
else
    echo "setup: installing tansu ${TANSU_VERSION} with cargo (about 20 minutes from scratch)"
    cargo install tansu --version "${TANSU_VERSION}" --locked --features dynostore,libsql
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
# tflite-micro: TensorFlow Lite Micro's interpreter, the reference the int8
# kernel must match bit for bit on the exported .tflite (tests/tests/tflite.rs).
pip_pinned tflite-micro 0.dev20261023182759
