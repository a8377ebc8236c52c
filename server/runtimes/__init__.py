"""Model runtimes, and the choice among them for ``--runtime``.

A runtime turns a version folder into something that computes a batch (:class:`Runtime`):

* ``litert``: ``model.tflite`` on the LiteRT interpreter, CPU; needs no TensorFlow.
* ``keras``: ``model.keras`` on Keras 3 with JAX, one compiled program per batch bucket; the
  GPU runtime where TensorFlow is not installed (and it runs on a CPU too).
* ``tensorflow``: the SavedModel itself, on a GPU where TensorFlow sees one.

``auto`` prefers LiteRT on a CPU; on a machine with an NVIDIA GPU, TensorFlow if it is
installed, else Keras/JAX if JAX sees the GPU. It falls back (with a warning naming each
runtime's reason) to the next runtime that is installed and can read the version, including
when a runtime's file is corrupt; but a file that fails the SHA-256 its metadata records
fails the whole version first (``server.versions``). Adding a runtime: a module here
with ``NAME``, ``available()`` and a loader returning a :class:`Runtime`, one entry in
:data:`RUNTIMES` and in :func:`load_runtime`; the version checks in ``server.verify`` apply to
it unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

from server.runtimes import keras, litert, tensorflow
from server.runtimes.base import Runtime, RuntimeUnusable

log = logging.getLogger(__name__)

RUNTIMES = ("auto", litert.NAME, keras.NAME, tensorflow.NAME)

__all__ = ["RUNTIMES", "Runtime", "RuntimeUnusable", "gpu_visible", "load_runtime"]


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU is present, checked without importing any framework."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def _order(setting: str) -> list[str]:
    if setting != "auto":
        return [setting]
    if gpu_visible():
        if tensorflow.available():
            return [tensorflow.NAME, keras.NAME, litert.NAME]
        return [keras.NAME, litert.NAME]
    return [litert.NAME, tensorflow.NAME, keras.NAME]


def load_runtime(setting: str, version_dir: Path, threads: int, max_batch: int) -> Runtime:
    """Load ``version_dir`` on the runtime ``setting`` names (or the best one, for ``auto``);
    ``setting`` is one of :data:`RUNTIMES` (``load_version`` checks).

    Raises:
        RuntimeUnusable: no runtime could load it; the message names each one's reason.
    """
    reasons = []
    for name in _order(setting):
        try:
            runtime = _load(name, version_dir, threads, max_batch, auto=setting == "auto")
        except RuntimeUnusable as err:
            reasons.append(f"{name}: {err}")
            continue
        except Exception as err:  # a corrupt file can make a loader raise anything
            if setting != "auto":
                raise
            log.debug("%s on %s failed", version_dir, name, exc_info=True)
            reasons.append(f"{name}: cannot read its file ({type(err).__name__}: {err})"[:300])
            continue
        if reasons:
            log.warning("%s served by %s: %s", version_dir, name, "; ".join(reasons))
        return runtime
    raise RuntimeUnusable("; ".join(reasons))


def _load(name: str, version_dir: Path, threads: int, max_batch: int, auto: bool) -> Runtime:
    if name == litert.NAME:
        return litert.load(
            version_dir, threads, max_batch, compile_if_missing=tensorflow.available()
        )
    if name == keras.NAME:  # auto wants it for a GPU; asked for by name, it runs anywhere
        return keras.load(version_dir, max_batch, require_gpu=auto and gpu_visible())
    return tensorflow.load(version_dir, threads)
