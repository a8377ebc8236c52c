"""Loading one model version from disk, checking it, and calling it on a batch.

A model directory holds integer versions: ``MODEL_DIR/1/``, ``MODEL_DIR/2/``, ... each a
TensorFlow SavedModel whose ``serving_default`` signature takes uint8 ``[None, 28, 28]`` and
returns float32 probabilities ``[None, 10]``, with a ``metadata.json`` beside it (written by the
training pipeline; optional here). Other names (``.tmp-*`` folders of a version being written)
are ignored, and so is a version folder without a complete ``saved_model.pb``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_SHAPE = (28, 28)
NUM_CLASSES = 10
SIGNATURE = "serving_default"
_WARMUP_SIZES = (1, 2, 7, 32)


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

    Must run before TensorFlow executes anything. Measured on 2 cores (bench/, three
    interleaved repeats): one thread made naive one-call-per-request serving 1.8x faster but
    left batched Predict unchanged and cut 1,024-image BatchPredict throughput by 40%, so the
    default stays TensorFlow's.
    """
    import os

    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        return threads
    return os.cpu_count() or 1


def pick_device() -> str:
    """The device batches run on: the first GPU TensorFlow sees, else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "/device:CPU:0"


@dataclass
class LoadedModel:
    """One loaded, warmed-up and checked model version, ready to be called on batches."""

    version: int
    path: Path
    device: str
    metadata: dict[str, Any]
    _fn: Any = field(repr=False)
    _output_key: str = field(repr=False)
    _module: Any = field(repr=False)  # the loaded SavedModel: keeps _fn's variables alive
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
        import tensorflow as tf

        with tf.device(self.device):
            out = self._fn(images=tf.constant(images))[self._output_key]
        return out.numpy()


def load_version(model_dir: Path, version: int, device: str) -> LoadedModel:
    """Load ``model_dir/version``, check its signature and outputs, and warm it up.

    Raises:
        ModelLoadError: the version is missing, is not a valid SavedModel, has the wrong
            signature, gives probabilities that do not sum to 1, or misclassifies its own
            golden images (``golden.npz`` beside it, when present).
    """
    import tensorflow as tf

    path = model_dir / str(version)
    started = time.perf_counter()
    try:
        metadata = _read_metadata(path)
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
    model = LoadedModel(version, path, device, metadata, fn, output_key, loaded)
    _check_outputs(model)
    log.info(
        "loaded model version %d (%s) on %s in %.2fs",
        version,
        model.architecture,
        device,
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


def _check_outputs(model: LoadedModel) -> None:
    """Warm up at a few batch sizes and check the answers make sense."""
    rng = np.random.default_rng(0)
    for n in _WARMUP_SIZES:
        probs = model.predict(rng.integers(0, 256, (n, *INPUT_SHAPE), dtype=np.uint8))
        if probs.shape != (n, NUM_CLASSES):
            raise ModelLoadError(f"version {model.version}: output shape {probs.shape} for {n}")
        if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ModelLoadError(f"version {model.version}: probabilities do not sum to 1")
    golden_path = model.path / "golden.npz"
    if golden_path.is_file():
        with np.load(golden_path) as golden:
            images, labels = golden["images"], golden["labels"]
        predicted = model.predict(images).argmax(axis=1)
        accuracy = float((predicted == labels).mean())
        required = float(model.metadata.get("golden_min_accuracy", 0.9))
        if accuracy < required:
            raise ModelLoadError(
                f"version {model.version}: golden-set accuracy {accuracy:.3f} < {required:.3f}"
            )
