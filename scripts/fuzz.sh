#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS (default 20) each, with
# cargo-fuzz (libFuzzer) on the nightly toolchain; installs cargo-fuzz,
# pinned, when it is missing. A crash fails the run and leaves its input
# under fuzz/artifacts/TARGET/ (replay: cargo +nightly fuzz run TARGET FILE).
# Used by .ci/run; for a longer hunt: scripts/fuzz.sh 600.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
seconds="${1:-20}"
CARGO_FUZZ_VERSION="0.13.1"
installed=$(cargo fuzz --version 2>/dev/null || true)
if [ "$installed" != "cargo-fuzz ${CARGO_FUZZ_VERSION}" ]; then
    echo "fuzz: installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
    cargo install cargo-fuzz --version "${CARGO_FUZZ_VERSION}" --locked --quiet
fi
# No sanitizer: the fuzzed code has no unsafe (the workspace forbids it), so
# a panic or an abort is what there is to find, and the build is much
# faster without AddressSanitizer's instrumentation of every dependency;
# a debug build (--dev) compiles in about half the time of an optimised
# one, and a short run needs coverage more than speed.
targets=$(cargo +nightly fuzz list)
cargo +nightly fuzz build --sanitizer none --dev >/dev/null
for target in $targets; do
    echo "fuzz: ${target} for ${seconds} s"
    mkdir -p "fuzz/corpus/${target}"
    rm -rf "fuzz/artifacts/${target}"
    cargo +nightly fuzz run --sanitizer none --dev "$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 | grep -E "^(stat::number_of_executed_units|==|SUMMARY|thread|Failing)" || true
    # A crash, an input that runs out of memory or one that hangs makes
    # libFuzzer write an artifact.
    if ls "fuzz/artifacts/${target}"/crash-* "fuzz/artifacts/${target}"/oom-* \
        "fuzz/artifacts/${target}"/timeout-* "fuzz/artifacts/${target}"/leak-* >/dev/null 2>&1; then
        echo "fuzz: ${target} found a failing input: $(ls fuzz/artifacts/${target}/)" >&2
        exit 1
    fi
done
echo "fuzz: every target ran ${seconds} s without a failing input"
