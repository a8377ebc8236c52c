"""Versioned export: ``MODEL_DIR/N/`` written under a temporary name, then renamed into place.

Everything is written into ``MODEL_DIR/.tmp-<random>/``; the version number is claimed with an
atomic ``mkdir MODEL_DIR/N`` (so two trainers never take the same number and an existing
version is never overwritten), and the finished folder is renamed onto that empty claim. A
watcher therefore sees either nothing, an empty folder, or a complete version.

This module touches only the file system (no TensorFlow), so the command line can report a
bad model directory before importing TensorFlow; :mod:`training.artifacts` writes the model
files themselves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class ExportError(Exception):
    """The model directory or version cannot be written, or an exported model file fails its
    check; the message names the path or the file."""


def existing_versions(model_dir: Path) -> list[int]:
    """Integer version folders in ``model_dir`` (complete or claimed), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.name.isascii() and p.name.isdigit() and p.is_dir()
    )


def make_staging_dir(model_dir: Path) -> Path:
    """A fresh hidden folder inside ``model_dir`` (same filesystem, so rename is atomic)."""
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))
        staging.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
        return staging
    except OSError as err:
        raise ExportError(f"{model_dir}: cannot create model directory ({err.strerror})") from None


def claim_version(model_dir: Path, version: int | None) -> int:
    """Atomically reserve ``MODEL_DIR/version`` (or the next free number) as an empty folder."""
    if version is not None:
        try:
            (model_dir / str(version)).mkdir()
        except FileExistsError:
            raise ExportError(f"{model_dir / str(version)}: version already exists") from None
        return version
    while True:
        candidate = max(existing_versions(model_dir), default=0) + 1
        try:
            (model_dir / str(candidate)).mkdir()
            return candidate
        except FileExistsError:  # another trainer took it between listing and mkdir
            continue


def publish(staging: Path, model_dir: Path, version: int) -> Path:
    """Rename the finished staging folder onto the claimed (empty) version folder."""
    final = model_dir / str(version)
    os.rename(staging, final)  # replaces the empty claim atomically
    return final


def discard(path: Path | None) -> None:
    """Remove a staging folder or an unused claim; never raises."""
    if path is not None and path.exists():
        shutil.rmtree(path, ignore_errors=True)
