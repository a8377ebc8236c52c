"""Every code example in the README runs as written: the Python ones and the shell ones here
(against a real server), or, where one needs a Docker engine or minutes of training, in the
check named for it in :data:`ELSEWHERE`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_client import DigitClient
from tests.conftest import ROOT, ServerProcess, free_ports, missing, start_server, wait_for

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
SHELL = re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M)
GRPCURL = ROOT / ".tools" / "grpcurl" / "grpcurl"

# Shell blocks run elsewhere, by their first words: where, and what differs from the README.
ELSEWHERE = {
    "apt-get install libb64-0d": "tests/test_tools.py::test_perf_analyzer_runs_and_its_server_"
    "counts_match (.ci/run runs the install line; the test's windows are shorter and its "
    "stability check off: 2 shared cores)",
    ".venv/bin/python -m training --arch cnn": "tests/test_training.py::test_cnn_builds_and_"
    "trains_a_step (the same command on 600 images, one epoch)",
    "sudo apt-get install nghttp2-client": "tests/test_bench.py::test_bench_smoke_produces_"
    "table_json_and_plot (the same command with --smoke; .ci/run installs nghttp2-client)",
    "docker build -t mnist-serving .": "deploy/ci/compose_test.sh (builds both targets; runs "
    "the training command as written, by a user who is not root, on a quick model)",
    ".venv/bin/python scripts/gen_protos.py": "tests/test_protos.py::test_committed_stubs_"
    "match_the_proto (with --check, into a temporary folder)",
}
# Shell blocks this file runs, by their first words.
HERE = (
    "./quickstart.sh",
    ".venv/bin/python -m mnist_client health",
    "grpcurl -plaintext",
    ".venv/bin/python -m mnist_client models label",
)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_a_readme_example_runs_as_written(server: ServerProcess, code: str) -> None:
    assert "localhost:8500" in code  # each example talks to the quick start's server
    result = subprocess.run(
        [sys.executable, "-c", code.replace("localhost:8500", server.target)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"


def test_every_shell_example_is_run_by_a_test() -> None:
    """A new shell block in the README needs a test here or an entry in ELSEWHERE, whose
    test exists."""
    for block in SHELL:
        here = block.startswith(HERE)
        elsewhere = [where for start, where in ELSEWHERE.items() if block.startswith(start)]
        assert here or elsewhere, f"no test runs this README block:\n{block}"
        for where in elsewhere:
            path, _, test = where.split(" ")[0].partition("::")
            assert test in (ROOT / path).read_text() if test else (ROOT / path).exists(), where
    assert "sed -n '/^mkdir -p models/" in (ROOT / "deploy/ci/compose_test.sh").read_text()


def _shell(block: str, **replace: str) -> subprocess.CompletedProcess[str]:
    for old, new in replace.items():
        block = block.replace(old, new)
    env = {**os.environ, "PATH": f"{GRPCURL.parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize("block", [b for b in SHELL if b.startswith("grpcurl")])
def test_the_readme_grpcurl_examples_run_as_written(server: ServerProcess, block: str) -> None:
    if not GRPCURL.exists():
        missing("grpcurl", "scripts/grpcurl.sh")
    result = _shell(block, **{"localhost:8500": server.target})
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {
        "list": ["mnist.v1.DigitClassifier", "inference.GRPCInferenceService"],
        "Predict": ['"probabilities"'],
        "Health/Check": ['"status": "SERVING"'],
        "describe": ["rpc ModelStreamInfer", "rpc ModelStatistics"],
        "ModelStatistics": ['"model_stats"'],
        "GetModelMetadata": ['"signature_def"'],
    }
    for word, outputs in expected.items():
        if word in block:
            for output in outputs:
                assert output in result.stdout, (word, result.stdout[-3000:])


def test_the_quick_start_serves_on_one_clean_screen_and_the_cli_examples_answer(
    mnist_dir: Path, tmp_path: Path
) -> None:
    """The README's first command (the second, ./test.sh, is this run), then its CLI block
    against the server it started: the quick start's output up to SERVING fits one screen
    and has no line a newcomer would read as a failure."""
    quickstart = SHELL[0].splitlines()[0].split("#")[0].strip()
    assert quickstart == "./quickstart.sh --data-dir ../shared/data/mnist"
    port, metrics_port = free_ports(2)
    env = {name: value for name, value in os.environ.items()  # a newcomer's shell sets none
           if not name.startswith(("TF_", "MNIST_"))}  # fmt: skip
    env |= {"MODEL_DIR": str(tmp_path / "models"), "MNIST_PORT": str(port),
            "MNIST_METRICS_PORT": str(metrics_port)}  # fmt: skip
    command = quickstart.replace("../shared/data/mnist", str(mnist_dir))
    log = tmp_path / "quickstart.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            command.split(), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 480
        while "health: SERVING" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        screen = log.read_text().splitlines()
        assert len(screen) <= 24, "\n".join(screen)
        alarming = re.compile(r"error|traceback|warning|E0000|W0000|failed", re.I)
        assert not [line for line in screen if alarming.search(line)], "\n".join(screen)

        digit = tmp_path / "my_digit.png"
        _write_png(mnist_dir, digit)
        cli = _shell(
            SHELL[1],
            **{"localhost:8500": f"localhost:{port}", "my_digit.png": str(digit),
               "--duration 10": "--duration 2"},
        )  # fmt: skip
        assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-2000:]
        assert cli.stdout.startswith("SERVING"), cli.stdout[-2000:]
        assert "digit" in cli.stdout.lower(), cli.stdout[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _write_png(mnist_dir: Path, path: Path) -> None:
    from PIL import Image

    from training.data import load_idx_dir

    Image.fromarray(load_idx_dir(mnist_dir).x_test[0]).save(path)


def test_the_rollback_walk_through_runs_as_written(trained_model_dir: Path, tmp_path: Path) -> None:
    """The README's rollback: canary, promote, roll back, list, with the CLI against a real
    server started as the README says (versions 2 and 3, latest:2, --model-control); each
    step's default is what the README says, and the labels file on disk follows."""
    (block,) = [b for b in SHELL if b.startswith(".venv/bin/python -m mnist_client models label")]
    models = tmp_path / "models"
    models.mkdir()
    for version in (2, 3):
        shutil.copytree(trained_model_dir / "1", models / str(version))
        metadata = json.loads((models / str(version) / "metadata.json").read_text())
        metadata["version"] = version
        (models / str(version) / "metadata.json").write_text(json.dumps(metadata))
    server = start_server(
        models, tmp_path / "server.log", "--version-policy", "latest:2", "--model-control", "on"
    )
    try:
        with DigitClient(server.target) as client:
            assert wait_for(lambda: client.model_info().loaded_versions == (2, 3))
        outputs = []
        for line in block.strip().splitlines():
            result = _shell(line, **{"localhost:8500": server.target})
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
            outputs.append(result.stdout)
            with DigitClient(server.target) as client:
                outputs[-1] += f"\nunpinned: {client.predict(_digit()).model_version}"
        defaults = [re.findall(r"^mnist .* (\d+) +READY .*\*", out, re.M) for out in outputs]
        assert defaults == [["2"], ["3"], ["2"], ["2"]], outputs
        assert [out.splitlines()[-1] for out in outputs] == [
            "unpinned: 2",
            "unpinned: 3",
            "unpinned: 2",
            "unpinned: 2",
        ]
        assert "canary" in outputs[0] and "canary" not in outputs[1]
        assert json.loads((models / "labels.json").read_text()) == {"stable": 2}
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def _digit() -> np.ndarray:
    image = np.zeros((28, 28), np.uint8)
    image[8:20, 13:15] = 255  # a stroke: some digit; the test only reads the version
    return image
