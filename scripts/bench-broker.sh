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
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo=sudo
    fi
    # A fresh machine's package lists may be empty: update them once then.
    $sudo apt-get install -y -q mosquitto || { $sudo apt-get update -q && $sudo apt-get install -y -q mosquitto; }
fi
cargo bench --bench broker -- "$@"
