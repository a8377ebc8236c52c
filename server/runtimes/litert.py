"""The LiteRT runtime: a version's ``model.tflite`` on the LiteRT interpreter (XNNPACK), CPU.

It needs ``ai-edge-litert`` only, never TensorFlow. Resizing an interpreter's input when the
batch size changes costs more than running the CNN on one image (about 55 vs 30 us here), and
under load the batch size changes on almost every call. So each power-of-two batch size up to
:data:`LARGEST_BUCKET` gets an interpreter of its own, sized once at load; a batch runs on the
smallest bucket that holds it, padded, and a batch larger than the largest bucket runs as
several calls. Small buckets run on one thread: XNNPACK's worker threads spin while they wait,
which on a busy machine takes CPU from the event loop for a call that lasts microseconds.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mnist_client.contract import (
    IMAGE_SHAPE,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_NAME,
    SIGNATURE,
    TFLITE_FILE,
)
from server.runtimes.base import RuntimeUnusable, bucket_sizes, run_in_buckets

NAME = "litert"
# Per-image cost is flat from 8 images up (about 40 us of CPU per image either way), while
# the 256-image interpreter alone holds 27 MB: larger batches run as 128-image calls.
LARGEST_BUCKET = 128
# Buckets from this size up use every model thread; smaller ones use one.
MULTI_THREAD_FROM = 32


def available() -> bool:
    """Whether ``ai-edge-litert`` can be imported here (it has no Linux aarch64 wheel)."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def convert_saved_model(saved_model_dir: Path) -> bytes:
    """Compile a SavedModel's serving signature into a LiteRT flatbuffer (needs TensorFlow).

    Used by training to write ``model.tflite``, and by the server for an older version that has
    no such file, where TensorFlow is installed.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), [SIGNATURE])
    return bytes(converter.convert())


class _Bucket:
    """One interpreter sized for ``size`` images, with its input staging buffer."""

    def __init__(self, flatbuffer: bytes, size: int, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.size = size
        self.interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        (inp,) = self.interpreter.get_input_details()
        (out,) = self.interpreter.get_output_details()
        self.input_index = inp["index"]
        self.output_index = out["index"]
        self.interpreter.resize_tensor_input(self.input_index, [size, *IMAGE_SHAPE], strict=True)
        self.interpreter.allocate_tensors()
        self.staging = np.zeros((size, *IMAGE_SHAPE), np.uint8)

    def run(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n == self.size and images.flags.c_contiguous:
            self.interpreter.set_tensor(self.input_index, images)
        else:  # padded: the rows past n hold earlier images, and their answers are dropped
            self.staging[:n] = images
            self.interpreter.set_tensor(self.input_index, self.staging)
        self.interpreter.invoke()
        out: np.ndarray = self.interpreter.get_tensor(self.output_index)  # a copy
        return out[:n] if n != self.size else out


def check_signature(flatbuffer: bytes) -> None:
    """The flatbuffer must take uint8 ``images [-1, 28, 28]`` and give float32 ``[-1, 10]``."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    signatures = interpreter.get_signature_list()
    expected = {"inputs": [INPUT_NAME], "outputs": [OUTPUT_NAME]}
    if signatures.get(SIGNATURE) != expected:
        raise RuntimeUnusable(f"model.tflite signatures {signatures} lack {SIGNATURE}{expected}")
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    if inp["dtype"] != np.uint8 or list(inp["shape_signature"]) != [-1, *IMAGE_SHAPE]:
        raise RuntimeUnusable(
            f"model.tflite input is {np.dtype(inp['dtype']).name}{list(inp['shape_signature'])}, "
            "expected uint8[-1, 28, 28]"
        )
    if out["dtype"] != np.float32 or list(out["shape_signature"])[1:] != [NUM_CLASSES]:
        raise RuntimeUnusable(
            f"model.tflite output is {np.dtype(out['dtype']).name}"
            f"{list(out['shape_signature'])}, expected float32[-1, 10]"
        )


class LiteRTRuntime:
    """A flatbuffer ready to run any batch size; see the module docstring.

    ``threads``: threads for the larger buckets (0 = one per core).
    """

    name = NAME
    device = "cpu"

    def __init__(self, flatbuffer: bytes, threads: int, max_batch: int, source: str) -> None:
        check_signature(flatbuffer)
        self.source = source
        threads = threads or os.cpu_count() or 1
        self._buckets = {
            size: _Bucket(flatbuffer, size, threads if size >= MULTI_THREAD_FROM else 1)
            for size in bucket_sizes(max_batch, LARGEST_BUCKET)
        }
        self.bucket_sizes = list(self._buckets)  # sizes with an interpreter of their own
        self._lock = threading.Lock()  # an interpreter runs one call at a time

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 10]`` for uint8 ``[N, 28, 28]``. Thread-safe, blocking."""
        with self._lock:
            return run_in_buckets(images, self.bucket_sizes, self._run)

    def _run(self, size: int, images: np.ndarray) -> np.ndarray:
        return self._buckets[size].run(images)


COMPILED = "compiled from the SavedModel at load"


def load(
    version_dir: Path, threads: int, max_batch: int, *, compile_if_missing: bool
) -> LiteRTRuntime:
    """The runtime for ``version_dir/model.tflite`` (its ``source`` says where it came from).

    Without the file, the SavedModel is compiled here when ``compile_if_missing`` (TensorFlow
    installed); otherwise :class:`RuntimeUnusable` says how to fix the version.
    """
    if not available():
        raise RuntimeUnusable("ai-edge-litert is not installed")
    path = version_dir / TFLITE_FILE
    if path.is_file():
        return LiteRTRuntime(path.read_bytes(), threads, max_batch, TFLITE_FILE)
    if not compile_if_missing:
        raise RuntimeUnusable(
            "no model.tflite, and TensorFlow is not installed to compile the SavedModel; "
            "re-export the version with this project's trainer (python -m training), or "
            "install TensorFlow (pip install 'mnist-serving[tensorflow]') to compile it at load"
        )
    try:
        flatbuffer = convert_saved_model(version_dir)
    except Exception as err:  # the converter raises many types
        raise RuntimeUnusable(f"cannot compile the SavedModel ({type(err).__name__})") from err
    return LiteRTRuntime(flatbuffer, threads, max_batch, COMPILED)
