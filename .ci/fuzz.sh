#!/usr/bin/env bash
# Fuzz smoke: installs cargo-fuzz if missing, builds the targets in fuzz/ and
# runs each for FUZZ_SECONDS (default 10). A crash fails CI; libFuzzer leaves
# the input in fuzz/artifacts/TARGET/ (replay: cargo fuzz run --sanitizer none
# TARGET fuzz/artifacts/TARGET/crash-...). Long runs: FUZZ_SECONDS=600.
#
# Sanitizer: none. Every keepwire crate forbids unsafe code, so the fuzzers
# look for panics, overflows (debug assertions are on), hangs and broken
# invariants; this also needs no nightly flags (no RUSTC_BOOTSTRAP).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTUP_TOOLCHAIN=stable
seconds="${FUZZ_SECONDS:-10}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --version 0.13.2 --locked
fi

echo "== building fuzz targets"
cargo fuzz build --sanitizer none

mkdir -p fuzz/logs
for target in proto_decode client_core relay_session; do
    echo "== fuzz $target for ${seconds}s"
    log="fuzz/logs/$target.log"
    status=0
    cargo fuzz run --sanitizer none "$target" -- \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    grep -E '^(#[0-9]+ +DONE|Done |stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -60 "$log"
        echo "fuzz target $target failed (exit $status)"
        exit "$status"
    fi
done
