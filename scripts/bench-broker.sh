#!/usr/bin/env bash
# The broker benchmark: installs Mosquitto (Debian package) if missing, then
# runs `cargo bench --bench broker` (QoS 1 publishes through edgeloop broker
# and through Mosquitto, side by side). Arguments go to the benchmark
# (seconds per cell, default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v mosquitto >/dev/null 2>&1; then
    echo "bench-broker: installing mosquitto (apt)"
    if [ "$(id -u)" -eq 0 ]; then
        apt-get install -y -q mosquitto
    else
        sudo apt-get install -y -q mosquitto
    fi
fi
cargo bench --bench broker -- "$@"
