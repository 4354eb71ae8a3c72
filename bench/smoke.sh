#!/usr/bin/env bash
# CI smoke run of the benchmark harness: every scenario, tiny, against every
# target, so the harness keeps working. No figure is judged here.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTUP_TOOLCHAIN=stable
bash bench/setup.sh
cargo build --quiet -p keepwire -p keepwire-bench --bins
bench=target/debug/keepwire-bench
run() {
    echo "  keepwire-bench $*"
    line=$("$bench" "$@")
    # No figure is judged; the storm's correctness is (every message, once, in order).
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
assert "scenario" in d, d
if d["scenario"] == "storm":
    assert d["all_caught_up"] and d["lost"] == d["duplicated"] == d["out_of_order"] == 0, d
print("    ", d)' "$line"
}
targets=(keepwire node-ws python-ws socketio mosquitto)
if [ ! -x /usr/sbin/mosquitto ] && ! command -v mosquitto >/dev/null; then
    # setup.sh said why; the benchmark suite records it as an error row.
    echo "  NOT RUN: mosquitto is not installed (see bench/setup.sh output above)"
    targets=(keepwire node-ws python-ws socketio)
fi
for t in "${targets[@]}"; do
    run idle --target "$t" --conns 50 --hold 200ms
    run fanout --target "$t" --groups 2 --members 5 --rate 20 --duration 500ms
done
run ingest --target keepwire --senders 2 --duration 500ms
run catchup --messages 500
run footprint --idle 200ms
run reconnect-latency --rtt 20ms --backlog 2 --times 2
run storm --devices 20 --downtime 1s --within 60s
run storm --devices 20 --downtime 1s --within 60s --no-jitter
echo "bench smoke: ok"
