"""The committed stubs are exactly what proto/ generates (checked without rewriting them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

STUBS = ROOT / "client" / "mnist_client" / "pb"


def _check(stubs_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check", "--stubs-dir", str(stubs_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_committed_stubs_match_the_proto() -> None:
    result = _check(STUBS)
    assert result.returncode == 0, result.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "pb"
    shutil.copytree(STUBS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    stub = copy / "digit_classifier_pb2.pyi"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    result = _check(copy)
    assert result.returncode == 1 and "digit_classifier_pb2.pyi" in result.stderr
    assert _check(STUBS).returncode == 0  # the committed stubs were not touched
