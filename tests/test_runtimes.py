"""The model runtimes: LiteRT from model.tflite (no TensorFlow), compiled at load, TensorFlow;
the choice among them, and the checks every version passes before it serves."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_client import DigitClient
from server.runtimes import keras as keras_runtime
from server.runtimes import litert, tensorflow
from server.versions import ModelLoadError, load_version
from tests.conftest import start_server

NO_TENSORFLOW = '''
import sys

class _NoTensorFlow:
    """Makes TensorFlow unimportable, as on a serving install without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoTensorFlow())
'''


def _copy_version(src: Path, dst_root: Path, version: int = 1) -> Path:
    dst = dst_root / str(version)
    shutil.copytree(src, dst)
    return dst


def _without_tflite(version: Path) -> Path:
    """``version`` as an export that never had a ``model.tflite`` (file and metadata)."""
    (version / "model.tflite").unlink()
    meta = json.loads((version / "metadata.json").read_text())
    del meta["files"]["model.tflite"], meta["exports"]["model.tflite"]
    (version / "metadata.json").write_text(json.dumps(meta))
    return version


def test_litert_gives_the_savedmodels_probabilities(
    trained_model_dir: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test
    on_tf = load_version(trained_model_dir, 1, "tensorflow")
    on_litert = load_version(trained_model_dir, 1, "litert", threads=2, max_batch=256)
    auto = load_version(trained_model_dir, 1, "auto")
    assert (on_tf.runtime_name, on_litert.runtime_name, auto.runtime_name) == (
        "tensorflow", "litert", "litert",
    )  # fmt: skip
    assert on_litert.runtime.source == "model.tflite"
    expected = on_tf.predict(x)
    # batch sizes change from call to call, as under the batcher: padded buckets, and more
    # images than the largest bucket holds
    for start, stop in ((0, 1), (1, 257), (257, 264), (264, 2000), (0, 1), (5, 8)):
        got = on_litert.predict(x[start:stop])
        assert got.shape == (stop - start, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[start:stop], atol=1e-5)
    strided = np.lib.stride_tricks.as_strided(x[:40], shape=(20, 28, 28), strides=(1568, 28, 1))
    np.testing.assert_allclose(on_litert.predict(strided), on_tf.predict(strided), atol=1e-5)


def test_a_version_without_model_tflite_is_compiled_where_tensorflow_is_installed(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    _without_tflite(_copy_version(trained_model_dir / "1", tmp_path))
    model = load_version(tmp_path, 1, "litert")
    assert model.runtime.source == litert.COMPILED


def test_without_tensorflow_such_a_version_is_refused_with_a_fix(
    trained_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_tflite(_copy_version(trained_model_dir / "1", tmp_path))
    monkeypatch.setattr(tensorflow, "available", lambda: False)
    monkeypatch.setattr(keras_runtime, "available", lambda: False)  # a serving-only install
    for runtime in ("litert", "auto"):
        with pytest.raises(ModelLoadError, match=r"no model\.tflite.*re-export the version"):
            load_version(tmp_path, 1, runtime)


def test_without_litert_auto_falls_back_and_litert_refuses(
    trained_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as on a platform with no ai-edge-litert wheel: importing it fails
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    model = load_version(trained_model_dir, 1, "auto")
    assert model.runtime_name == "tensorflow"
    assert model.predict(np.zeros((3, 28, 28), np.uint8)).shape == (3, 10)
    with pytest.raises(ModelLoadError, match="version 1: litert: ai-edge-litert is not installed"):
        load_version(trained_model_dir, 1, "litert")


def test_unknown_runtime_is_refused(trained_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="runtime 'onnx'"):
        load_version(trained_model_dir, 1, "onnx")


def test_a_model_file_that_is_not_the_exported_one_is_refused(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    version = _copy_version(trained_model_dir / "1", tmp_path)
    tflite = version / "model.tflite"
    tflite.write_bytes(tflite.read_bytes() + b"\0")  # same model, different bytes
    with pytest.raises(ModelLoadError, match=r"model\.tflite has \d+ bytes; metadata.json"):
        load_version(tmp_path, 1, "litert")
    tflite.write_bytes(tflite.read_bytes()[:-2] + b"\0")  # the recorded size, other bytes
    with pytest.raises(ModelLoadError, match=r"model\.tflite does not match the sha256"):
        load_version(tmp_path, 1, "litert")


def test_a_corrupt_model_file_is_a_failed_version_and_an_older_one_serves(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    from server.manager import ModelManager
    from server.metrics import ServerMetrics

    _copy_version(trained_model_dir / "1", tmp_path, 1)
    broken = _copy_version(trained_model_dir / "1", tmp_path, 2)
    (broken / "model.tflite").write_bytes(b"not a flatbuffer" * 64)
    meta = json.loads((broken / "metadata.json").read_text())
    del meta["exports"], meta["files"]  # no checksum to catch it: the runtime itself must fail
    (broken / "metadata.json").write_text(json.dumps(meta))
    metrics = ServerMetrics()
    manager = ModelManager(tmp_path, metrics, runtime="litert")
    assert manager.refresh() is True  # version 2 failed, version 1 serves
    assert manager.current is not None and manager.current.version == 1
    failure = manager.last_failure
    assert failure is not None and failure.version == 2
    assert "unexpected" in failure.reason and str(tmp_path) not in failure.reason
    assert metrics.model_loads.labels("failed")._value.get() == 1


def test_metadata_of_another_contract_is_refused(trained_model_dir: Path, tmp_path: Path) -> None:
    version = _copy_version(trained_model_dir / "1", tmp_path)
    meta = json.loads((version / "metadata.json").read_text())
    meta["signature"]["inputs"]["images"]["shape"] = [-1, 32, 32]
    (version / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="differs from this server's contract"):
        load_version(tmp_path, 1, "auto")


def test_the_server_serves_without_tensorflow(
    trained_model_dir: Path, tmp_path: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TENSORFLOW)
    models = tmp_path / "models"
    _copy_version(trained_model_dir / "1", models, 1)
    _without_tflite(_copy_version(trained_model_dir / "1", models, 2))
    import os

    env = {**os.environ, "PYTHONPATH": str(blocker)}
    # (with auto, a version without model.tflite would go to the Keras runtime if installed)
    srv = start_server(models, tmp_path / "server.log", "--runtime", "litert", env=env)
    try:
        with DigitClient(srv.target) as client:
            info = client.model_info()
            digits = client.batch_predict(mnist_test[0][:100]).digits
        assert (info.model_version, info.runtime) == (1, "litert")
        # version 2 has no model.tflite and nothing here can compile it: refused, with a fix
        assert info.last_failed_version == 2 and "re-export the version" in info.last_failure
        assert (digits == mnist_test[1][:100]).mean() > 0.8
        maps = Path(f"/proc/{srv.proc.pid}/maps").read_text()
        assert "tensorflow" not in maps, "a TensorFlow library is loaded in the server"
    finally:
        assert srv.stop() == 0


def test_the_keras_runtime_serves_the_same_answers_on_jax(
    trained_model_dir: Path, tmp_path: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    pytest.importorskip("jax")
    x = mnist_test[0][:300]
    expected = load_version(trained_model_dir, 1, "litert").predict(x)
    # a server process of its own: Keras picks its backend (JAX) when first imported
    import os

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    srv = start_server(
        trained_model_dir, tmp_path / "server.log", "--runtime", "keras", "--max-batch-size",
        "64", env=env,
    )  # fmt: skip
    try:
        with DigitClient(srv.target) as client:
            info = client.model_info()
            batch = client.batch_predict(x)  # 300 images: five 64-image buckets' calls
            single = client.predict(x[7])
        assert (info.runtime, info.device) == ("keras", "cpu")
        np.testing.assert_allclose(batch.probabilities, expected, atol=1e-5)
        np.testing.assert_allclose(single.probabilities, expected[7], atol=1e-5)
        assert "with keras (model.keras)" in srv.log()
    finally:
        assert srv.stop() == 0


def test_the_keras_runtime_refuses_a_process_whose_keras_runs_on_another_backend(
    trained_model_dir: Path,
) -> None:
    pytest.importorskip("jax")
    import subprocess

    code = (
        "import os; os.environ['KERAS_BACKEND'] = 'tensorflow'; import keras  # noqa\n"
        "from pathlib import Path\n"
        "from server.versions import ModelLoadError, load_version\n"
        "try:\n"
        f"    load_version(Path({str(trained_model_dir)!r}), 1, 'keras')\n"
        "except ModelLoadError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "already loaded with the tensorflow backend" in out.stdout, out.stderr[-2000:]


def test_auto_picks_keras_on_a_gpu_without_tensorflow(monkeypatch: pytest.MonkeyPatch) -> None:
    from server import runtimes

    monkeypatch.setattr(runtimes, "gpu_visible", lambda: True)
    monkeypatch.setattr(tensorflow, "available", lambda: False)
    assert runtimes._order("auto") == ["keras", "litert"]
    monkeypatch.setattr(tensorflow, "available", lambda: True)
    assert runtimes._order("auto") == ["tensorflow", "keras", "litert"]
    monkeypatch.setattr(runtimes, "gpu_visible", lambda: False)
    assert runtimes._order("auto")[0] == "litert"


@pytest.mark.parametrize("metadata_last", [True, False], ids=["metadata-last", "metadata-first"])
def test_a_version_copied_file_by_file_is_served_only_once_complete(
    trained_model_dir: Path, tmp_path: Path, metadata_last: bool
) -> None:
    """A version copied by hand, one file at a time, each written in two halves (slowly), in
    either order: never served half-written, and served with its metadata once complete."""
    from server.manager import ModelManager
    from server.metrics import ServerMetrics

    _copy_version(trained_model_dir / "1", tmp_path, 1)
    manager = ModelManager(tmp_path, ServerMetrics(), runtime="litert")
    assert manager.refresh() is True
    src = trained_model_dir / "1"
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != "metadata.json")
    order = [*files, src / "metadata.json"] if metadata_last else [src / "metadata.json", *files]
    for i, file in enumerate(order):
        target = tmp_path / "2" / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = file.read_bytes()
        target.write_bytes(data[: len(data) // 2])
        assert manager.refresh() is False, f"served with {file.name} half-written"
        target.write_bytes(data)
        if i < len(order) - 1:
            assert manager.refresh() is False, f"served before {order[i + 1].name}"
        assert manager.current is not None and manager.current.version == 1
    assert manager.refresh() is True
    assert manager.current is not None and manager.current.version == 2
    assert manager.current.metadata == json.loads((src / "metadata.json").read_text())


def test_auto_falls_back_from_a_corrupt_tflite_and_says_why(
    trained_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from server.errors import Unavailable
    from server.manager import ModelManager
    from server.metrics import ServerMetrics

    version = _copy_version(trained_model_dir / "1", tmp_path)
    meta = json.loads((version / "metadata.json").read_text())
    del meta["files"], meta["exports"]  # an export without recorded checksums
    (version / "metadata.json").write_text(json.dumps(meta))
    (version / "model.tflite").write_bytes(b"not a flatbuffer" * 64)
    with caplog.at_level("WARNING"):
        model = load_version(tmp_path, 1, "auto")
    assert model.runtime_name == "tensorflow"
    assert "litert: cannot read its file" in caplog.text
    # on litert alone it fails, and a caller is told why no version serves
    manager = ModelManager(tmp_path, ServerMetrics(), runtime="litert")
    assert manager.refresh() is False
    with pytest.raises(Unavailable, match=r"no model version is loaded yet: .*last failure"):
        manager.serving_model()
