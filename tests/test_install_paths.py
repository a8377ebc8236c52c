"""The documented install commands work as written with plain pip, and this project's own
packages are never looked up on a package index (an unregistered name there is a
dependency-confusion risk: whoever registers it gets their code installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import venv
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import ROOT, missing

# every distribution this repository builds
OURS = {"mnist-serving", "mnist-digit-client"}
IGNORED = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
UNREACHABLE = ("NewConnectionError", "Could not fetch URL", "ProxyError", "Network is unreachable")


def _name(item: dict) -> str:  # type: ignore[type-arg]
    return re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()


def _pip(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Plain pip from a fresh venv (no uv, nothing pre-installed), in a copy of the sources
    (setuptools builds in place: build/ and egg-info stay out of the working tree)."""
    env_dir, src = tmp_path / "venv", tmp_path / "src"
    if not env_dir.exists():
        venv.create(env_dir, with_pip=True)
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "server", "training", "bench", "client"):
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name, ignore=IGNORED)
            else:
                shutil.copy(ROOT / name, src / name)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    result = subprocess.run([*pip, *args], cwd=src, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and any(word in result.stderr for word in UNREACHABLE):
        missing("a package index", "network access to PyPI")
    return result


def test_pip_installs_the_extras_alone_and_resolves_nothing_of_ours_from_an_index(
    tmp_path: Path,
) -> None:
    """`pip install ".[train]"` (and the other extras) as the README's unlocked path: a
    dry run resolves every requirement, and the only package of ours is the local folder."""
    report = tmp_path / "report.json"
    result = _pip(
        tmp_path, "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
        str(report), ".[train,tracing,keras,tensorflow]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    installs = json.loads(report.read_text())["install"]
    names = {_name(item) for item in installs}
    assert {"tensorflow-cpu", "keras", "opentelemetry-sdk", "grpcio", "jax"} <= names
    ours = [item for item in installs if _name(item) in OURS]
    assert [_name(item) for item in ours] == ["mnist-serving"]
    assert ours[0]["download_info"]["url"] == (tmp_path / "src").as_uri()
    required = {Requirement(r).name for r in ours[0]["metadata"].get("requires_dist", [])}
    assert required & OURS <= {"mnist-serving"}  # its extras name itself; nothing else of ours


def test_the_server_wheel_carries_the_sdk_package_and_its_cli(tmp_path: Path) -> None:
    """The server imports the SDK's stubs: its own wheel ships `mnist_client` (from client/),
    typed, with the `mnist-client` command the image's health check runs."""
    result = _pip(tmp_path, "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), ".")
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mnist_serving-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = set(archive.namelist())
        entry_points = next(
            archive.read(n).decode() for n in files if n.endswith(".dist-info/entry_points.txt")
        )
    for path in ("mnist_client/__init__.py", "mnist_client/py.typed",
                 "mnist_client/pb/digit_classifier_pb2.py",
                 "mnist_client/pb/digit_classifier_pb2.pyi", "server/app.py"):  # fmt: skip
        assert path in files, path
    assert "mnist-client = mnist_client.cli:main" in entry_points
    assert not any(name.startswith(("tests/", "client/")) for name in files)


def test_the_sdk_alone_is_still_its_own_distribution(tmp_path: Path) -> None:
    """Callers install `./client` without the server (README: the SDK, for callers)."""
    result = _pip(tmp_path, "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"),
                  "./client")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mnist_digit_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
    assert "mnist_client/pb/digit_classifier_pb2.py" in files
    assert not any(name.startswith(("server/", "training/")) for name in files)
