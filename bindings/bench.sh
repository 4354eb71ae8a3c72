#!/usr/bin/env bash
# Measurements of the bindings for BENCHMARKS.md (not run in CI):
#   size   stripped x86_64 cdylib, release profile and the `mobile` size profile
#   push   a process linking keepwire-ffi runs on_push over 10,000 waiting
#          messages: time, notifications, peak RSS (VmHWM)
#   python the Python client's resident memory, idle and connected
# Each measured RUNS times (default 5); medians are printed.
# Usage: bash bindings/bench.sh [size|push|python ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTUP_TOOLCHAIN=stable
ROOT=$PWD
RUNS="${RUNS:-5}"
WORK=$(mktemp -d)
RELAY_PID=""
cleanup() {
    if [ -n "$RELAY_PID" ]; then kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(size push python)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

if want size; then
    for profile in release mobile; do
        cargo build --locked --profile "$profile" -p keepwire-ffi >/dev/null 2>&1
        strip -o "$WORK/lib-$profile.so" "target/$profile/libkeepwire_ffi.so"
        bytes=$(stat -c %s "$WORK/lib-$profile.so")
        echo "{\"bench\":\"cdylib_size\",\"profile\":\"$profile\",\"stripped_bytes\":$bytes,\"mib\":$(awk "BEGIN{printf \"%.2f\", $bytes/1048576}")}"
    done
fi

if want push; then
    cargo build --locked --release -p keepwire-ffi --example push_probe >/dev/null 2>&1
    PROBE="$ROOT/target/release/examples/push_probe"
    hwm=()
    ms=()
    for run in $(seq 1 "$RUNS"); do
        mkfifo "$WORK/in-$run"
        "$PROBE" relay <"$WORK/in-$run" >"$WORK/out-$run" 2>/dev/null &
        RELAY_PID=$!
        exec 7>"$WORK/in-$run"
        for _ in $(seq 1 200); do [ -s "$WORK/out-$run" ] && break; sleep 0.05; done
        read -r url token <"$WORK/out-$run"
        home="$WORK/home-$run"
        "$PROBE" login "$home" "$url" "$token"
        echo "seed 10000" >&7
        for _ in $(seq 1 1200); do grep -q seeded "$WORK/out-$run" && break; sleep 0.05; done
        line=$("$PROBE" wake "$home" 30000)
        echo "$line"
        hwm+=("$(echo "$line" | sed 's/.*"vm_hwm_kib":\([0-9]*\).*/\1/')")
        ms+=("$(echo "$line" | sed 's/.*"elapsed_ms":\([0-9]*\).*/\1/')")
        exec 7>&-
        wait "$RELAY_PID" 2>/dev/null || true
        RELAY_PID=""
    done
    echo "{\"bench\":\"on_push_10k\",\"runs\":$RUNS,\"median_vm_hwm_kib\":$(printf '%s\n' "${hwm[@]}" | median),\"median_elapsed_ms\":$(printf '%s\n' "${ms[@]}" | median)}"
fi

if want python; then
    PY="$ROOT/target/bindings/venv/bin/python"
    if [ ! -x "$PY" ]; then
        echo "run bash bindings/ci.sh python first (it makes the virtualenv)" >&2
        exit 1
    fi
    cargo build --locked -p keepwire --bin keepwire >/dev/null 2>&1
    BIN="$ROOT/target/debug/keepwire"
    # The installed package with the release library (stripped) in place of
    # CI's dev build.
    cargo build --locked --release -p keepwire-ffi >/dev/null 2>&1
    SITE=$("$PY" -c 'import keepwire, os; print(os.path.dirname(os.path.dirname(keepwire.__file__)))')
    mkdir -p "$WORK/py"
    cp -r "$SITE/keepwire" "$WORK/py/"
    strip -o "$WORK/py/keepwire/keepwire_ffi/libkeepwire_ffi.so" "$ROOT/target/release/libkeepwire_ffi.so"
    export PYTHONPATH="$WORK/py"
    "$BIN" serve --listen 127.0.0.1:0 --db "$WORK/relay.db" >"$WORK/url" 2>/dev/null &
    RELAY_PID=$!
    for _ in $(seq 1 100); do [ -s "$WORK/url" ] && break; sleep 0.1; done
    url=$(head -1 "$WORK/url")
    token=$("$BIN" admin --db "$WORK/relay.db" user add alice | tail -1)
    for state in baseline idle connected; do
        vals=()
        for run in $(seq 1 "$RUNS"); do
            vals+=("$("$PY" - "$state" "$WORK/py-$state-$run" "$url" "$token" <<'EOF'
import sys, time
state, home, url, token = sys.argv[1:5]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
if state != "baseline":
    import keepwire
    c = keepwire.Client(home)
    if state == "connected":
        c.login(url, token)
        c.wait_connected(30000)
    time.sleep(2)  # settle: idle timers, first heartbeat negotiation
print(rss())
EOF
)")
        done
        echo "{\"bench\":\"python_rss\",\"state\":\"$state\",\"runs\":$RUNS,\"median_rss_kib\":$(printf '%s\n' "${vals[@]}" | median)}"
    done
fi
