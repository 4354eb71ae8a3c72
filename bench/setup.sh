#!/usr/bin/env bash
# Installs the benchmark peers: Node `ws` (npm, into bench/peers/node_modules)
# and Python `websockets` (PyPI, into target/bench-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
(cd bench/peers && npm install --no-audit --no-fund --silent)
if [ ! -x target/bench-venv/bin/python ]; then
    python3 -m venv target/bench-venv
fi
target/bench-venv/bin/pip install --quiet --disable-pip-version-check 'websockets==15.0.1'
echo "peers installed: node $(node --version), ws $(node -p "require('./bench/peers/node_modules/ws/package.json').version"), websockets $(target/bench-venv/bin/python -c 'import websockets; print(websockets.__version__)')"
