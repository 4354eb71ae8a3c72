#!/usr/bin/env bash
# Installs an independent Web Push implementation (PyPI http-ece and
# cryptography) into the virtualenv $1, for tests/independent.rs.
# Exit 3 means PyPI could not be reached (the test then skips loudly);
# any other failure is a real error.
set -uo pipefail
venv="$1"
python="${KW_PYTHON:-python3}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import http_ece, cryptography' 2>/dev/null; then
    exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv" || exit 1
log="$venv/pip.log"
if ! "$venv/bin/pip" install --disable-pip-version-check -q 'http-ece==1.2.1' 'cryptography>=41' >"$log" 2>&1; then
    cat "$log" >&2
    if grep -qiE 'NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Could not find a version|Network is unreachable|timed out' "$log"; then
        exit 3
    fi
    exit 1
fi
"$venv/bin/python" -c 'import http_ece, cryptography' || exit 1
