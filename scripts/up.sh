#!/usr/bin/env bash
# Runs `edgeloop up` on its defaults (after installing what it needs);
# arguments are passed on, e.g. `scripts/up.sh --devices 50 --duration 30s`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
exec cargo run --release --locked -- up "$@"
