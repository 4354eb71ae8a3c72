#!/usr/bin/env bash
# The benchmark suite: every scenario against keepwire and the peers, RUNS
# times each, the server pinned to core 0 and the generator to core 1.
# Results: one JSON line per run in bench/results/results.jsonl, then
# bench/summarize.py writes the tables and plots for BENCHMARKS.md.
#   RUNS=3 CONNS=15000 bash bench/run.sh
# BEFORE=DIR also runs the keepwire-bench and keepwire found in DIR (a build
# of an earlier commit) for idle, ingest and full-load fanout, labelled
# "keepwire-before", for before/after ratios measured in the same session.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTUP_TOOLCHAIN=stable
runs="${RUNS:-3}"
conns="${CONNS:-15000}"
duration="${DURATION:-5s}"
out=bench/results
mkdir -p "$out"
: >"$out/results.jsonl"

bash bench/setup.sh
cargo build --quiet --release -p keepwire -p keepwire-bench --bins
bench="taskset -c 1 target/release/keepwire-bench"
pin=(--server-core 0)
targets=(keepwire node-ws python-ws socketio mosquitto)

record() { # label, command...
    local label="$1"; shift
    if line=$("$@" 2>"$out/last-error.txt"); then
        echo "$line" | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['label']='$label'; print(json.dumps(d))" >>"$out/results.jsonl"
        echo "  $label: $line"
    else
        echo "{\"label\": \"$label\", \"error\": $(python3 -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()[-500:]))' "$out/last-error.txt")}" >>"$out/results.jsonl"
        echo "  $label: FAILED (see $out/results.jsonl)"
    fi
}

for r in $(seq "$runs"); do
    echo "== run $r/$runs"
    for t in "${targets[@]}"; do
        record "idle-$t" $bench idle --target "$t" "${pin[@]}" --conns "$conns" --hold 5s
    done
    record "ingest-keepwire" $bench ingest --target keepwire "${pin[@]}" --senders 50 --duration "$duration"
    record "footprint-keepwire" $bench footprint "${pin[@]}"
    record "catchup-keepwire" $bench catchup "${pin[@]}" --messages 100000
    record "storm-jitter-keepwire" $bench storm "${pin[@]}" --devices "${STORM_DEVICES:-10000}" --downtime 5s
    record "storm-nojitter-keepwire" $bench storm "${pin[@]}" --devices "${STORM_DEVICES:-10000}" --downtime 5s --no-jitter
    record "reconnect-latency-keepwire" $bench reconnect-latency "${pin[@]}" --rtt 100ms --backlog 10 --times 10
    if [ -n "${BEFORE:-}" ]; then
        old="taskset -c 1 $BEFORE/keepwire-bench"
        record "idle-keepwire-before" $old idle --target keepwire "${pin[@]}" --conns "$conns" --hold 5s
        record "ingest-keepwire-before" $old ingest --target keepwire "${pin[@]}" --senders 50 --duration "$duration"
        record "fanout-full-keepwire-before" $old fanout --target keepwire "${pin[@]}" --groups 10 --members 100 --duration "$duration"
    fi
    for t in "${targets[@]}"; do
        record "fanout-full-$t" $bench fanout --target "$t" "${pin[@]}" --groups 10 --members 100 --duration "$duration"
        # The issue's half and quarter of the peers' load: 55k and 27k deliveries/s.
        record "fanout-55k-$t" $bench fanout --target "$t" "${pin[@]}" --groups 10 --members 100 --rate 55 --duration "$duration"
        record "fanout-27k-$t" $bench fanout --target "$t" "${pin[@]}" --groups 10 --members 100 --rate 27 --duration "$duration"
    done
done
# Memory against connections (one run per size) and the latency
# distributions at the quarter load (one run each), for the plots.
for n in ${SWEEP:-2500 5000 10000}; do
    for t in "${targets[@]}"; do
        record "sweep-idle-$n-$t" $bench idle --target "$t" "${pin[@]}" --conns "$n" --hold 2s
    done
done
python3 bench/summarize.py "$out/results.jsonl"
