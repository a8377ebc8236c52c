"""The training run: data -> model -> fit -> evaluate -> export a new version with its report."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from training import export
from training.data import Mnist
from training.models import ARCHITECTURES
from training.report import evaluate, write_report

log = logging.getLogger(__name__)

STRATEGIES = ("default", "mirrored", "multi-worker")
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


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for ``--strategy`` (multi-worker reads ``TF_CONFIG``)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def is_chief() -> bool:
    """True unless TF_CONFIG names this process a non-chief worker (only the chief exports)."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    has_chief = "chief" in config.get("cluster", {})
    return kind == "chief" or (not has_chief and kind == "worker" and index == 0)


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


def train(config: TrainConfig, data: Mnist) -> TrainResult:
    """Train ``config.arch`` on ``data``, evaluate on its test set, export a new version.

    Nothing half-written is left in the model directory if anything fails: the run works in a
    hidden staging folder that is removed on error.
    """
    spec = ARCHITECTURES[config.arch]
    epochs = config.epochs or spec.epochs
    batch_size = config.batch_size or spec.batch_size
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()

    x_train, y_train, x_val, y_val = _split(data, config.validation_split, config.seed)
    strategy = make_strategy(config.strategy)
    global_batch = batch_size * strategy.num_replicas_in_sync
    steps_per_epoch = int(np.ceil(len(x_train) / global_batch))

    staging = export.make_staging_dir(config.model_dir)
    claimed: Path | None = None
    try:
        with strategy.scope():
            model = spec.build(steps_per_epoch, epochs)
        checkpoint = staging / "checkpoint" / "best.keras"
        checkpoint.parent.mkdir()
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=spec.patience, restore_best_weights=True
            ),
            keras.callbacks.ModelCheckpoint(
                str(checkpoint), monitor="val_loss", save_best_only=True
            ),
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
        train_seconds = time.perf_counter() - started
        epochs_run = len(history.history["loss"])

        probs = model.predict(data.x_test, batch_size=1024, verbose=0)
        ev = evaluate(probs, data.y_test)
        title = f"{config.arch}, test accuracy {ev.accuracy:.4f}"
        if not is_chief():  # workers train in lockstep; only the chief writes a version
            export.discard(staging)
            return TrainResult(0, staging, ev.accuracy, ev.loss, epochs_run, train_seconds,
                               staging, {})  # fmt: skip

        export.save_serving_model(model, staging)
        write_report(staging / "report", history.history, ev, data.x_test, title)
        # images the model gets right, so the server can re-check the exported graph on load
        right = np.flatnonzero(ev.predicted == ev.labels)[:GOLDEN_IMAGES]
        np.savez_compressed(
            staging / "golden.npz", images=data.x_test[right], labels=data.y_test[right]
        )
        per_class = ev.per_class()
        metadata: dict[str, Any] = {
            "architecture": config.arch,
            "description": spec.description,
            "parameters": int(model.count_params()),
            "test_accuracy": round(ev.accuracy, 6),
            "test_loss": round(ev.loss, 6),
            "per_class": {
                d: {k: round(per_class[d][k], 6) for k in ("precision", "recall", "f1-score")}
                for d in map(str, range(10))
            },
            "train_seconds": round(train_seconds, 2),
            "epochs_run": epochs_run,
            "epochs_max": epochs,
            "batch_size": global_batch,
            "seed": config.seed,
            "strategy": config.strategy,
            "replicas": strategy.num_replicas_in_sync,
            "train_images": len(x_train),
            "validation_images": len(x_val),
            "test_images": len(data.x_test),
            "best_val_loss": round(float(min(history.history["val_loss"])), 6),
            "dataset": {"source": data.source, "sha256": data.checksums},
            "golden_min_accuracy": 1.0,
            "signature": {
                "name": export.SIGNATURE,
                "inputs": {"images": {"dtype": "uint8", "shape": [-1, 28, 28]}},
                "outputs": {"probabilities": {"dtype": "float32", "shape": [-1, 10]}},
            },
            "versions": _versions(),
            "command": " ".join(sys.argv),
        }
        claimed = config.model_dir / str(export.claim_version(config.model_dir, config.version))
        version = int(claimed.name)
        metadata["version"] = version
        metadata["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        final = export.publish(staging, config.model_dir, version)
        claimed = None
        return TrainResult(version, final, ev.accuracy, ev.loss, epochs_run, train_seconds,
                           final / "report", metadata)  # fmt: skip
    except BaseException:
        export.discard(staging)
        if claimed is not None:
            export.discard(claimed)
        raise
