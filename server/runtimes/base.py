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
