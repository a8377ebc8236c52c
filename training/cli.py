"""``python -m training``: train an architecture on MNIST and export a new model version."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Spelled out here so that --help and bad-flag errors need no TensorFlow import; a test checks
# they match training.models.ARCHITECTURES and training.pipeline.STRATEGIES.
ARCHS = ("cnn", "mlp", "mlp50")
STRATEGIES = ("default", "mirrored")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train a Keras model on MNIST and export it as MODEL_DIR/<next version>/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", choices=ARCHS, default="cnn", help="model architecture")
    p.add_argument(
        "--data-dir", type=Path, default=None,
        help="folder with the four MNIST IDX files (.gz or not); default: standard download",
    )  # fmt: skip
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="versioned model folder")
    p.add_argument("--epochs", type=_positive, help="most epochs (default: per architecture)")
    p.add_argument("--batch-size", type=_positive, help="per-replica batch size")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--limit", type=_positive, help="train on the first N images only (quick runs)")
    p.add_argument("--validation-split", type=float, default=0.1, help="held-out fraction")
    p.add_argument(
        "--strategy", choices=STRATEGIES, default="default",
        help="tf.distribute: mirrored = data-parallel over this machine's GPUs",
    )  # fmt: skip
    p.add_argument(
        "--cpu-replicas", type=_positive, default=1,
        help="with --strategy mirrored and no GPU: split the CPU into this many replicas",
    )  # fmt: skip
    p.add_argument("--version", type=_positive, help="version number (default: next free)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch progress")
    return p


def _unwritable(model_dir: Path) -> str | None:
    """Why this process cannot create versions in ``model_dir`` (None: it can), said before
    minutes of training, not after: typically a Docker bind mount that Docker created as root
    while the container runs as another user."""
    folder = model_dir.absolute()
    try:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # the first existing folder decides whether it can be made
        if os.access(folder, os.W_OK | os.X_OK):
            return None
        owner = f"the folder belongs to uid {folder.stat().st_uid}"
    except PermissionError:  # a folder above it cannot even be looked into
        owner = "a folder above it cannot be looked into"
    return (
        f"{folder}: not writable by this process (uid {os.getuid()}; {owner}). With Docker, "
        "create the host folder first and run the container as its owner: "
        'mkdir -p models && docker run --user "$(id -u):$(id -g)" ...'
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m training`` and the ``mnist-train`` script."""
    args = build_parser().parse_args(argv)
    if not 0.0 < args.validation_split < 0.5:
        print("error: --validation-split must be between 0 and 0.5", file=sys.stderr)
        return 2
    if args.cpu_replicas > 1 and args.strategy != "mirrored":
        print("error: --cpu-replicas needs --strategy mirrored", file=sys.stderr)
        return 2
    if args.version is not None and (args.model_dir / str(args.version)).exists():
        print(f"error: {args.model_dir / str(args.version)}: version already exists",
              file=sys.stderr)  # fmt: skip
        return 1
    unwritable = _unwritable(args.model_dir)
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from training.data import DatasetError, load_mnist
    from training.export import ExportError

    started = time.perf_counter()
    try:
        data = load_mnist(args.data_dir).limited(args.limit)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    if importlib.util.find_spec("tensorflow") is None:
        print("error: training needs TensorFlow: pip install 'mnist-serving[train]'",
              file=sys.stderr)  # fmt: skip
        return 1
    from training.pipeline import TrainConfig, train

    config = TrainConfig(
        arch=args.arch,
        model_dir=args.model_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        validation_split=args.validation_split,
        strategy=args.strategy,
        cpu_replicas=args.cpu_replicas,
        version=args.version,
        verbose=0 if args.quiet else 2,
    )
    try:
        result = train(config, data)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    total = time.perf_counter() - started
    print(
        "\n".join(
            [
                "",
                f"  model version  {result.version}  ({args.arch}, "
                f"{result.metadata['parameters']:,} parameters)",
                f"  written to     {result.path}",
                f"  test accuracy  {result.test_accuracy:.4f}   test loss {result.test_loss:.4f}",
                f"  epochs         {result.epochs_run} (best weights restored), "
                f"training {result.train_seconds:.0f}s, total {total:.0f}s",
                f"  data           {data.source} ({len(data.x_train)} train, "
                f"{len(data.x_test)} test)",
                f"  report         {result.report_dir}/ (curves, confusion matrix, "
                "misclassified, classification report)",
                "",
            ]
        )
    )
    return 0
