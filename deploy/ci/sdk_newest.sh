#!/usr/bin/env bash
# The SDK against the newest versions its ranges allow (client/pyproject.toml), as a caller who
# runs `pip install ./client` today gets them, so that an upgrade breaking callers shows here
# first: the SDK's tests (sync and async clients, streams, CLI, TLS, tokens) from a venv with
# grpcio, protobuf, numpy and Pillow fresh from the index, against real servers from .venv/ (the
# lock). Needs scripts/setup.sh to have run. Bounded: about 1-2 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
UV=$ROOT/.tools/uv/bin/uv
V=${SDK_VENV:-/tmp/mnist-sdk-newest}
export UV_PYTHON_DOWNLOADS=never

rm -rf "$V"
"$UV" venv -q --python "${PYTHON:-python3}" "$V"
# --refresh: ask the index for its newest releases instead of trusting cached metadata; not
# editable, as a caller installs it; the test tools the tests import besides the SDK
"$UV" pip install -q --python "$V" --refresh "./client[images]" \
    "pytest>=8,<10" "pytest-asyncio>=0.24,<2" "pytest-timeout>=2.3,<3" prometheus-client cryptography
echo "SDK dependencies, newest allowed (locked for the server):"
for pkg in grpcio protobuf numpy pillow; do
    echo "  $pkg $("$V/bin/python" -c "from importlib.metadata import version; print(version('$pkg'))")" \
        "($(.venv/bin/python -c "from importlib.metadata import version; print(version('$pkg'))"))"
done
"$V/bin/python" -c 'import mnist_client; print("  mnist_client from", mnist_client.__file__)'

# PYTHONPATH: the tests package and the stdlib-only helpers conftest imports (server.ready_file,
# training.data); the SDK itself comes from $V. Left out: the tests that import TensorFlow or
# the server's reflection in the test process.
cd "$ROOT"
PYTHONPATH=$ROOT MNIST_TEST_SERVER_PYTHON=$ROOT/.venv/bin/python "$V/bin/python" -m pytest -q \
    -p no:cacheprovider tests/test_server.py tests/test_security.py \
    -k "not in_process_model and not reflection" "$@"
