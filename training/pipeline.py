"""The training run: data -> model -> fit -> evaluate -> export a new version with its report.

``train`` reads as the run does: fit (``_fit``), evaluate, then write the version
(``_write_version``: model files checked against each other, report, golden images,
metadata) and publish it with one rename.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mnist_client.contract import GOLDEN_FILE, METADATA_FILE, signature_block
from server.monitoring import PROFILE_FILE, Profile
from server.versions import FILES_KEY, file_checksums
from training import export
from training.artifacts import write_model_files
from training.data import Mnist
from training.models import ARCHITECTURES, ArchSpec
from training.report import Evaluation, evaluate, write_report

log = logging.getLogger(__name__)

# "multi-worker" (MultiWorkerMirroredStrategy) is not offered: Keras 3's fit() fails under it
# with any input (keras-team/keras#20585, tensorflow/tensorflow#72388), so it never trained.
STRATEGIES = ("default", "mirrored")
GOLDEN_IMAGES = 100


@dataclass(frozen=True)
class TrainConfig:
    """What one run trains and where it writes."""

    arch: str
    model_dir: Path
    epochs: int | None = None  # None: the architecture's default
    batch_size: int | None = None
    seed: int = 42
    validation_split: float = 0.1
    strategy: str = "default"
    cpu_replicas: int = 1  # mirrored on a machine without GPUs: split the CPU into this many
    version: int | None = None  # None: next free number
    verbose: int = 2


@dataclass(frozen=True)
class TrainResult:
    """What the run produced."""

    version: int
    path: Path
    test_accuracy: float
    test_loss: float
    epochs_run: int
    train_seconds: float
    report_dir: Path
    metadata: dict[str, Any]


def make_strategy(name: str, cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``--strategy``.

    ``mirrored`` replicates the model on every GPU of this machine; without GPUs, on
    ``cpu_replicas`` logical CPU devices (the same data-parallel path, for a machine or a test
    without GPUs). Must run before TensorFlow has initialised its devices.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus and cpu_replicas > 1:
            log.warning("--cpu-replicas ignored: mirroring over %d GPU(s) instead", len(gpus))
        if not gpus and cpu_replicas > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
            )
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            return tf.distribute.MirroredStrategy(devices)
        return tf.distribute.MirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def _split(data: Mnist, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Hold out a seeded random ``fraction`` of the training images for validation."""
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    n_val = max(1, round(len(order) * fraction))
    val, train = order[:n_val], order[n_val:]
    return data.x_train[train], data.y_train[train], data.x_train[val], data.y_train[val]


def _versions() -> dict[str, str]:
    import matplotlib
    import sklearn

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "matplotlib": matplotlib.__version__,
    }


@dataclass(frozen=True)
class _Fitted:
    model: keras.Model
    history: dict[str, list[float]]
    train_seconds: float
    replicas: int
    global_batch: int
    epochs: int
    train_images: int
    validation_images: int


def _fit(config: TrainConfig, spec: ArchSpec, data: Mnist, staging: Path) -> _Fitted:
    """Build the architecture under the configured strategy and fit it (early stopping,
    best weights restored, best checkpoint kept in ``staging/checkpoint/``)."""
    epochs = config.epochs or spec.epochs
    x_train, y_train, x_val, y_val = _split(data, config.validation_split, config.seed)
    strategy = make_strategy(config.strategy, config.cpu_replicas)
    global_batch = (config.batch_size or spec.batch_size) * strategy.num_replicas_in_sync
    steps_per_epoch = int(np.ceil(len(x_train) / global_batch))
    with strategy.scope():
        model = spec.build(steps_per_epoch, epochs)
    checkpoint = staging / "checkpoint" / "best.keras"
    checkpoint.parent.mkdir()
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=spec.patience, restore_best_weights=True
        ),
        keras.callbacks.ModelCheckpoint(str(checkpoint), monitor="val_loss", save_best_only=True),
    ]
    log.info(
        "training %s (%d parameters) on %d images, validating on %d, %d epochs max, "
        "batch %d, strategy %s (%d replicas)",
        config.arch, model.count_params(), len(x_train), len(x_val), epochs, global_batch,
        config.strategy, strategy.num_replicas_in_sync,
    )  # fmt: skip
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=global_batch,
        epochs=epochs,
        validation_data=(x_val, y_val),
        callbacks=callbacks,
        verbose=config.verbose,
    )
    return _Fitted(
        model, history.history, time.perf_counter() - started, strategy.num_replicas_in_sync,
        global_batch, epochs, len(x_train), len(x_val),
    )  # fmt: skip


