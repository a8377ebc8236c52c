#!/usr/bin/env bash
# Set up .venv/ (all of uv.lock: the quick start's install + Keras/JAX, tracing and the dev
# tools) and run every check: stubs, lint, format, types, the whole test suite.
# MNIST_DATA_DIR points the tests at the IDX files (default ../shared/data/mnist).
# ./test.sh --fast: lint, format, types and only the fast tier (tests/fast: in-process on a
# fake runtime, no TensorFlow, no trained model; well under a minute).
set -euo pipefail
cd "$(dirname "$0")"

fast=0
if [[ "${1:-}" == "--fast" ]]; then
    fast=1
    shift
fi

./scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

# one command a line: set -e does not stop at a failure on the left of &&
echo "== ruff";   .venv/bin/ruff check .
                  .venv/bin/ruff format --check .
echo "== mypy";   .venv/bin/mypy
if ((fast)); then
    echo "== pytest (fast tier)"; .venv/bin/python -m pytest -m fast "$@"
else
    echo "== pytest"; .venv/bin/python -m pytest "$@"
fi
