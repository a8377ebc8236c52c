"""The model files of a version, each checked against the SavedModel before it is kept.

* ``saved_model.pb`` + ``variables/``: the SavedModel, whose ``serving_default`` signature
  takes uint8 ``images [None, 28, 28]`` and returns float32 ``probabilities [None, 10]``
  (scaling happens in the graph). It is the reference the others are checked against.
* ``model.tflite``: that signature compiled for LiteRT, the server's CPU runtime (no
  TensorFlow needed to serve it).
* ``model.keras``: the Keras 3 model, for the server's Keras runtime (JAX backend, GPU).

A compiled or converted file is kept only if its probabilities on the version's golden images
match the SavedModel's within :data:`~mnist_client.contract.EXPORT_TOLERANCE`; the largest
difference and the file's SHA-256 go into the metadata (``exports``), and the server
re-checks both before it serves the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mnist_client.contract import (
    EXPORT_TOLERANCE,
    IMAGE_SHAPE,
    INPUT_NAME,
    KERAS_FILE,
    OUTPUT_NAME,
    SIGNATURE,
    TFLITE_FILE,
)
from server.runtimes.litert import LiteRTRuntime, convert_saved_model
from server.verify import max_difference
from training.export import ExportError


def save_saved_model(model: keras.Model, path: Path) -> None:
    """Write ``model`` as a SavedModel whose serving signature takes raw uint8 images."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE,
        fn=lambda images: {OUTPUT_NAME: model(images, training=False)},
        input_signature=[
            tf.TensorSpec(shape=(None, *IMAGE_SHAPE), dtype=tf.uint8, name=INPUT_NAME)
        ],
    )
    archive.write_out(str(path), verbose=False)


def _saved_model_predict(path: Path) -> Any:
    fn = tf.saved_model.load(str(path)).signatures[SIGNATURE]
    return lambda images: fn(images=tf.constant(images))[OUTPUT_NAME].numpy()


def _record(path: Path, diff: float) -> dict[str, Any]:
    data = path.read_bytes()
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "max_abs_diff": diff,
    }


def _checked(name: str, diff: float) -> float:
    if not diff <= EXPORT_TOLERANCE:
        raise ExportError(
            f"{name}: probabilities differ from the SavedModel's by {diff:.2g} on the golden "
            f"images (tolerance {EXPORT_TOLERANCE:g}); not exported"
        )
    return diff


def write_model_files(model: keras.Model, folder: Path, golden: np.ndarray) -> dict[str, Any]:
    """Write the SavedModel, ``model.tflite`` and ``model.keras`` into ``folder``.

    Returns the ``exports`` metadata entry: per derived file its SHA-256, size and largest
    difference from the SavedModel on ``golden`` (uint8 ``[N, 28, 28]``).

    Raises:
        ExportError: a derived file answers differently from the SavedModel.
    """
    save_saved_model(model, folder)
    reference = _saved_model_predict(folder)
    probes = [golden, golden[:1]]  # the golden set, and batch size 1

    tflite = folder / TFLITE_FILE
    tflite.write_bytes(convert_saved_model(folder))
    compiled = LiteRTRuntime(tflite.read_bytes(), threads=1, max_batch=len(golden), source="")
    tflite_diff = _checked(TFLITE_FILE, max_difference(compiled.predict, reference, probes))

    keras_path = folder / KERAS_FILE
    model.save(keras_path)
    reloaded = keras.saving.load_model(keras_path)
    keras_diff = _checked(
        KERAS_FILE,
        max_difference(lambda x: np.asarray(reloaded(x, training=False)), reference, probes),
    )
    return {TFLITE_FILE: _record(tflite, tflite_diff), KERAS_FILE: _record(keras_path, keras_diff)}
