#!/usr/bin/env bash
# One command from a fresh clone to a served prediction:
#   install serving + training into .venv/ from uv.lock (no dev tools: ./test.sh adds them),
#   train the quick model if models/ holds no version, serve it on :8500.
#
#   ./quickstart.sh                                  # downloads MNIST (needs internet)
#   ./quickstart.sh --data-dir ../shared/data/mnist  # or a folder of the four IDX files
#
# Environment: MODEL_DIR (default models), ARCH (default mlp: ~45 s on 2 CPU cores;
# cnn is the accurate production model), MNIST_PORT / MNIST_METRICS_PORT and every other
# server setting (see README).
set -euo pipefail
cd "$(dirname "$0")"

data_args=()
if [ "${1:-}" = "--data-dir" ]; then
    [ -n "${2:-}" ] || { echo "usage: $0 [--data-dir DIR]" >&2; exit 2; }
    data_args=(--data-dir "$2")
elif [ -n "${MNIST_DATA_DIR:-}" ]; then
    data_args=(--data-dir "$MNIST_DATA_DIR")
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--data-dir DIR]" >&2; exit 2
fi

MODEL_DIR="${MODEL_DIR:-models}"
ARCH_ASKED="${ARCH:-}"
ARCH="${ARCH:-mlp}"

./scripts/setup.sh train

NOTICES='All log messages before absl::InitializeLog|NodeDef mentions attribute use_unbounded_threadpool|oneDNN custom operations are on|Created TensorFlow Lite XNNPACK delegate'
# TensorFlow's C++ logging below errors (its graph-attribute notices read as failures)
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
if ! ls "$MODEL_DIR"/*/metadata.json >/dev/null 2>&1; then
    echo "== no model in $MODEL_DIR/: training the $ARCH model"
    # TensorFlow's and LiteRT's start-up notices (printed before any log level applies) are
    # not for a newcomer: everything else the trainer says is kept
    .venv/bin/python -m training --arch "$ARCH" --model-dir "$MODEL_DIR" "${data_args[@]}" --quiet \
        2> >(grep -v -E "$NOTICES" >&2)
elif [ -n "$ARCH_ASKED" ]; then
    echo "== $MODEL_DIR/ already holds a version: serving it, not training ARCH=$ARCH_ASKED"
    echo "   (to add a $ARCH_ASKED version: .venv/bin/python -m training --arch $ARCH_ASKED" \
         "--model-dir $MODEL_DIR ${data_args[*]}; the server picks it up)"
fi

echo "== serving $MODEL_DIR/ on port ${MNIST_PORT:-8500} (metrics on ${MNIST_METRICS_PORT:-9100}); Ctrl-C stops"
echo "   try: .venv/bin/python -m mnist_client health --target localhost:${MNIST_PORT:-8500}"
exec .venv/bin/python -m server --model-dir "$MODEL_DIR"
