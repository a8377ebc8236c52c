"""The Keras runtime: a version's ``model.keras`` on Keras 3 with the JAX backend (GPU or CPU).

For accelerators: the GPU machines this project can borrow have JAX (and PyTorch) with CUDA but
no TensorFlow. JAX rather than PyTorch because ``jax.jit`` compiles the model once per input
shape into one XLA program (the whole forward pass fused, no Python per layer), which is the
shape-specialised, compile-once behaviour a batching server wants; Keras 3's PyTorch backend
runs eagerly, layer by layer, unless torch.compile is added on top.

Every power-of-two batch size up to the largest batch gets its program, compiled and run once
at load (the warm-up, like the other runtimes), so no request pays for a compilation: a batch
runs on the smallest bucket that holds it, padded, and the padding rows are dropped. The
weights are put on the device once. Keras picks its backend when first imported, so this
runtime needs ``KERAS_BACKEND=jax`` (set here) before anything imports Keras in the process.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client.contract import IMAGE_SHAPE, KERAS_FILE, NUM_CLASSES
from server.runtimes.base import RuntimeUnusable, bucket_sizes, run_in_buckets

NAME = "keras"
LARGEST_BUCKET = 4096  # the batcher's --max-batch-size limits it further


def available() -> bool:
    """Whether Keras and JAX are installed (checked without importing them)."""
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("keras", "jax"))
    except ImportError:
        return False


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # JAX takes 75 % of the GPU's memory at start by default; this model needs a few MB, and
    # other processes (workers, a benchmark) may share the card. Set it to "true" to restore.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import keras

    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeUnusable(
            f"Keras is already loaded with the {backend} backend in this process; this runtime "
            "needs KERAS_BACKEND=jax"
        )
    return keras


def device_name(device: Any) -> str:
    """``cuda:0`` for JAX's first GPU, ``cpu`` for its CPU."""
    return "cpu" if device.platform == "cpu" else f"cuda:{device.id}"


class KerasRuntime:
    """A Keras model compiled by JAX for each batch bucket; see the module docstring."""

    name = NAME
    source = KERAS_FILE

    def __init__(self, path: Path, max_batch: int, require_gpu: bool = False) -> None:
        keras = _keras()
        import jax

        self._jax_device = jax.devices()[0]  # JAX's default: the first GPU if it sees one
        if require_gpu and self._jax_device.platform == "cpu":
            raise RuntimeUnusable("JAX sees no GPU")
        self.device = device_name(self._jax_device)
        try:
            model = keras.saving.load_model(path, compile=False)
        except Exception as err:  # Keras raises many types for a bad file
            raise RuntimeUnusable(f"cannot load {KERAS_FILE} ({type(err).__name__})") from err
        _check_signature(model)
        put = jax.device_put
        self._weights = (
            [put(v.value, self._jax_device) for v in model.trainable_variables],
            [put(v.value, self._jax_device) for v in model.non_trainable_variables],
        )

        def forward(trainable: Any, non_trainable: Any, images: Any) -> Any:
            probabilities, _ = model.stateless_call(trainable, non_trainable, images)
            return probabilities

        self._forward = jax.jit(forward)
        self._put = put
        self._staging = {
            size: np.zeros((size, *IMAGE_SHAPE), np.uint8)
            for size in bucket_sizes(max_batch, LARGEST_BUCKET)
        }
        self.bucket_sizes = list(self._staging)  # each compiled at the warm-up
        self._lock = threading.Lock()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 10]`` for uint8 ``[N, 28, 28]``. Thread-safe, blocking."""
        with self._lock:
            return run_in_buckets(images, self.bucket_sizes, self._run)

    def _run(self, size: int, images: np.ndarray) -> np.ndarray:
        n = len(images)
        staging = self._staging[size]
        staging[:n] = images
        out = self._forward(*self._weights, self._put(staging, self._jax_device))
        return np.asarray(out, dtype=np.float32)[:n]


def _check_signature(model: Any) -> None:
    """One uint8 input ``[None, 28, 28]``, one float output ``[None, 10]``."""
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise RuntimeUnusable(f"{KERAS_FILE} has {len(inputs)} inputs and {len(outputs)} outputs")
    shape, dtype = tuple(inputs[0].shape), str(inputs[0].dtype)
    if shape != (None, *IMAGE_SHAPE) or dtype != "uint8":
        raise RuntimeUnusable(
            f"{KERAS_FILE} input is {dtype}{list(shape)}, expected uint8[-1, 28, 28]"
        )
    if tuple(outputs[0].shape) != (None, NUM_CLASSES):
        raise RuntimeUnusable(
            f"{KERAS_FILE} output has shape {list(outputs[0].shape)}, expected [-1, 10]"
        )


def load(version_dir: Path, max_batch: int, *, require_gpu: bool = False) -> KerasRuntime:
    """The runtime for ``version_dir/model.keras``."""
    if not available():
        raise RuntimeUnusable(
            "Keras with JAX is not installed (pip install 'mnist-serving[keras]')"
        )
    path = version_dir / KERAS_FILE
    if not path.is_file():
        raise RuntimeUnusable(f"no {KERAS_FILE}; re-export the version with python -m training")
    return KerasRuntime(path, max_batch, require_gpu)
