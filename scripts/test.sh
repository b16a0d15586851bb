#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh), then runs
# every test of the workspace, end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo test --workspace --locked "$@"
