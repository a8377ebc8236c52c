"""The model contract: what a model version is, shared by training, the server and the SDK.

Training writes versions that satisfy it, the server checks every version against it before
serving, and the SDK builds requests from it. It needs nothing but the standard library, so
importing it costs the SDK (and the TensorFlow-free server) nothing.

A model version is a folder ``MODEL_DIR/<N>/`` (N a positive integer) holding
``metadata.json`` and at least one model file:

* ``saved_model.pb`` (+ ``variables/``): a TensorFlow SavedModel whose ``serving_default``
  signature takes ``images`` and returns ``probabilities``;
* ``model.tflite``: the same signature compiled for LiteRT (the CPU runtime, no TensorFlow);
* ``model.keras``: the Keras 3 model, for the Keras runtime on a JAX backend (GPU).

and ``golden.npz`` (``images``, ``labels``): test digits the model reads correctly, which the
server re-checks before it serves the version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMAGE_SIDE = 28
IMAGE_SHAPE = (IMAGE_SIDE, IMAGE_SIDE)
IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE
NUM_CLASSES = 10

SIGNATURE = "serving_default"
INPUT_NAME = "images"
INPUT_DTYPE = "uint8"
OUTPUT_NAME = "probabilities"
OUTPUT_DTYPE = "float32"
# -1: any batch size
INPUT_SHAPE = (-1, *IMAGE_SHAPE)
OUTPUT_SHAPE = (-1, NUM_CLASSES)

SAVED_MODEL_FILE = "saved_model.pb"
TFLITE_FILE = "model.tflite"
KERAS_FILE = "model.keras"
METADATA_FILE = "metadata.json"
GOLDEN_FILE = "golden.npz"
MODEL_FILES = (SAVED_MODEL_FILE, TFLITE_FILE, KERAS_FILE)

# The largest difference from the SavedModel's probabilities a compiled or converted model may
# have, on the golden images, to be written (training) or served (server).
EXPORT_TOLERANCE = 1e-4


class ContractError(ValueError):
    """A version's metadata disagrees with the contract; the message says how."""


def signature_block() -> dict[str, Any]:
    """The ``signature`` entry the trainer writes into ``metadata.json``."""
    return {
        "name": SIGNATURE,
        "inputs": {INPUT_NAME: {"dtype": INPUT_DTYPE, "shape": list(INPUT_SHAPE)}},
        "outputs": {OUTPUT_NAME: {"dtype": OUTPUT_DTYPE, "shape": list(OUTPUT_SHAPE)}},
    }


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise :class:`ContractError` when ``metadata`` describes another contract.

    Metadata without a ``signature`` block (hand-made versions) is accepted: the server still
    checks the model itself.
    """
    signature = metadata.get("signature")
    if signature is None:
        return
    if signature != signature_block():
        raise ContractError(
            f"metadata signature {signature!r} differs from this server's contract "
            f"{signature_block()!r}"
        )
    for key in ("architecture", "test_accuracy"):
        if key not in metadata:
            raise ContractError(f"metadata lacks {key!r}")
