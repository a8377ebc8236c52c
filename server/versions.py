"""Model versions on disk: which exist, and loading one into a checked, warmed-up model.

A model directory holds integer versions (``MODEL_DIR/1/``, ``MODEL_DIR/2/``, ...) as the
contract in :mod:`mnist_client.contract` describes. Other names (``.tmp-*`` folders of a
version being written) are ignored.

**When a version is complete.** Its ``metadata.json`` is there, and every file its ``files``
entry lists is there with the size and SHA-256 recorded (training writes the metadata last,
after every other file, and then renames the whole folder into place). Until then the
version is *incomplete*: it is not loaded, not counted as failed, and looked at again
whenever its files change, so a folder copied file by file, in any order, slowly, is never
served half-written, and metadata that arrives last is read with the rest. Versions exported
before ``files`` existed are complete once their metadata is there and the exported model
files have the sizes it records; the file a runtime loads is checked against its SHA-256.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_client.contract import METADATA_FILE, ContractError, check_metadata
from server.monitoring import PROFILE_FILE, Profile
from server.runtimes import RUNTIMES, Runtime, RuntimeUnusable, load_runtime
from server.runtimes import litert as litert_runtime
from server.verify import (
    DEFAULT_WARMUP_SIZES,
    CheckFailed,
    Probes,
    check_outputs,
    check_same_answers,
)

if TYPE_CHECKING:
    from server.batcher import DynamicBatcher

log = logging.getLogger(__name__)

EXPORTS_KEY = "exports"  # metadata: {file name: {"sha256": ..., "max_abs_diff": ...}}
FILES_KEY = "files"  # metadata: {relative path: {"sha256": ..., "bytes": ...}}, every file


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model are loaded, as TF Serving and Triton say it: the newest
    ``latest`` ones (``latest:N``), ``all``, or ``specific`` versions; ``none`` is a model
    unloaded by a management call (Triton's RepositoryModelUnload)."""

    latest: int | None = 1  # None: not a latest-N policy; 0: none
    specific: tuple[int, ...] = ()  # the versions of a specific policy

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest:N``, ``all``, ``specific:V1,V2,...`` or ``none``.

        Raises:
            ValueError: anything else (the message shows the forms).
        """
        kind, _, rest = text.strip().partition(":")
        try:
            if kind == "latest" and int(rest or "1") >= 1:
                return cls(latest=int(rest or "1"))
            if kind == "all" and not rest:
                return cls(latest=None)
            if kind == "none" and not rest:
                return cls(latest=0)
            if kind == "specific":
                versions = tuple(sorted({int(v) for v in rest.split(",")}))
                if versions and min(versions) >= 0:
                    return cls(latest=None, specific=versions)
        except ValueError:
            pass
        raise ValueError(
            f"version policy {text!r} is not latest:N (N >= 1), all, specific:V1,V2,... or none"
        )

    @property
    def loads_nothing(self) -> bool:
        """The policy ``none``: a model unloaded by a management call."""
        return self.latest == 0 and not self.specific

    def choose(self, candidates: list[int]) -> list[int]:
        """The versions to load of ``candidates`` (ascending: the loadable ones), ascending."""
        if self.specific:
            return [v for v in candidates if v in self.specific]
        if self.latest is None:
            return list(candidates)
        return candidates[-self.latest :] if self.latest else []

    def __str__(self) -> str:
        if self.specific:
            return "specific:" + ",".join(map(str, self.specific))
        if self.latest == 0:
            return "none"
        return "all" if self.latest is None else f"latest:{self.latest}"


class ModelLoadError(Exception):
    """A version cannot be loaded, or fails its checks; the message says why (one line)."""


class VersionIncomplete(ModelLoadError):
    """A version is still being written (see the module docstring); not a failure."""


def list_versions(model_dir: Path) -> list[int]:
    """Version folders in ``model_dir`` that hold anything, ascending (complete or not yet:
    :func:`load_version` tells)."""
    if not model_dir.is_dir():
        return []
    versions = []
    for child in model_dir.iterdir():
        if (
            child.name.isascii()
            and child.name.isdigit()
            and child.is_dir()
            and any(child.iterdir())
        ):
            versions.append(int(child.name))
    return sorted(versions)


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``files`` for the metadata: every file under ``folder`` but the metadata itself, by
    relative path, with its size and SHA-256."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != METADATA_FILE:
            data = path.read_bytes()
            files[path.relative_to(folder).as_posix()] = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
            }
    return files


def check_complete(path: Path, metadata: dict[str, Any]) -> None:
    """Raise :class:`VersionIncomplete` while a listed file is missing or short, and
    :class:`ModelLoadError` when a whole file differs from its recorded SHA-256."""
    listed = metadata.get(FILES_KEY)
    if listed is None:  # exported before FILES_KEY: the exported files' sizes
        listed = metadata.get(EXPORTS_KEY, {})
    for name, entry in listed.items():
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None:
            raise VersionIncomplete(f"{name} is not there yet")
        recorded = entry.get("bytes", size)
        if size < recorded:
            raise VersionIncomplete(f"{name} has {size} of {recorded} bytes")
        if size > recorded:
            raise ModelLoadError(f"{name} has {size} bytes; {METADATA_FILE} records {recorded}")
    for name, entry in metadata.get(FILES_KEY, {}).items():
        if hashlib.sha256((path / name).read_bytes()).hexdigest() != entry["sha256"]:
            raise ModelLoadError(f"{name} does not match the sha256 in {METADATA_FILE}")


def read_metadata(path: Path) -> dict[str, Any]:
    """A version's ``metadata.json``, checked against the contract.

    Raises:
        VersionIncomplete: there is no metadata yet.
        ModelLoadError: it is unreadable or describes another contract.
    """
    meta_path = path / METADATA_FILE
    if not meta_path.is_file():
        raise VersionIncomplete(
            f"no {METADATA_FILE} yet (a version is complete once its {METADATA_FILE}, "
            "written last, is there and lists its files)"
        )
    try:
        data = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{meta_path}: unreadable metadata ({err})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{meta_path}: metadata is not a JSON object")
    try:
        check_metadata(data)
    except ContractError as err:
        raise ModelLoadError(f"{meta_path}: {err}") from None
    return data


@dataclass
class LoadedModel:
    """One loaded, warmed-up and checked model version, ready to be called on batches."""

    version: int
    path: Path
    runtime: Runtime
    metadata: dict[str, Any]
    load_seconds: float = 0.0
    name: str = ""  # the model's name (set by its manager once loaded)
    profile: Profile | None = None  # the reference for model monitoring, when it has one
    # the batcher of this version alone (batches never mix versions), set once it serves
    batcher: DynamicBatcher | None = field(default=None, repr=False, compare=False)
    loaded_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("architecture", "unknown"))

    @property
    def test_accuracy(self) -> float:
        return float(self.metadata.get("test_accuracy", 0.0))

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    @property
    def memory_bytes(self) -> int:
        """An estimate of the memory the version holds: the size of the model file its
        runtime loaded (weights dominate; the runtime's own buffers are not counted)."""
        try:
            return (self.path / self.runtime.source).stat().st_size
        except (OSError, TypeError):
            return 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 10]`` for uint8 images ``[N, 28, 28]``. Blocking."""
        return self.runtime.predict(images)


def load_version(
    model_dir: Path, version: int, runtime: str = "auto", threads: int = 0, max_batch: int = 256
) -> LoadedModel:
    """Load ``model_dir/version`` on ``runtime``, check it, warm it up.

    Raises:
        ModelLoadError: the version is missing or broken, disagrees with the contract, its
            model file does not match the checksum its metadata records, no runtime can
            load it, or it fails a check in :mod:`server.verify`.
    """
    if runtime not in RUNTIMES:  # a wrong setting, not a wrong version
        raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")
    path = model_dir / str(version)
    started = time.perf_counter()
    try:
        metadata = read_metadata(path)
        check_complete(path, metadata)
        loaded = load_runtime(runtime, path, threads, max_batch)
        if FILES_KEY not in metadata:  # else check_complete has checked every file
            _check_checksum(path, loaded.source, metadata)
        probes = Probes.for_version(path, _warmup_sizes(loaded))
        if loaded.source == litert_runtime.COMPILED:
            from server.runtimes import tensorflow

            check_same_answers(loaded.predict, tensorflow.load(path).predict, probes)
        check_outputs(loaded.predict, probes, float(metadata.get("golden_min_accuracy", 0.9)))
    except VersionIncomplete as err:
        raise VersionIncomplete(f"version {version} is incomplete: {err}") from err
    except (RuntimeUnusable, CheckFailed, ModelLoadError) as err:
        raise ModelLoadError(f"version {version}: {err}") from err
    except Exception as err:  # a corrupt file can make a runtime raise anything
        log.exception("loading version %d failed", version)
        raise ModelLoadError(
            f"version {version}: unexpected {type(err).__name__} while loading (see the log)"
        ) from err
    try:
        profile = Profile.read(path) if (path / PROFILE_FILE).exists() else None
    except (ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"version {version}: {PROFILE_FILE} is not readable: {err}") from err
    model = LoadedModel(
        version, path, loaded, metadata, time.perf_counter() - started, profile=profile
    )
    log.info(
        "loaded model version %d (%s) on %s with %s (%s) in %.2fs",
        version, model.architecture, model.device, loaded.name, loaded.source,
        model.load_seconds,
    )  # fmt: skip
    return model


def _warmup_sizes(runtime: Runtime) -> list[int]:
    sizes: list[int] = list(getattr(runtime, "bucket_sizes", []))
    # an odd size exercises padding; one past the largest bucket, splitting
    extra = [7, sizes[-1] + 1] if sizes else list(DEFAULT_WARMUP_SIZES)
    return sorted({*sizes, *extra})


def _check_checksum(path: Path, source: str, metadata: dict[str, Any]) -> None:
    recorded = metadata.get(EXPORTS_KEY, {}).get(source, {}).get("sha256")
    if recorded is None:
        return
    actual = hashlib.sha256((path / source).read_bytes()).hexdigest()
    if actual != recorded:
        raise ModelLoadError(f"{source} does not match the sha256 in {METADATA_FILE}")
