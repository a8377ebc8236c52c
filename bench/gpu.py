"""GPU batching, measured: the Keras/JAX runtime in-process and through the server.

    python -m bench.gpu --model-dir models [--runtime keras] [--seconds 5] [--json FILE]

Made to run on a GPU machine that has JAX with CUDA, grpcio, protobuf, numpy and
prometheus-client but no TensorFlow (see README, "GPU"); on a CPU it runs the same steps on
the CPU (that is how CI and the README's CPU figures run it). Figures:

* in-process: images/s of the model called directly at batch 1, 64, 1,024 and 4,096;
* through the server (``--max-batch-size 4096``), with the SDK's own load tester: Predict at
  concurrency 1 and 256 (p50/p99, mean batch), BatchPredict of 4,096 images, PredictStream;
* ratios: BatchPredict 4,096 against in-process at 4,096, and the mean batch at 256 callers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IN_PROCESS_BATCHES = (1, 64, 1024, 4096)
LOADS = (  # name, SDK bench method, callers, images per call
    ("predict-c1", "predict", 1, 1),
    ("predict-c256", "predict", 256, 1),
    ("batch4096-c2", "batch", 2, 4096),
    ("stream-c16", "stream", 16, 1),
)


def in_process(model_dir: Path, runtime: str, seconds: float) -> dict[str, Any]:
    """images/s of the newest version called directly (no gRPC, no batcher)."""
    from bench.inprocess import rates
    from server.versions import list_versions, load_version

    started = time.perf_counter()
    model = load_version(model_dir, list_versions(model_dir)[-1], runtime, max_batch=4096)
    out: dict[str, Any] = {
        "device": model.device, "runtime": model.runtime_name,
        "load_and_compile_s": round(time.perf_counter() - started, 2),
    }  # fmt: skip
    for n, rate in rates(model, IN_PROCESS_BATCHES, seconds).items():
        out[f"images_per_s_b{n}"] = round(rate)
    return out


def through_server(
    model_dir: Path, runtime: str, seconds: float, data: Path | None
) -> dict[str, Any]:
    """The SDK's load tester against a server on this machine, one load after another."""
    from bench.targets import Target, our_server, start, stop
    from mnist_client import bench as sdk_bench

    workdir = Path(tempfile.mkdtemp(prefix="mnist-gpu-"))
    command = our_server(
        model_dir, "--runtime", runtime, "--max-batch-size", "4096",
        "--max-images-per-request", "4096", "--max-concurrent-rpcs", "1024",
    )  # fmt: skip
    running = start(Target("gpu", command, True), workdir, timeout=600)
    target = f"127.0.0.1:{running.port}"
    figures: dict[str, Any] = {"start_to_serving_s": round(running.start_to_serving_s, 2)}
    try:
        for name, method, callers, per_call in LOADS:
            plans = sdk_bench.make_plans(target, callers, method, per_call, seconds,
                                         {"timeout": 60})  # fmt: skip
            tally = sdk_bench.run(plans, data, show_progress=False)
            figures[name] = sdk_bench.report(tally, seconds, len(plans), callers, method)
    finally:
        stop(running)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--runtime", default="keras", help="keras (default), or any other runtime")
    p.add_argument("--data-dir", type=Path, help="MNIST IDX folder (accuracy too)")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    result = {
        "in_process": in_process(args.model_dir, args.runtime, args.seconds),
        "server": through_server(args.model_dir, args.runtime, args.seconds, args.data_dir),
    }
    ip, srv = result["in_process"], result["server"]
    print(f"runtime {ip['runtime']} on {ip['device']}; load and compile "
          f"{ip['load_and_compile_s']} s")  # fmt: skip
    print("in-process images/s: " + ", ".join(
        f"batch {n}: {ip[f'images_per_s_b{n}']:,}" for n in IN_PROCESS_BATCHES))  # fmt: skip
    for name, _, _, _ in LOADS:
        f = srv[name]
        lat = f["client_latency_ms"]
        print(f"{name:14s} {f['images_per_s']:10,.0f} images/s  p50 {lat.get('p50', 0):8.2f} ms"
              f"  p99 {lat.get('p99', 0):8.2f} ms  mean batch {f['mean_batch_size']}"
              f"  errors {f['errors'] or 'none'}")  # fmt: skip
    ratio = srv["batch4096-c2"]["images_per_s"] / max(1, ip["images_per_s_b4096"])
    result["ratios"] = {
        "batch4096_vs_in_process_b4096": round(ratio, 3),
        "mean_batch_c256": srv["predict-c256"]["mean_batch_size"],
    }
    print(f"ratios: {result['ratios']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
