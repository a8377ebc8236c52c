"""Loading one model version from disk, checking it, and calling it on a batch.

A model directory holds integer versions: ``MODEL_DIR/1/``, ``MODEL_DIR/2/``, ... each a
TensorFlow SavedModel whose ``serving_default`` signature takes uint8 ``[None, 28, 28]`` and
returns float32 probabilities ``[None, 10]``, with a ``metadata.json`` beside it (written by the
training pipeline; optional here). Other names (``.tmp-*`` folders of a version being written)
are ignored, and so is a version folder without a complete ``saved_model.pb``.

Two runtimes compute a batch. ``tensorflow`` calls the SavedModel's signature. ``litert``
compiles that same signature with ``TFLiteConverter`` when the version loads and runs it with
the LiteRT interpreter (XNNPACK kernels); on this project's CNN that is 10x faster per call at
batch 1 and 2x at batch 1,024 on a CPU, with outputs equal to 1e-6. A compiled version is only
served after its outputs match the SavedModel's. ``auto`` picks LiteRT on a CPU and
TensorFlow on a GPU, and falls back to TensorFlow for a version LiteRT cannot compile.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_SHAPE = (28, 28)
NUM_CLASSES = 10
SIGNATURE = "serving_default"
RUNTIMES = ("auto", "litert", "tensorflow")
CPU = "/device:CPU:0"
_WARMUP_SIZES = (1, 2, 7, 32)
_LITERT_TOLERANCE = 1e-4  # largest difference from the SavedModel's probabilities accepted

PredictFn = Callable[[np.ndarray], np.ndarray]


class ModelLoadError(Exception):
    """A version cannot be loaded, or fails its checks; the message says why (one line)."""


def list_versions(model_dir: Path) -> list[int]:
    """Complete versions in ``model_dir``, ascending (a version is a folder with saved_model.pb)."""
    if not model_dir.is_dir():
        return []
    versions = []
    for child in model_dir.iterdir():
        if child.name.isdigit() and (child / "saved_model.pb").is_file():
            versions.append(int(child.name))
    return sorted(versions)


def configure_threads(threads: int) -> int:
    """Size TensorFlow's thread pools (0 keeps TensorFlow's default: one per core).

    Returns the thread count LiteRT interpreters get too. Must run before TensorFlow executes
    anything. Measured on 2 cores (bench/, interleaved repeats): on TensorFlow, one thread
    made naive one-call-per-request serving 1.8x faster but cut 1,024-image BatchPredict by
    40%; on LiteRT, one thread moved batched Predict at 64 concurrent calls by +0 to +14%
    (within the machine's noise) and halves large batches. So the default is one per core.
    """
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        return threads
    return os.cpu_count() or 1


def pick_device(runtime: str = "auto") -> str:
    """The device batches run on: the first GPU TensorFlow sees, else the CPU.

    LiteRT runs on the CPU, so ``runtime="litert"`` always gets the CPU.
    """
    import tensorflow as tf

    if runtime == "litert":
        return CPU
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else CPU


@dataclass
class LoadedModel:
    """One loaded, warmed-up and checked model version, ready to be called on batches."""

    version: int
    path: Path
    device: str
    runtime: str  # "litert" or "tensorflow"
    metadata: dict[str, Any]
    _predict: PredictFn = field(repr=False)
    loaded_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("architecture", "unknown"))

    @property
    def test_accuracy(self) -> float:
        return float(self.metadata.get("test_accuracy", 0.0))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 10]`` for uint8 images ``[N, 28, 28]``. Thread-safe, blocking."""
        return self._predict(images)


class _TensorFlowRunner:
    """Calls the SavedModel's signature on ``device``."""

    def __init__(self, saved_model: Any, fn: Any, output_key: str, device: str) -> None:
        self._saved_model = saved_model  # keeps the signature's variables alive
        self._fn = fn
        self._output_key = output_key
        self._device = device

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        with tf.device(self._device):
            out = self._fn(images=tf.constant(images))[self._output_key]
        return out.numpy()  # type: ignore[no-any-return]


class _LiteRTRunner:
    """The signature compiled by TFLiteConverter, run by the LiteRT interpreter (XNNPACK)."""

    def __init__(self, path: Path, output_key: str, threads: int) -> None:
        import tensorflow as tf
        from ai_edge_litert.interpreter import Interpreter

        converter = tf.lite.TFLiteConverter.from_saved_model(str(path), [SIGNATURE])
        flatbuffer = converter.convert()
        interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
        self._runner = interpreter.get_signature_runner(SIGNATURE)
        self._output_key = output_key
        self._lock = threading.Lock()  # an interpreter runs one call at a time

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self._lock:
            out: np.ndarray = self._runner(images=images)[self._output_key]
        return out


def load_version(
    model_dir: Path, version: int, device: str, runtime: str = "auto", threads: int = 0
) -> LoadedModel:
    """Load ``model_dir/version`` on ``runtime``, check its signature and outputs, warm it up.

    Raises:
        ModelLoadError: the version is missing, is not a valid SavedModel, has the wrong
            signature, gives probabilities that do not sum to 1, misclassifies its own
            golden images (``golden.npz`` beside it, when present), or (runtime ``litert``)
            cannot be compiled for LiteRT or answers differently from the SavedModel.
    """
    import tensorflow as tf

    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")

    path = model_dir / str(version)
    started = time.perf_counter()
    try:
        metadata = _read_metadata(path)
        probes = _Probes.for_version(path)  # an unreadable golden.npz fails the version here
        with tf.device(device):
            loaded = tf.saved_model.load(str(path))
        fn = loaded.signatures[SIGNATURE]
    except KeyError:
        raise ModelLoadError(f"version {version}: no '{SIGNATURE}' signature") from None
    except ModelLoadError:
        raise
    except Exception as err:  # TF raises many types for a broken SavedModel
        raise ModelLoadError(f"version {version}: cannot load ({type(err).__name__})") from err
    output_key = _check_signature(version, fn)
    reference = _TensorFlowRunner(loaded, fn, output_key, device)
    model = LoadedModel(version, path, device, "tensorflow", metadata, reference)
    if runtime == "litert" or (runtime == "auto" and device == CPU):
        try:
            compiled = _LiteRTRunner(path, output_key, threads or os.cpu_count() or 1)
            _check_same_outputs(compiled, reference, probes)
            model = LoadedModel(version, path, CPU, "litert", metadata, compiled)
        except Exception as err:
            reason = (
                str(err) if isinstance(err, ModelLoadError)
                else "ai-edge-litert is not installed" if isinstance(err, ImportError)
                else f"cannot compile ({type(err).__name__})"
            )  # fmt: skip
            if runtime == "litert":
                raise ModelLoadError(f"version {version}: LiteRT: {reason}") from err
            log.warning("version %d on TensorFlow: LiteRT unusable (%s)", version, reason)
    _check_outputs(model, probes)
    log.info(
        "loaded model version %d (%s) on %s with %s in %.2fs",
        version,
        model.architecture,
        model.device,
        model.runtime,
        time.perf_counter() - started,
    )
    return model


def _read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        return {}
    try:
        data = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{meta_path}: unreadable metadata ({err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{meta_path}: metadata is not a JSON object")
    return data


def _check_signature(version: int, fn: Any) -> str:
    import tensorflow as tf

    _, kwargs = fn.structured_input_signature
    if list(kwargs) != ["images"]:
        raise ModelLoadError(f"version {version}: signature inputs {list(kwargs)} != ['images']")
    spec = kwargs["images"]
    if spec.dtype != tf.uint8 or spec.shape.as_list() != [None, *INPUT_SHAPE]:
        raise ModelLoadError(
            f"version {version}: input is {spec.dtype.name}{spec.shape.as_list()}, "
            "expected uint8[None, 28, 28]"
        )
    outputs = fn.structured_outputs
    if len(outputs) != 1:
        raise ModelLoadError(f"version {version}: expected one output, got {sorted(outputs)}")
    key, out_spec = next(iter(outputs.items()))
    if out_spec.dtype != tf.float32 or out_spec.shape.as_list()[1:] != [NUM_CLASSES]:
        raise ModelLoadError(
            f"version {version}: output is {out_spec.dtype.name}{out_spec.shape.as_list()}, "
            "expected float32[None, 10]"
        )
    return str(key)


@dataclass(frozen=True)
class _Probes:
    """The images a version is checked on when it loads: read once, used by every check."""

    warmup: list[np.ndarray]  # random images at a few batch sizes
    golden: tuple[np.ndarray, np.ndarray] | None  # golden.npz images and labels, when present

    @classmethod
    def for_version(cls, path: Path) -> _Probes:
        rng = np.random.default_rng(0)
        warmup = [rng.integers(0, 256, (n, *INPUT_SHAPE), dtype=np.uint8) for n in _WARMUP_SIZES]
        golden = None
        if (path / "golden.npz").is_file():
            with np.load(path / "golden.npz") as data:
                golden = data["images"], data["labels"]
        return cls(warmup, golden)


def _check_same_outputs(compiled: PredictFn, reference: PredictFn, probes: _Probes) -> None:
    """The compiled model must give the SavedModel's probabilities on every probe image."""
    batches = probes.warmup + ([probes.golden[0]] if probes.golden else [])
    for images in batches:
        diff = float(np.abs(compiled(images) - reference(images)).max())
        if not diff <= _LITERT_TOLERANCE:
            raise ModelLoadError(f"outputs differ from the SavedModel's by {diff:.2g}")


def _check_outputs(model: LoadedModel, probes: _Probes) -> None:
    """Warm up at a few batch sizes and check the answers make sense."""
    for images in probes.warmup:
        n = len(images)
        probs = model.predict(images)
        if probs.shape != (n, NUM_CLASSES):
            raise ModelLoadError(f"version {model.version}: output shape {probs.shape} for {n}")
        if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ModelLoadError(f"version {model.version}: probabilities do not sum to 1")
    if probes.golden is not None:
        images, labels = probes.golden
        predicted = model.predict(images).argmax(axis=1)
        accuracy = float((predicted == labels).mean())
        required = float(model.metadata.get("golden_min_accuracy", 0.9))
        if accuracy < required:
            raise ModelLoadError(
                f"version {model.version}: golden-set accuracy {accuracy:.3f} < {required:.3f}"
            )
