"""MNIST loading: the four IDX files from a folder, checked, or the standard download.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header of two zero bytes, a
type code (0x08 = unsigned byte), the number of dimensions, then one 32-bit big-endian size
per dimension, then the data. Files may be gzipped (``.gz``), as they are distributed.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_client.contract import IMAGE_SHAPE, NUM_CLASSES

_UBYTE = 0x08
_IMAGES_NDIM = 3
_LABELS_NDIM = 1

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
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
    """Parse one IDX file (plain or gzipped) into a uint8 array, checking header and length."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DatasetError(f"{path}: not a valid gzip file ({err})") from None

    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero1 or zero2 or type_code != _UBYTE or ndim != expected_ndim:
        expected_magic = (_UBYTE << 8) | expected_ndim
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{expected_magic:08x})"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_len = int(np.prod(dims, dtype=np.int64))
    body_len = len(raw) - header_len
    if body_len != expected_len:
        what = "truncated" if body_len < expected_len else "trailing bytes after data"
        raise DatasetError(
            f"{path}: {what}: header declares {dims} = {expected_len} bytes, file has {body_len}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        candidate = data_dir / name
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{data_dir / stem}: file not found (nor {stem}.gz)")


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
        images = read_idx(img_path, _IMAGES_NDIM)
        labels = read_idx(lbl_path, _LABELS_NDIM)
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
