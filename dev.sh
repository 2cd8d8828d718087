#!/usr/bin/env bash
# One entry point for the README's commands: creates .venv on first use, then runs the job.
#   ./dev.sh demo   train the tiny model on the embedded corpus, sample from it, save it
#   ./dev.sh test   run the test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    echo "setting up $VENV (first run only)..."
    "$PY" -m venv "$VENV"
    # torch first and pinned: on CPU machines that is the CPU wheel; an unpinned torch would pull a CUDA build.
    "$VENV/bin/pip" install -q "torch==2.13.0"
    "$VENV/bin/pip" install -q -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
cmd=${1:-}
shift || true
case "$cmd" in
    demo) exec "$VENV/bin/seekling" demo "$@" ;;
    test)
        # The web-chat test drives a real headless chromium (Debian's package; needs root to install).
        # In CI a missing browser is an error; on a laptop the test is skipped with its reason.
        if ! scripts/install_browser.sh >/dev/null; then
            [ "${CI:-}" = "true" ] && { echo "could not install chromium for the browser test" >&2; exit 1; }
            echo "warning: chromium unavailable; the browser test will be skipped" >&2
        fi
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: ./dev.sh demo|test [args...]" >&2; exit 2 ;;
esac
