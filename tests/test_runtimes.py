"""The two model runtimes: LiteRT (the SavedModel compiled for XNNPACK) and TensorFlow."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from server.model import CPU, ModelLoadError, load_version


def test_litert_gives_the_savedmodels_probabilities(
    trained_model_dir: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test
    on_tf = load_version(trained_model_dir, 1, CPU, "tensorflow")
    on_litert = load_version(trained_model_dir, 1, CPU, "litert", threads=2)
    auto = load_version(trained_model_dir, 1, CPU, "auto")
    assert (on_tf.runtime, on_litert.runtime, auto.runtime) == ("tensorflow", "litert", "litert")
    expected = on_tf.predict(x)
    # batch sizes change from call to call, as they do under the batcher
    for start, stop in ((0, 1), (1, 257), (257, 264), (264, 2000), (0, 1)):
        got = on_litert.predict(x[start:stop])
        assert got.shape == (stop - start, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[start:stop], atol=1e-5)


def test_without_litert_auto_falls_back_and_litert_refuses(
    trained_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a platform with no ai-edge-litert wheel: importing it fails
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    model = load_version(trained_model_dir, 1, CPU, "auto")
    assert model.runtime == "tensorflow"
    assert model.predict(np.zeros((3, 28, 28), np.uint8)).shape == (3, 10)
    with pytest.raises(ModelLoadError, match="version 1: LiteRT: ai-edge-litert is not installed"):
        load_version(trained_model_dir, 1, CPU, "litert")


def test_unknown_runtime_is_refused(trained_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="runtime 'onnx'"):
        load_version(trained_model_dir, 1, CPU, "onnx")
