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

# DuckDB and pyarrow, which the tests use as independent readers of the data set.
# Pinned: the tests use their APIs.
DUCKDB_VERSION="2.0.1"
PYARROW_VERSION="26.0.1"
if python3 -c "import duckdb, pyarrow, sys; sys.exit(duckdb.__version__ != '${DUCKDB_VERSION}' or pyarrow.__version__ != '${PYARROW_VERSION}')" >/dev/null 2>&1; then
    echo "setup: duckdb and pyarrow already installed"
else
    echo "setup: installing duckdb ${DUCKDB_VERSION} and pyarrow ${PYARROW_VERSION} (pip)"
    python3 -m pip install --quiet --disable-pip-version-check "duckdb==${DUCKDB_VERSION}" "pyarrow==${PYARROW_VERSION}"
fi

# paho-mqtt: an MQTT client this project did not write, for the broker's
# identity, ACL and TLS tests (MQTT 3.1.1 and 5).
PAHO_VERSION="2.2.0"
if python3 -c "import paho.mqtt, sys; sys.exit(paho.mqtt.__version__ != '${PAHO_VERSION}')" >/dev/null 2>&1; then
    echo "setup: paho-mqtt already installed"
else
    echo "setup: installing paho-mqtt ${PAHO_VERSION} (pip)"
    python3 -m pip install --quiet --disable-pip-version-check "paho-mqtt==${PAHO_VERSION}"
fi

# kubernetes-validate: validates the rendered k8s/ overlays offline (it ships
# the Kubernetes schemas) in tests/tests/k8s.rs. Pinned: the test relies on
# its command line and messages.
KUBERNETES_VALIDATE_VERSION="1.37.0"
if python3 -c "import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != '${KUBERNETES_VALIDATE_VERSION}')" >/dev/null 2>&1; then
    echo "setup: kubernetes-validate already installed"
else
    echo "setup: installing kubernetes-validate ${KUBERNETES_VALIDATE_VERSION} (pip)"
    python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION}"
fi
