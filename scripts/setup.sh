#!/usr/bin/env bash
# Install .venv/ exactly as uv.lock says (every version and hash pinned; README, "Installing").
#   scripts/setup.sh          everything: serving, training, Keras/JAX, tracing and the dev tools
#   scripts/setup.sh train    only what ./quickstart.sh runs: serving + training (no dev tools)
#   scripts/setup.sh uv       only the pinned uv, in .tools/uv/ (scripts/lock.sh uses it)
# Re-running is cheap (uv checks .venv/ against the lock in well under a second).
# A pyproject.toml that no longer matches uv.lock is an error: run scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11+ is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

# uv itself, pinned by hash in scripts/requirements-uv.txt, in a venv of its own: .venv/ holds
# exactly the lock, so uv would uninstall itself from there.
UV=.tools/uv/bin/uv
uv_pin=$(sed -n 's/^uv==\([^ ]*\).*/\1/p' scripts/requirements-uv.txt)
if [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$uv_pin" ]; then
    rm -rf .tools/uv
    "$PYTHON" -m venv .tools/uv
    .tools/uv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
        -r scripts/requirements-uv.txt
fi

export UV_PYTHON_DOWNLOADS=never  # use $PYTHON; never fetch a Python build
# .pyc files: the quick start imports TensorFlow in one process, where Python compiles just what
# it imports (~14 s, less than compiling all 7,000 files at install: ~25 s on 2 busy cores); the
# tests start dozens of such processes, so the dev install compiles everything once (and
# PYTHONDONTWRITEBYTECODE, where set, would otherwise make every process compile again).
case "${1:-dev}" in
    # --inexact: the quick start adds what it needs and leaves the dev tools test.sh added
    train) "$UV" sync --locked --python "$PYTHON" --extra train --inexact ;;
    uv)    ;;
    # --compile-bytecode only compiles what is missing: ~1 s when nothing is
    dev)   "$UV" sync --locked --python "$PYTHON" --all-extras --compile-bytecode ;;
    *)     echo "usage: $0 [dev|train|uv]" >&2; exit 2 ;;
esac
