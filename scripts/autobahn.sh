#!/usr/bin/env bash
# WebSocket conformance with the Autobahn|Testsuite, against the relay's
# WebSocket stack (fuzzingclient -> `keepwire serve --conformance-echo`) and
# the client's (fuzzingserver <- the autobahn_client example). Installs the
# suite in a Python 2.7 virtualenv under target/. Passes when every case is
# OK, NON-STRICT or INFORMATIONAL (cases 12.* and 13.* are permessage-deflate,
# which keepwire does not negotiate, and are excluded).
# Reports: target/autobahn/reports/{server,client}/index.html.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTUP_TOOLCHAIN=stable
work="$PWD/target/autobahn"
venv="$PWD/target/autobahn-venv"
mkdir -p "$work"

if [ ! -x "$venv/bin/wstest" ]; then
    echo "== installing autobahntestsuite (Python 2.7 virtualenv)"
    py27="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/2.7.18/bin/python"
    [ -x "$py27" ] || py27="$(command -v python2.7)"
    "$py27" -m pip install --quiet virtualenv
    "$py27" -m virtualenv --quiet "$venv"
    "$venv/bin/pip" install --quiet autobahntestsuite
fi

# Debug builds (dependencies are optimised in dev builds): CI has them already.
echo "== building"
cargo build --quiet -p keepwire
cargo build --quiet -p keepwire-client --example autobahn_client

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "== relay (fuzzingclient)"
rm -rf "$work/relay.db"* "$work/reports"
port=$(free_port)
target/debug/keepwire serve --listen "127.0.0.1:$port" --db "$work/relay.db" --conformance-echo \
    >"$work/serve.out" 2>"$work/serve.log" &
pids+=($!)
for _ in $(seq 100); do grep -q ws:// "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
cat >"$work/server.json" <<JSON
{"outdir": "$work/reports/server",
 "servers": [{"agent": "keepwire-relay", "url": "ws://127.0.0.1:$port/conformance/echo"}],
 "cases": ["*"], "exclude-cases": ["12.*", "13.*"], "exclude-agent-cases": {}}
JSON
(cd "$work" && "$venv/bin/wstest" -m fuzzingclient -s server.json >fuzzingclient.log 2>&1)

echo "== client (fuzzingserver)"
port=$(free_port)
cat >"$work/client.json" <<JSON
{"url": "ws://127.0.0.1:$port", "outdir": "$work/reports/client",
 "cases": ["*"], "exclude-cases": ["12.*", "13.*"], "exclude-agent-cases": {}}
JSON
(cd "$work" && exec "$venv/bin/wstest" -m fuzzingserver -s client.json --webport=0 >fuzzingserver.log 2>&1) &
pids+=($!)
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port))" 2>/dev/null && break; sleep 0.2; done
target/debug/examples/autobahn_client "ws://127.0.0.1:$port"

python3 - "$work/reports" <<'PY'
import json, sys, collections
ok = {"OK", "NON-STRICT", "INFORMATIONAL"}
bad = 0
for side, agent in (("server", "keepwire-relay"), ("client", "keepwire-client")):
    idx = json.load(open(f"{sys.argv[1]}/{side}/index.json"))[agent]
    counts = collections.Counter(v["behavior"] for v in idx.values())
    close = collections.Counter(v["behaviorClose"] for v in idx.values())
    failed = sorted(k for k, v in idx.items() if v["behavior"] not in ok or v["behaviorClose"] not in ok)
    bad += len(failed)
    print(f"{side}: {len(idx)} cases: " + ", ".join(f"{n} {b}" for b, n in sorted(counts.items()))
          + "; close: " + ", ".join(f"{n} {b}" for b, n in sorted(close.items())))
    if failed:
        print(f"  not passing: {', '.join(failed[:40])}")
sys.exit(1 if bad else 0)
PY
