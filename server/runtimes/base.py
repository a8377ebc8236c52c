"""What every runtime is: something that turns uint8 images into probabilities on a device."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class RuntimeUnusable(Exception):
    """A runtime cannot serve a version here (missing package or file, wrong signature)."""


class Runtime(Protocol):
    """A loaded model on one runtime. ``predict`` is called by one thread at a time."""

    name: str  # "litert", "tensorflow" or "keras"
    device: str  # where batches run: "cpu", "cuda:0", "gpu:0"
    source: str  # the file it was loaded from, or "compiled at load"

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities float32 ``[N, 10]`` for uint8 images ``[N, 28, 28]``. Blocking."""
        ...


def bucket_sizes(max_batch: int, largest: int) -> list[int]:
    """Batch sizes a runtime prepares for: powers of two from 1 up to ``max_batch`` (capped
    at ``largest``; the last one may be ``max_batch`` itself). A batch runs in the smallest
    bucket it fits, so a new batch size never re-sizes or recompiles on the request path."""
    top = min(largest, max(1, max_batch))
    sizes = [1]
    while sizes[-1] < top:
        sizes.append(min(sizes[-1] * 2, top))
    return sizes
