"""The committed stubs are exactly what proto/ generates."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_committed_stubs_match_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_drift_is_detected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    stub = ROOT / "client" / "mnist_client" / "pb" / "digit_classifier_pb2.pyi"
    original = stub.read_text()
    try:
        stub.write_text(original + "\n# edited by hand\n")
        result = subprocess.run(
            [sys.executable, "scripts/gen_protos.py", "--check"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1 and "digit_classifier_pb2.pyi" in result.stderr
    finally:
        stub.write_text(original)
