"""MNIST loading: the four IDX files from a folder, checked, or the standard download.

The IDX files (plain or gzipped, as distributed) are read by :mod:`mnist_client.idx`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_client import idx
from mnist_client.contract import IMAGE_SHAPE, NUM_CLASSES

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": (idx.TEST_IMAGES, idx.TEST_LABELS),
}


class DatasetError(Exception):
    """A data file is missing, corrupt or inconsistent; the message names the path."""


@dataclass(frozen=True)
class Mnist:
    """The MNIST train and test sets as uint8 images ``[N, 28, 28]`` and uint8 labels ``[N]``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    checksums: dict[str, str] = field(default_factory=dict)

    def limited(self, limit: int | None) -> Mnist:
        """The first ``limit`` training images (and at most as many test images); for quick runs."""
        if limit is None:
            return self
        n_test = min(limit, len(self.x_test))
        return Mnist(
            self.x_train[:limit],
            self.y_train[:limit],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.source,
            self.checksums,
        )


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """One IDX file as a uint8 array (see :mod:`mnist_client.idx`); errors as DatasetError."""
    try:
        return idx.read_idx(path, expected_ndim)
    except idx.IdxError as err:
        raise DatasetError(str(err)) from None


def _find(data_dir: Path, stem: str) -> Path:
    try:
        return idx.find(data_dir, stem)
    except idx.IdxError as err:
        raise DatasetError(str(err)) from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    if images.shape[1:] != IMAGE_SHAPE:
        raise DatasetError(f"{img_path}: images are {images.shape[1:]}, expected {IMAGE_SHAPE}")
    if len(images) != len(labels):
        raise DatasetError(
            f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path.name}"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DatasetError(f"{lbl_path}: label {int(labels[bad])} at index {bad} is outside 0-9")


def load_idx_dir(data_dir: Path) -> Mnist:
    """Load and check the four MNIST IDX files in ``data_dir``."""
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: data directory not found")
    arrays: dict[str, np.ndarray] = {}
    checksums: dict[str, str] = {}
    for split, (img_stem, lbl_stem) in SPLITS.items():
        img_path, lbl_path = _find(data_dir, img_stem), _find(data_dir, lbl_stem)
        images = read_idx(img_path, idx.IMAGES_NDIM)
        labels = read_idx(lbl_path, idx.LABELS_NDIM)
        _check_pair(images, labels, img_path, lbl_path)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
        checksums[img_path.name] = _sha256(img_path)
        checksums[lbl_path.name] = _sha256(lbl_path)
    return Mnist(source=str(data_dir.resolve()), checksums=checksums, **arrays)


def download_mnist() -> Mnist:
    """The standard download (``keras.datasets.mnist``), cached under ``~/.keras/datasets``."""
    import keras  # imported here: the IDX path needs no Keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as err:  # network errors come in many types; report one line
        raise DatasetError(
            f"standard MNIST download failed ({type(err).__name__}); "
            "pass --data-dir with the four IDX files instead"
        ) from None
    # get_file's default cache; KERAS_HOME moves it.
    keras_home = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    npz = keras_home / "datasets" / "mnist.npz"
    checksums = {npz.name: _sha256(npz)} if npz.is_file() else {}
    return Mnist(
        x_train.astype(np.uint8),
        y_train.astype(np.uint8),
        x_test.astype(np.uint8),
        y_test.astype(np.uint8),
        source="keras.datasets.mnist",
        checksums=checksums,
    )


def load_mnist(data_dir: Path | None) -> Mnist:
    """IDX files from ``data_dir`` when given, else the standard download."""
    return load_idx_dir(data_dir) if data_dir is not None else download_mnist()
