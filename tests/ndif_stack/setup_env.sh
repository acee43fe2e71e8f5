#!/usr/bin/env bash
# Set up the real NDIF server's own environment once (idempotent): a Python 3.12 venv with the pinned stack, and
# redis-server from Debian when missing. Used by `make test-ndif`; the project's .venv is not touched.
set -euo pipefail
VENV="${1:-.venv-ndif}"
STAMP="$VENV/.ndif-installed"
PINS=(ndif[api,ray]==0.1.2 nnsight==0.8.1 torch==2.13.0 "moto[server]==5.1.*")

find_python312() {
    command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1 && { command -v python3.12; return; }
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        [ -x "$candidate" ] && { echo "$candidate"; return; }
    done
    echo "error: test-ndif needs Python 3.12 (ndif 0.1.2 requires >=3.12,<3.14); install python3.12" >&2
    exit 2
}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian)"
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || {
        echo "error: redis-server is missing and apt-get could not install it" >&2; exit 2; }
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]} $(cat "$(dirname "$0")/ndif-constraints.txt")" ]; then
    exit 0
fi
PY312="$(find_python312)"
echo "setting up $VENV with $PY312 (once, a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "${PINS[@]}" -c "$(dirname "$0")/ndif-constraints.txt"
"$VENV/bin/python" -c "import ndif, nnsight, torch, ray, moto, redis" 
echo "${PINS[*]} $(cat "$(dirname "$0")/ndif-constraints.txt")" > "$STAMP"
