"""The TensorFlow runtime: the SavedModel's ``serving_default`` signature itself.

Only imported where TensorFlow is installed (``pip install 'mnist-serving[tensorflow]'``). It
runs on the first GPU TensorFlow sees, else on the CPU; on a CPU the LiteRT runtime is about
10x faster per call at small batches, so it is the default there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client.contract import (
    IMAGE_SHAPE,
    INPUT_NAME,
    NUM_CLASSES,
    SAVED_MODEL_FILE,
    SIGNATURE,
)
from server.runtimes.base import RuntimeUnusable

NAME = "tensorflow"


def available() -> bool:
    """Whether TensorFlow is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:
        return False


def configure_threads(threads: int) -> None:
    """Size TensorFlow's thread pools (0 keeps its default: one per core).

    Must run before TensorFlow executes anything; measured on 2 cores, one thread made
    one-call-per-request serving 1.8x faster but cut 1,024-image batches by 40%.
    """
    if threads:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # already initialised by an earlier version's load
            pass


def _device() -> tuple[str, str]:
    """(TensorFlow device, short name) of the first GPU TensorFlow sees, else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return gpus[0].name, "gpu:0"
    return "/device:CPU:0", "cpu"


def check_signature(fn: Any) -> str:
    """The signature must take uint8 ``images [None, 28, 28]`` and give one float32 ``[N, 10]``.

    Returns the output's key.
    """
    import tensorflow as tf

    _, kwargs = fn.structured_input_signature
    if list(kwargs) != [INPUT_NAME]:
        raise RuntimeUnusable(f"signature inputs {list(kwargs)} != ['{INPUT_NAME}']")
    spec = kwargs[INPUT_NAME]
    if spec.dtype != tf.uint8 or spec.shape.as_list() != [None, *IMAGE_SHAPE]:
        raise RuntimeUnusable(
            f"input is {spec.dtype.name}{spec.shape.as_list()}, expected uint8[None, 28, 28]"
        )
    outputs = fn.structured_outputs
    if len(outputs) != 1:
        raise RuntimeUnusable(f"expected one output, got {sorted(outputs)}")
    key, out_spec = next(iter(outputs.items()))
    if out_spec.dtype != tf.float32 or out_spec.shape.as_list()[1:] != [NUM_CLASSES]:
        raise RuntimeUnusable(
            f"output is {out_spec.dtype.name}{out_spec.shape.as_list()}, expected float32[None, 10]"
        )
    return str(key)


class TensorFlowRuntime:
    """Calls the SavedModel's signature on its device."""

    name = NAME
    source = SAVED_MODEL_FILE

    def __init__(self, version_dir: Path) -> None:
        import tensorflow as tf

        self._tf_device, self.device = _device()
        try:
            with tf.device(self._tf_device):
                self._saved_model = tf.saved_model.load(str(version_dir))  # keeps variables alive
            self._fn = self._saved_model.signatures[SIGNATURE]
        except KeyError:
            raise RuntimeUnusable(f"no '{SIGNATURE}' signature") from None
        except Exception as err:  # TensorFlow raises many types for a broken SavedModel
            raise RuntimeUnusable(f"cannot load ({type(err).__name__})") from err
        self._output_key = check_signature(self._fn)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 10]`` for uint8 ``[N, 28, 28]``. Blocking."""
        import tensorflow as tf

        with tf.device(self._tf_device):
            out = self._fn(images=tf.constant(np.ascontiguousarray(images)))[self._output_key]
        return out.numpy()  # type: ignore[no-any-return]


def load(version_dir: Path, threads: int = 0) -> TensorFlowRuntime:
    """The runtime for the SavedModel in ``version_dir`` (``threads``: see
    :func:`configure_threads`)."""
    if not available():
        raise RuntimeUnusable(
            "TensorFlow is not installed (pip install 'mnist-serving[tensorflow]')"
        )
    if not (version_dir / SAVED_MODEL_FILE).is_file():
        raise RuntimeUnusable("no saved_model.pb in the version folder")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_threads(threads)
    return TensorFlowRuntime(version_dir)
