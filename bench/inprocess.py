"""The in-process ceiling: images/s of the model called directly, no gRPC, no batcher.

    python -m bench.inprocess --model-dir models --runtime litert --batches 1,32,256,1024
prints one JSON object: {"1": images_per_s, "32": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from server.runtimes import RUNTIMES


def rates(model: Any, batches: Iterable[int], seconds: float) -> dict[int, float]:
    """Images/s of ``model.predict`` at each batch size (random images), after a warm-up
    call, each timed for ``seconds`` and at least three calls."""
    import numpy as np

    rng = np.random.default_rng(0)
    out: dict[int, float] = {}
    for n in batches:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        model.predict(images)
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
            model.predict(images)
            calls += 1
        out[n] = calls * n / elapsed
    return out


def measure(model_dir: Path, batches: list[int], seconds: float, runtime: str) -> dict[str, float]:
    """Images/s of the newest version on ``runtime`` at each batch size.

    The model is loaded as the server loads it (same runtime, buckets up to the largest batch).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from server.versions import list_versions, load_version

    version = list_versions(model_dir)[-1]
    model = load_version(model_dir, version, runtime, max_batch=max(batches))
    return {str(n): rate for n, rate in rates(model, batches, seconds).items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--batches", default="1,32,256,1024")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(json.dumps(measure(args.model_dir, batches, args.seconds, args.runtime)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
