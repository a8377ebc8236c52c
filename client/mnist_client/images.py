"""Turn what callers hold (arrays, bytes, image files, PIL images) into 784-byte MNIST images.

MNIST digits are white (255) on black (0), scaled to fit a 20x20 box and centred by their
centre of mass in a 28x28 frame. Arrays and bytes are taken as they are (they are assumed to
be in that form already); files and PIL images of another size or polarity are converted the
same way MNIST itself was made, so a photo of a dark digit on white paper reads correctly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from mnist_client.contract import IMAGE_BYTES, IMAGE_SIDE

_DIGIT_BOX = 20


class ImageError(ValueError):
    """An input cannot be turned into a 28x28 uint8 image."""


def _from_array(arr: np.ndarray) -> bytes:
    if arr.shape not in ((IMAGE_SIDE, IMAGE_SIDE), (IMAGE_BYTES,)):
        raise ImageError(f"image array has shape {arr.shape}, expected (28, 28) or (784,)")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise ImageError(
                f"image array has dtype {arr.dtype}; pass uint8 pixels 0-255 "
                "(for floats in 0-1 use (x * 255).round().astype(np.uint8))"
            )
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ImageError("image array has values outside 0-255")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr).tobytes()


def _from_pil(img: Any) -> bytes:
    """Grayscale, white-on-black, digit fitted into 20x20 and centred by mass in 28x28."""
    from PIL import Image

    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    if gray.shape == (IMAGE_SIDE, IMAGE_SIDE) and _border_mean(gray) < 128:
        return gray.tobytes()  # already MNIST-shaped
    if _border_mean(gray) >= 128:  # dark ink on light paper
        gray = 255 - gray
    ink = gray > 30
    if not ink.any():
        return np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.uint8).tobytes()
    rows, cols = np.nonzero(ink)
    digit = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = digit.shape
    scale = _DIGIT_BOX / max(h, w)
    new_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(digit).resize(new_size, Image.Resampling.LANCZOS))
    out = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float64)
    total = digit.sum()
    ys, xs = np.indices(digit.shape)
    cy = (ys * digit).sum() / total if total else digit.shape[0] / 2
    cx = (xs * digit).sum() / total if total else digit.shape[1] / 2
    top = int(np.clip(round(IMAGE_SIDE / 2 - cy), 0, IMAGE_SIDE - digit.shape[0]))
    left = int(np.clip(round(IMAGE_SIDE / 2 - cx), 0, IMAGE_SIDE - digit.shape[1]))
    out[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return np.clip(out, 0, 255).astype(np.uint8).tobytes()


def _border_mean(gray: np.ndarray) -> float:
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(border.mean())


def _from_path(path: str | os.PathLike[str]) -> bytes:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raw = _read_raw(path)
        if raw is None:
            raise ImageError(f"{path}: reading image files needs Pillow") from None
        return raw
    try:
        with Image.open(path) as img:
            return _from_pil(img)
    except UnidentifiedImageError:
        raw = _read_raw(path)
        if raw is None:
            raise ImageError(f"{path}: neither an image file nor 784 raw bytes") from None
        return raw
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None


def _read_raw(path: str | os.PathLike[str]) -> bytes | None:
    try:
        data = open(path, "rb").read()  # noqa: SIM115 - small file, closed by refcount
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None
    return data if len(data) == IMAGE_BYTES else None


def to_image_bytes(image: Any) -> bytes:
    """One image as the 784 bytes the service takes.

    Accepts a ``(28, 28)`` or ``(784,)`` uint8 array, 784 bytes, a file path (PNG, JPEG, ...,
    needs Pillow; or a file of 784 raw bytes), or a PIL image.
    """
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if len(data) != IMAGE_BYTES:
            raise ImageError(f"image has {len(data)} bytes, expected {IMAGE_BYTES} (28x28 uint8)")
        return data
    if isinstance(image, (str, os.PathLike)):
        return _from_path(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image, without importing PIL
        return _from_pil(image)
    raise ImageError(f"cannot read an image from {type(image).__name__}")


def to_batch(images: Any) -> list[bytes]:
    """Many images as a list of 784-byte strings; a ``[N, 28, 28]`` uint8 array is the fast path."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or images.dtype != np.uint8:
            raise ImageError(
                f"batch array is {images.dtype}{images.shape}, expected uint8[N,28,28]"
            )
        flat = np.ascontiguousarray(images).reshape(len(images), IMAGE_BYTES)
        return [row.tobytes() for row in flat]
    if not isinstance(images, Iterable) or isinstance(images, (bytes, str)):
        raise ImageError("batch_predict takes a sequence of images or a uint8 [N, 28, 28] array")
    return [to_image_bytes(img) for img in images]
