#!/usr/bin/env bash
# Installs what the web-chat browser test needs: Debian's chromium (apt) and the Python
# playwright driver (pip, into .venv). Idempotent; safe to call before every test run.
# We never run `playwright install`: its browser downloads come from a CDN this project's
# machines cannot reach, and Debian's chromium is driven through executable_path instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install_browser.sh: /usr/bin/chromium is missing; run as root, or: sudo apt-get install -y chromium" >&2
        exit 1
    fi
    echo "installing chromium (apt-get)..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium
fi

if ! "$PY" -c "import playwright" 2>/dev/null; then
    echo "installing playwright (pip, into $(dirname "$(dirname "$PY")"))..."
    "$PY" -m pip install -q playwright
fi
/usr/bin/chromium --version
"$PY" -c "import playwright, importlib.metadata as m; print('playwright', m.version('playwright'))"
