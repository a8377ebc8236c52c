"""Reading MNIST's IDX files (plain or gzipped), checked, into uint8 arrays.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian header of two zero bytes, a
type code (0x08 = unsigned byte), the number of dimensions, then one 32-bit big-endian size
per dimension, then the data. The training pipeline and the SDK's load tester both read them.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

UBYTE = 0x08
IMAGES_NDIM = 3
LABELS_NDIM = 1
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


class IdxError(ValueError):
    """A file is missing, is not IDX, or disagrees with its own header; names the path."""


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file (plain or gzipped) into a uint8 array, checking header and length."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdxError(f"{path}: file not found") from None
    except OSError as err:
        raise IdxError(f"{path}: cannot read ({err.strerror})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IdxError(f"{path}: not a valid gzip file ({err})") from None

    if len(raw) < 4:
        raise IdxError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    magic = int.from_bytes(raw[:4], "big")
    if zero1 or zero2 or type_code != UBYTE or ndim != expected_ndim:
        expected_magic = (UBYTE << 8) | expected_ndim
        raise IdxError(
            f"{path}: bad IDX magic number 0x{magic:08x} (expected 0x{expected_magic:08x})"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IdxError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected_len = int(np.prod(dims, dtype=np.int64))
    body_len = len(raw) - header_len
    if body_len != expected_len:
        what = "truncated" if body_len < expected_len else "trailing bytes after data"
        raise IdxError(
            f"{path}: {what}: header declares {dims} = {expected_len} bytes, file has {body_len}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def find(folder: Path, stem: str) -> Path:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for name in (stem, f"{stem}.gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise IdxError(f"{folder / stem}: file not found (nor {stem}.gz)")
