"""What every runtime is: something that turns uint8 images into probabilities on a device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def run_in_buckets(
    images: np.ndarray, sizes: Sequence[int], run: Callable[[int, np.ndarray], np.ndarray]
) -> np.ndarray:
    """``run(size, part)`` on the smallest bucket ``size`` that holds ``images`` (ascending
    ``sizes``); a batch larger than the largest bucket runs as several parts of that size."""
    largest = sizes[-1]
    parts = [images[i : i + largest] for i in range(0, len(images), largest)]
    answers = [run(next(s for s in sizes if s >= len(part)), part) for part in parts]
    return answers[0] if len(answers) == 1 else np.concatenate(answers)
