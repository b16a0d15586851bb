#!/usr/bin/env bash
# The fleet benchmark in one command: builds edgeloop in release mode, then
# runs `edgeloop bench --local DIR` (Apache Kafka, broker and processor started as
# child processes, a simulated fleet in this process) and prints the figures.
# DIR is $BENCH_DIR (default /tmp/edgeloop-bench, emptied first); further
# arguments go to `edgeloop bench`, e.g.
#   scripts/bench-fleet.sh --devices 2000 --rate 100 --batch-size 100 --duration 10m --json
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo build --release --locked --bin edgeloop
dir="${BENCH_DIR:-/tmp/edgeloop-bench}"
rm -rf "$dir"
exec "${CARGO_TARGET_DIR:-target}/release/edgeloop" --log warn bench --local "$dir" "$@"
