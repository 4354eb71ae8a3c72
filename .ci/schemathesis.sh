#!/usr/bin/env bash
# Property-based fuzzing of the relay's HTTP API against its own OpenAPI
# document with schemathesis (from PyPI, installed here into a venv): no 5xx,
# no status code, content type or body that contradicts the document.
# Usage: .ci/schemathesis.sh [MAX_EXAMPLES]   (needs a built target/debug/keepwire)
set -euo pipefail
cd "$(dirname "$0")/.."
MAX_EXAMPLES="${1:-40}"
VENV="${SCHEMATHESIS_VENV:-target/schemathesis-venv}"
BIN="${KEEPWIRE_BIN:-target/debug/keepwire}"

if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==4.32.5"
fi

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

DB="$WORK/relay.db"
"$BIN" admin --db "$DB" init >/dev/null
"$BIN" admin --db "$DB" user add alice >/dev/null
"$BIN" admin --db "$DB" user add bob >/dev/null
KEY=$("$BIN" admin --db "$DB" api-key create schemathesis)
# A fuzzer sends many requests: lift the per-key rate for this run.
"$BIN" serve --listen 127.0.0.1:0 --db "$DB" --api-rate 100000 >"$WORK/url" 2>"$WORK/serve.log" &
SERVER_PID=$!
for _ in $(seq 1 100); do [ -s "$WORK/url" ] && break; sleep 0.1; done
URL=$(head -1 "$WORK/url" | sed 's#^ws://#http://#')
[ -n "$URL" ] || { echo "the relay did not start"; cat "$WORK/serve.log"; exit 1; }

# Some state to find: a conversation with a message.
curl -fsS -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
  -d '{"kind":"group","members":["alice","bob"],"key":"seed"}' "$URL/v1/conversations" >/dev/null
curl -fsS -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
  -d '{"body":"hello","idempotency_key":"seed-1"}' "$URL/v1/conversations/1/messages" >/dev/null

run_schemathesis() {
  "$VENV/bin/schemathesis" "$@" run "$URL/v1/openapi.json" \
    --url "$URL" \
    -H "Authorization: Bearer $KEY" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$MAX_EXAMPLES" \
    --generation-deterministic \
    --no-color
}
echo "== schemathesis: fuzzed path parameters"
run_schemathesis
echo "== schemathesis: path parameters naming seeded data"
run_schemathesis --config-file .ci/schemathesis.toml
if grep -q "panicked" "$WORK/serve.log"; then
  echo "the relay panicked:"; cat "$WORK/serve.log"; exit 1
fi
