"""The checks a loaded version passes before it may serve.

* Warm-up: a call at every batch size the runtime keeps an interpreter or a compiled program
  for (and an odd size, to exercise padding), so no first request pays for a lazy set-up;
  each answer must have the right shape and probabilities that sum to 1.
* Golden digits: the version's ``golden.npz`` images must still be read as their labels, at
  least ``golden_min_accuracy`` of them (1.0 for versions the trainer writes).
* Same answers: a model compiled at load (LiteRT from a SavedModel) must give the SavedModel's
  probabilities within :data:`~mnist_client.contract.EXPORT_TOLERANCE` on the probes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_client.contract import EXPORT_TOLERANCE, GOLDEN_FILE, IMAGE_SHAPE, NUM_CLASSES

PredictFn = Callable[[np.ndarray], np.ndarray]
DEFAULT_WARMUP_SIZES = (1, 2, 7, 32)


class CheckFailed(Exception):
    """A version failed a check; the message says which and by how much (one line)."""


@dataclass(frozen=True)
class Probes:
    """The images a version is checked on: read once, used by every check."""

    warmup: list[np.ndarray]  # random images, one batch per size
    golden: tuple[np.ndarray, np.ndarray] | None  # golden.npz images and labels, when present

    @classmethod
    def for_version(cls, path: Path, sizes: Sequence[int] = DEFAULT_WARMUP_SIZES) -> Probes:
        """Random batches of ``sizes`` images, and the golden set from ``path`` if it has one."""
        rng = np.random.default_rng(0)
        warmup = [rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8) for n in sizes]
        golden = None
        if (path / GOLDEN_FILE).is_file():
            try:
                with np.load(path / GOLDEN_FILE) as data:
                    golden = np.asarray(data["images"], np.uint8), np.asarray(data["labels"])
            except (OSError, ValueError, KeyError) as err:
                raise CheckFailed(f"unreadable {GOLDEN_FILE} ({type(err).__name__})") from None
            if golden[0].shape[1:] != IMAGE_SHAPE or len(golden[0]) != len(golden[1]):
                raise CheckFailed(f"{GOLDEN_FILE} holds images of shape {golden[0].shape}")
        return cls(warmup, golden)

    def batches(self) -> list[np.ndarray]:
        """Every probe batch: the warm-up ones and the golden images."""
        return self.warmup + ([self.golden[0]] if self.golden is not None else [])


def max_difference(a: PredictFn, b: PredictFn, batches: Sequence[np.ndarray]) -> float:
    """The largest absolute difference between two models' probabilities on ``batches``."""
    return max(float(np.abs(a(x) - b(x)).max()) for x in batches)


def check_same_answers(compiled: PredictFn, reference: PredictFn, probes: Probes) -> float:
    """A compiled model must answer like its reference; returns the largest difference."""
    diff = max_difference(compiled, reference, probes.batches())
    if not diff <= EXPORT_TOLERANCE:
        raise CheckFailed(f"outputs differ from the SavedModel's by {diff:.2g}")
    return diff


def check_outputs(predict: PredictFn, probes: Probes, golden_min_accuracy: float) -> None:
    """Warm up at every probe size; answers must be probabilities; golden digits read right."""
    for images in probes.warmup:
        n = len(images)
        probs = predict(images)
        if probs.shape != (n, NUM_CLASSES):
            raise CheckFailed(f"output shape {probs.shape} for {n} images")
        if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise CheckFailed("probabilities do not sum to 1")
    if probes.golden is not None:
        images, labels = probes.golden
        accuracy = float((predict(images).argmax(axis=1) == labels).mean())
        if accuracy < golden_min_accuracy:
            raise CheckFailed(f"golden-set accuracy {accuracy:.3f} < {golden_min_accuracy:.3f}")
