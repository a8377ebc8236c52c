"""Training really trains (small and fast) and exports what the server needs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from tests.conftest import ROOT, SERVER_PYTHON, run_training
from training.report import REPORT_FILES


def test_exported_version_serves_uint8_and_matches_keras(
    trained_model_dir: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    import keras
    import tensorflow as tf

    version = trained_model_dir / "1"
    loaded = tf.saved_model.load(str(version))
    fn = loaded.signatures["serving_default"]
    spec = fn.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28]
    x, y = mnist_test
    probs = fn(images=tf.constant(x[:300]))["probabilities"].numpy()
    assert probs.shape == (300, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == y[:300]).mean() > 0.85
    keras_model = keras.saving.load_model(version / "checkpoint" / "best.keras")
    np.testing.assert_allclose(keras_model.predict(x[:300], verbose=0), probs, atol=1e-5)


def test_metadata_and_report(trained_model_dir: Path) -> None:
    version = trained_model_dir / "1"
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["architecture"] == "mlp" and meta["version"] == 1
    assert meta["parameters"] == 101_770  # 784*128+128 + 128*10+10
    assert 0.8 < meta["test_accuracy"] <= 1 and meta["test_loss"] > 0
    assert set(meta["per_class"]) == {str(d) for d in range(10)}
    assert set(meta["per_class"]["3"]) == {"precision", "recall", "f1-score"}
    assert meta["epochs_run"] == 2 and meta["train_seconds"] > 0
    assert len(meta["dataset"]["sha256"]) == 4
    assert {"tensorflow", "keras", "numpy", "python"} <= set(meta["versions"])
    assert meta["created_at"].endswith("+00:00")
    for name in REPORT_FILES:
        path = version / "report" / name
        assert path.is_file() and path.stat().st_size > 200, name
    assert (version / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((version / "report" / "classification_report.json").read_text())
    assert abs(report["accuracy"] - meta["test_accuracy"]) < 1e-6
    with np.load(version / "golden.npz") as golden:
        assert golden["images"].shape[1:] == (28, 28) and len(golden["labels"]) == 100
    from server.monitoring import PROFILE_FILE, Profile

    assert PROFILE_FILE in meta["files"]  # checked on load like every file
    profile = Profile.read(version)
    assert profile.images == meta["test_images"]
    assert abs(sum(profile.shares["digit"]) - 1) < 1e-4
    for name in ("model.tflite", "model.keras"):  # each checked against the SavedModel
        export = meta["exports"][name]
        assert export["max_abs_diff"] <= 1e-4 and export["bytes"] == (version / name).stat().st_size
        assert len(export["sha256"]) == 64


def test_versions_count_up_and_never_overwrite(tmp_path: Path, mnist_dir: Path) -> None:
    model_dir = tmp_path / "models"
    (model_dir / "3").mkdir(parents=True)  # an existing version (even empty) is never reused
    (model_dir / "notes").mkdir()
    args = ["--arch", "mlp50", "--data-dir", str(mnist_dir), "--model-dir", str(model_dir),
            "--limit", "1500", "--epochs", "1", "--quiet"]  # fmt: skip
    first = run_training(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "model version  4" in first.stdout and "test accuracy" in first.stdout
    clash = run_training(*args, "--version", "4")
    assert clash.returncode == 1
    assert clash.stderr.strip().endswith(f"{model_dir / '4'}: version already exists")
    assert sorted(os.listdir(model_dir)) == ["3", "4", "notes"]  # nothing half-written
    meta = json.loads((model_dir / "4" / "metadata.json").read_text())
    assert meta["architecture"] == "mlp50" and meta["parameters"] == 784 * 50 + 50 + 50 * 10 + 10


def test_bad_data_dir_is_one_line_and_writes_nothing(tmp_path: Path, mnist_dir: Path) -> None:
    model_dir = tmp_path / "models"
    missing = run_training("--data-dir", str(tmp_path / "nope"), "--model-dir", str(model_dir))
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope'}: data directory not found"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(mnist_dir, corrupt)
    (corrupt / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    bad = run_training("--data-dir", str(corrupt), "--model-dir", str(model_dir))
    assert bad.returncode == 1 and "train-labels-idx1-ubyte.gz" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not model_dir.exists() or not any(model_dir.iterdir())


def test_cnn_builds_and_trains_a_step(tmp_path: Path, mnist_dir: Path) -> None:
    """The production architecture, on a few hundred images (the full run is a script)."""
    result = run_training(
        "--arch", "cnn", "--data-dir", str(mnist_dir), "--model-dir", str(tmp_path),
        "--limit", "600", "--epochs", "1", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((tmp_path / "1" / "metadata.json").read_text())
    assert meta["architecture"] == "cnn" and meta["epochs_run"] == 1


def test_default_strategy_trains_in_process(tmp_path: Path, mnist_dir: Path) -> None:
    from training.data import load_idx_dir
    from training.pipeline import TrainConfig, train

    data = load_idx_dir(mnist_dir).limited(1000)
    result = train(TrainConfig("mlp", tmp_path, epochs=1, verbose=0), data)
    assert result.version == 1 and result.metadata["strategy"] == "default"
    assert result.metadata["replicas"] == 1 and result.test_accuracy > 0.5


def test_mirrored_strategy_trains_data_parallel_over_two_replicas(
    tmp_path: Path, mnist_dir: Path
) -> None:
    """The distributed branch for real: two replicas (logical CPUs here, GPUs in production),
    each batch split between them and the gradients summed."""
    result = run_training(
        "--arch", "mlp", "--strategy", "mirrored", "--cpu-replicas", "2",
        "--data-dir", str(mnist_dir), "--model-dir", str(tmp_path), "--limit", "1000",
        "--epochs", "1", "--batch-size", "16", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((tmp_path / "1" / "metadata.json").read_text())
    assert (meta["strategy"], meta["replicas"], meta["batch_size"]) == ("mirrored", 2, 32)
    assert meta["test_accuracy"] > 0.5


def test_multi_worker_is_refused_with_the_reason(tmp_path: Path) -> None:
    result = run_training("--strategy", "multi-worker", "--model-dir", str(tmp_path))
    assert result.returncode == 2 and "invalid choice: 'multi-worker'" in result.stderr


def test_cli_choices_match_the_pipeline() -> None:
    from training import cli, models, pipeline

    assert set(cli.ARCHS) == set(models.ARCHITECTURES)
    assert cli.STRATEGIES == pipeline.STRATEGIES


def test_a_model_folder_it_cannot_write_is_one_line_before_training(tmp_path: Path) -> None:
    """As a Docker bind mount that Docker created as root, used by a container running as
    another user: refused at once, saying whose folder it is and what to run instead."""
    tmp_path.chmod(0o755)  # pytest's own folders above it are root's alone: open them up
    for parent in tmp_path.parents[:2]:
        parent.chmod(parent.stat().st_mode | 0o711)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    args = ["-m", "training", "--data-dir", str(tmp_path / "unread"),
            "--model-dir", str(locked / "models")]  # fmt: skip
    # root may write anywhere: then the command runs as a user who is not root
    prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    command = [*(prefix if os.geteuid() == 0 else []), SERVER_PYTHON, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert line.startswith(f"error: {locked}: not writable by this process (uid "), line
    assert "the folder belongs to uid " in line
    assert 'docker run --user "$(id -u):$(id -g)"' in line
    assert not (locked / "models").exists()
