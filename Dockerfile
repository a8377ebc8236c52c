# The server (and, with another command, the training pipeline) in one image.
#   docker build -t mnist-serving .
#   docker run -p 8500:8500 -p 9100:9100 -v $PWD/models:/models mnist-serving
#   docker run -v $PWD/models:/models -v /path/to/mnist:/data:ro mnist-serving \
#       mnist-train --arch cnn --data-dir /data --model-dir /models

# -- build stage: a virtual environment with the project and its dependencies --------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
COPY client /src/client
COPY pyproject.toml README.md /src/
COPY server /src/server
COPY training /src/training
COPY bench /src/bench
RUN /opt/venv/bin/pip install --quiet /src/client /src \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3*/site-packages/tensorflow/include

# -- final stage: the venv only; no compilers, no pip cache, not root ------------------------
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mnist \
 && mkdir -p /models && chown mnist /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MNIST_MODEL_DIR=/models \
    MNIST_PORT=8500 \
    MNIST_METRICS_PORT=9100
USER mnist
EXPOSE 8500 9100
# Healthy only when the standard gRPC health service says SERVING (model loaded and warm).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "mnist-client health --target 127.0.0.1:${MNIST_PORT} --timeout 3"]
STOPSIGNAL SIGTERM
CMD ["mnist-server"]
