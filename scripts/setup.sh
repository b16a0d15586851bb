#!/usr/bin/env bash
# Installs what edgeloop needs beyond cargo's own dependencies, once:
# the Tansu Kafka-API broker that `edgeloop up` and the tests start.
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