def _metadata(
    config: TrainConfig, spec: ArchSpec, fitted: _Fitted, ev: Evaluation, data: Mnist
) -> dict[str, Any]:
    per_class = ev.per_class()
    return {
        "architecture": config.arch,
        "description": spec.description,
        "parameters": int(fitted.model.count_params()),
        "test_accuracy": round(ev.accuracy, 6),
        "test_loss": round(ev.loss, 6),
        "per_class": {
            d: {k: round(per_class[d][k], 6) for k in ("precision", "recall", "f1-score")}
            for d in map(str, range(10))
        },
        "train_seconds": round(fitted.train_seconds, 2),
        "epochs_run": len(fitted.history["loss"]),
        "epochs_max": fitted.epochs,
        "batch_size": fitted.global_batch,
        "seed": config.seed,
        "strategy": config.strategy,
        "replicas": fitted.replicas,
        "train_images": fitted.train_images,
        "validation_images": fitted.validation_images,
        "test_images": len(data.x_test),
        "best_val_loss": round(float(min(fitted.history["val_loss"])), 6),
        "dataset": {"source": data.source, "sha256": data.checksums},
        "golden_min_accuracy": 1.0,
        "signature": signature_block(),
        "versions": _versions(),
        "command": " ".join(sys.argv),
    }


def _write_version(
    config: TrainConfig, spec: ArchSpec, fitted: _Fitted, ev: Evaluation, data: Mnist,
    staging: Path,
) -> tuple[int, Path, dict[str, Any]]:  # fmt: skip
    """Model files, report, golden images and metadata into ``staging``; then publish it."""
    # images the model gets right, so the server can re-check the exported files on load
    right = np.flatnonzero(ev.predicted == ev.labels)[:GOLDEN_IMAGES]
    golden_images = data.x_test[right]
    metadata = _metadata(config, spec, fitted, ev, data)
    metadata["exports"] = write_model_files(fitted.model, staging, golden_images)
    title = f"{config.arch}, test accuracy {ev.accuracy:.4f}"
    write_report(staging / "report", fitted.history, ev, data.x_test, title)
    np.savez_compressed(staging / GOLDEN_FILE, images=golden_images, labels=data.y_test[right])
    # the reference the server's model monitoring compares live traffic with (server.monitoring)
    profile = Profile.build(data.x_test, ev.probabilities)
    (staging / PROFILE_FILE).write_text(json.dumps(profile.to_json()) + "\n")
    claimed = config.model_dir / str(export.claim_version(config.model_dir, config.version))
    try:
        version = int(claimed.name)
        metadata["version"] = version
        metadata["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        # last: what makes the version complete for a server (server.versions)
        metadata[FILES_KEY] = file_checksums(staging)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        return version, export.publish(staging, config.model_dir, version), metadata
    except BaseException:
        export.discard(claimed)
        raise


def train(config: TrainConfig, data: Mnist) -> TrainResult:
    """Train ``config.arch`` on ``data``, evaluate on its test set, export a new version.

    Nothing half-written is left in the model directory if anything fails: the run works in a
    hidden staging folder that is removed on error.
    """
    spec = ARCHITECTURES[config.arch]
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    staging = export.make_staging_dir(config.model_dir)
    try:
        fitted = _fit(config, spec, data, staging)
        ev = evaluate(fitted.model.predict(data.x_test, batch_size=1024, verbose=0), data.y_test)
        epochs_run = len(fitted.history["loss"])
        version, final, metadata = _write_version(config, spec, fitted, ev, data, staging)
        return TrainResult(version, final, ev.accuracy, ev.loss, epochs_run,
                           fitted.train_seconds, final / "report", metadata)  # fmt: skip
    except BaseException:
        export.discard(staging)
        raise
