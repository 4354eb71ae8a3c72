#!/usr/bin/env bash
# Installs the benchmark peers: Node `ws` and Socket.IO (npm, into
# bench/peers/node_modules), Python `websockets` (PyPI, into
# target/bench-venv) and Mosquitto 2 (Debian package, needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
(cd bench/peers && npm install --no-audit --no-fund --silent)
if [ ! -x target/bench-venv/bin/python ]; then
    python3 -m venv target/bench-venv
fi
target/bench-venv/bin/pip install --quiet --disable-pip-version-check 'websockets==15.0.1'
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto) >target/bench-apt.log 2>&1 ||
            echo "setup: mosquitto could not be installed (see target/bench-apt.log); the mosquitto peer will report an error" >&2
    else
        echo "setup: mosquitto is missing and this is not a root Debian machine; the mosquitto peer will report an error" >&2
    fi
fi
mosq=$( (/usr/sbin/mosquitto -h 2>/dev/null || true) | head -1)
echo "peers installed: node $(node --version), ws $(node -p "require('./bench/peers/node_modules/ws/package.json').version"), socket.io $(node -p "require('./bench/peers/node_modules/socket.io/package.json').version"), websockets $(target/bench-venv/bin/python -c 'import websockets; print(websockets.__version__)'), ${mosq:-mosquitto missing}"
