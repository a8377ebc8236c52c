"""IDX parsing on the real MNIST files and on hand-made corrupt ones."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from training.data import DatasetError, load_idx_dir, read_idx


def _idx(dims: tuple[int, ...], body: bytes, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body


def _write_set(folder: Path, n: int = 5, labels: bytes | None = None, gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": _idx(
            (n, 28, 28), rng.integers(0, 256, n * 784, np.uint8).tobytes()
        ),
        "train-labels-idx1-ubyte": _idx((n,), labels if labels is not None else bytes(range(n))),
        "t10k-images-idx3-ubyte": _idx((2, 28, 28), bytes(2 * 784)),
        "t10k-labels-idx1-ubyte": _idx((2,), b"\x01\x02"),
    }
    for name, data in files.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def test_real_mnist_files_parse(mnist_dir: Path) -> None:
    data = load_idx_dir(mnist_dir)
    assert data.x_train.shape == (60000, 28, 28) and data.x_train.dtype == np.uint8
    assert data.y_train.shape == (60000,) and data.x_test.shape == (10000, 28, 28)
    assert set(np.unique(data.y_test).tolist()) == set(range(10))
    assert np.bincount(data.y_train).min() > 5000  # every digit well represented
    assert len(data.checksums) == 4 and all(len(v) == 64 for v in data.checksums.values())
    # MNIST digits are white on black: borders dark, centres bright
    assert data.x_test[:, 0, :].mean() < 1 and data.x_test[:, 10:18, 10:18].mean() > 60


@pytest.mark.parametrize("gz", [False, True])
def test_plain_and_gzipped_sets_load(tmp_path: Path, gz: bool) -> None:
    data = load_idx_dir(_write_set(tmp_path / "d", gz=gz))
    assert data.x_train.shape == (5, 28, 28) and data.y_train.tolist() == [0, 1, 2, 3, 4]


def test_limited_takes_the_first_images(tmp_path: Path) -> None:
    data = load_idx_dir(_write_set(tmp_path / "d")).limited(3)
    assert len(data.x_train) == 3 and data.y_train.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x00", "truncated IDX header"),
        (_idx((2, 28, 28), bytes(784), type_code=0x0D), "bad IDX magic number 0x00000d03"),
        (_idx((2, 28), bytes(56)), "bad IDX magic number 0x00000802 (expected 0x00000803)"),
        (_idx((2, 28, 28), bytes(784 * 2 - 1)), "truncated: header declares (2, 28, 28)"),
        (_idx((2, 28, 28), bytes(784 * 2 + 3)), "trailing bytes after data"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
    ],
)
def test_corrupt_idx_is_a_one_line_error_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read_idx(path, 3)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_gzip_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="not a valid gzip file"):
        read_idx(path, 3)


def test_truncated_real_file_is_reported(tmp_path: Path, mnist_dir: Path) -> None:
    folder = tmp_path / "d"
    shutil.copytree(mnist_dir, folder)
    target = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz: truncated"):
        load_idx_dir(folder)


def test_label_out_of_range(tmp_path: Path) -> None:
    folder = _write_set(tmp_path / "d", labels=b"\x00\x01\x0c\x03\x04")
    with pytest.raises(DatasetError, match="label 12 at index 2 is outside 0-9"):
        load_idx_dir(folder)


def test_count_mismatch(tmp_path: Path) -> None:
    folder = _write_set(tmp_path / "d")
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx((4,), bytes(4)))
    with pytest.raises(DatasetError, match="4 labels for 5 images"):
        load_idx_dir(folder)


def test_missing_directory_and_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data directory not found"):
        load_idx_dir(tmp_path / "nope")
    folder = _write_set(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte: file not found"):
        load_idx_dir(folder)
