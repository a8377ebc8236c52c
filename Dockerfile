# Two images from one file:
#   serve (the default, last stage): the server on LiteRT; no TensorFlow, no compilers, no pip.
#     docker build -t mnist-serving .
#     docker run -p 8500:8500 -p 9100:9100 -v $PWD/models:/models mnist-serving
#   train: the training pipeline (TensorFlow), writing versions the server can serve.
#     docker build --target train -t mnist-serving-train .
#     mkdir -p models   # yours: the container runs as you (--user) and writes there
#     docker run --user "$(id -u):$(id -g)" -v "$PWD/models:/models" -v /path/to/mnist:/data:ro \
#         mnist-serving-train mnist-train --arch cnn --data-dir /data --model-dir /models
# linux/amd64 only: ai-edge-litert (the serving runtime) has no Linux aarch64 wheel; on an
# arm64 host build with --platform linux/amd64.

# -- a non-root user, shared by both images ---------------------------------------------------
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mnist \
 && mkdir -p /models && chown mnist /models

# -- build stages: one virtual environment each, at the path it runs from ----------------------
# Both install exactly uv.lock (every version and hash pinned: the same packages on every build)
# with uv, itself pinned by hash in scripts/requirements-uv.txt and left in the build stages.
FROM base AS sources
COPY scripts/requirements-uv.txt /tmp/requirements-uv.txt
RUN python -m venv /opt/uv \
 && /opt/uv/bin/pip install --quiet --require-hashes -r /tmp/requirements-uv.txt
ENV UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 UV_LINK_MODE=copy
COPY client /src/client
COPY pyproject.toml uv.lock README.md /src/
COPY server /src/server
COPY training /src/training
COPY bench /src/bench
WORKDIR /src

FROM sources AS build-serve
# --locked: a lock that does not match pyproject.toml fails the build; --no-editable: the
# project and the SDK copied into the venv, not linked to /src
# ai-edge-litert ships accelerators, NPU compilers and converters that the interpreter the
# server uses never loads (30 MB); the compose test serves real digits from this image.
RUN /opt/uv/bin/uv sync --quiet --locked --no-editable --python python3 \
 && cd /opt/venv/lib/python3*/site-packages/ai_edge_litert \
 && rm -rf libLiteRtWebGpuAccelerator.so tools vendors aot _pywrap_litert_converter.so \
      _pywrap_tensorflow_lite_calibration_wrapper.so _pywrap_tfl_calibration.so \
      _pywrap_analyzer_wrapper.so pywrap_genai_ops.so \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM sources AS build-train
RUN /opt/uv/bin/uv sync --quiet --locked --no-editable --python python3 --extra train \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include

# -- train ------------------------------------------------------------------------------------
FROM base AS train
COPY --from=build-train /opt/venv /opt/venv
# HOME for Keras' and matplotlib's caches under any --user (the host folder's owner)
ENV PATH=/opt/venv/bin:$PATH TF_CPP_MIN_LOG_LEVEL=2 HOME=/tmp MPLCONFIGDIR=/tmp/matplotlib
USER mnist
CMD ["mnist-train", "--help"]

# -- serve (default) --------------------------------------------------------------------------
FROM base AS serve
COPY --from=build-serve /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    MNIST_MODEL_DIR=/models \
    MNIST_PORT=8500 \
    MNIST_METRICS_HOST=0.0.0.0 \
    MNIST_METRICS_PORT=9100
USER mnist
EXPOSE 8500 9100
# Healthy only when the standard gRPC health service says SERVING (model loaded and warm).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "mnist-client health --target 127.0.0.1:${MNIST_PORT} --timeout 3"]
STOPSIGNAL SIGTERM
CMD ["mnist-server"]
