"""Load from ``h2load`` (nghttp2's HTTP/2 load generator, in C, its own process).

It replays one gRPC-framed request body per call: one Predict image, a 1,024-image
BatchPredict, or a stream of many PredictStream messages in one body.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_client.pb import digit_classifier_pb2 as pb

SERVICE = "/mnist.v1.DigitClassifier"
STREAM_MESSAGES = 100  # PredictStream messages per h2load request


@dataclass(frozen=True)
class Load:
    name: str
    path: str
    payload: str  # key into the payload files
    concurrency: int
    images_per_request: int
    only: tuple[str, ...] = ()  # run against these targets only (empty: all of ours)


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def make_payloads(folder: Path, images: np.ndarray) -> dict[str, Path]:
    """Request bodies h2load replays."""
    stream = b"".join(
        grpc_frame(
            pb.PredictStreamRequest(
                id=i, image=images[i % len(images)].tobytes()
            ).SerializeToString()
        )
        for i in range(STREAM_MESSAGES)
    )
    from server.protocols.pb import open_inference_grpc_pb2 as oip
    from server.protocols.pb import tensorflow_core_pb2 as tfc
    from server.protocols.pb import tensorflow_serving_pb2 as tfs

    kserve = oip.ModelInferRequest(model_name="mnist", raw_input_contents=[images[0].tobytes()])
    kserve.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
    tf_serving = tfs.PredictRequest(model_spec=tfs.ModelSpec(name="mnist"))
    tensor = tf_serving.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    tensor.tensor_content = images[0].tobytes()
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    bodies = {
        f"stream{STREAM_MESSAGES}": stream,
        "kserve": grpc_frame(kserve.SerializeToString()),
        "tfserving": grpc_frame(tf_serving.SerializeToString()),
        "predict": grpc_frame(pb.PredictRequest(image=images[0].tobytes()).SerializeToString()),
        "batch1024": grpc_frame(
            pb.BatchPredictRequest(
                images=[im.tobytes() for im in images[:1024]]
            ).SerializeToString()
        ),
    }
    paths = {}
    for name, body in bodies.items():
        paths[name] = folder / f"{name}.grpc"
        paths[name].write_bytes(body)
    return paths


def h2load(
    port: int, load: Load, payload: Path, seconds: float, warmup: float, workdir: Path
) -> tuple[int, float, np.ndarray]:
    """Run h2load; returns (requests done, measured seconds, latencies in ms)."""
    connections = min(load.concurrency, 8)
    streams = max(1, load.concurrency // connections)
    log = workdir / "h2load.tsv"
    log.unlink(missing_ok=True)
    cmd = [
        "h2load", "-t", "1", "-c", str(connections), "-m", str(streams),
        "-D", f"{int(seconds * 1000)}ms", "--warm-up-time", f"{int(warmup * 1000)}ms",
        "-d", str(payload), "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--log-file", str(log), f"http://127.0.0.1:{port}{load.path}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 60)
    if result.returncode != 0:
        raise RuntimeError(f"h2load failed: {result.stderr or result.stdout}")
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", result.stdout)
    finished = re.search(r"finished in ([\d.]+)(m?s)", result.stdout)
    n = int(done[1]) if done else 0
    secs = (
        float(finished[1]) / (1000 if finished and finished[2] == "ms" else 1)
        if finished
        else seconds
    )
    rows = np.loadtxt(log, dtype=np.int64, ndmin=2) if log.stat().st_size else np.zeros((0, 3))
    latencies = rows[:, 2] / 1000.0 if len(rows) else np.zeros(0)
    return n, secs, latencies
