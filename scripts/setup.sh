#!/usr/bin/env bash
# Create .venv/ and install the project (server, training, SDK) with its dev tools.
# (A serving-only install is `pip install ./client .`: no TensorFlow; see README.)
# Re-running is cheap: nothing is reinstalled unless a pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11+ is needed (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.installed
want=$(cat pyproject.toml client/pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "== installing into .venv (first run downloads TensorFlow, ~1-2 minutes)"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e "./client[images]" -e ".[train,keras,tracing,dev]"
    # the TF Serving client for the interop tests: its "tensorflow" requirement is met by the
    # tensorflow-cpu the train extra installs, so it goes in without dependencies
    .venv/bin/python -m pip install --quiet --no-deps "tensorflow-serving-api>=2.18,<2.22"
    echo "$want" > "$stamp"
fi
