"""Which model version is served, and the swap to a newer one.

The manager owns the current :class:`~server.model.LoadedModel`. ``predict`` reads it once per
batch, so swapping is one reference assignment: the batch already running finishes on the old
version and the next batch uses the new one. New versions are loaded, warmed up and checked
beside the current one (in a worker thread) before the swap; a version that fails is recorded
and skipped until its files change, and the current version keeps serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.errors import Unavailable
from server.metrics import ServerMetrics
from server.model import LoadedModel, ModelLoadError, list_versions, load_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadFailure:
    version: int
    reason: str
    stamp: float  # mtime of the version folder when it failed; a change retries it


class ModelManager:
    """Holds the served model; loads the wanted version and follows new ones unless pinned."""

    def __init__(
        self,
        model_dir: Path,
        device: str,
        metrics: ServerMetrics,
        pinned_version: int | None = None,
        runtime: str = "auto",
        threads: int = 0,
    ) -> None:
        self.model_dir = model_dir
        self.device = device
        self.pinned_version = pinned_version
        self.runtime = runtime
        self.threads = threads
        self._metrics = metrics
        self._current: LoadedModel | None = None
        self._failures: dict[int, LoadFailure] = {}
        self.last_failure: LoadFailure | None = None
        self._load_lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        """The version being served, or None before the first successful load."""
        return self._current

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Probabilities from the current version, and that version. Called per batch."""
        model = self._current
        if model is None:
            raise Unavailable("no model version is loaded")
        return model.predict(images), model.version

    def refresh(self) -> bool:
        """Load and swap to the wanted version if it is newer than the served one. Blocking.

        Tries the highest candidate first and falls back to lower ones that have not failed
        (at start-up, a broken newest version must not keep an older good one from serving).
        Returns True when a new version now serves. Never raises for a bad version: the
        failure is logged, counted and kept in ``last_failure``.
        """
        with self._load_lock:
            while True:
                wanted = self._wanted_version()
                current = self._current.version if self._current else None
                if wanted is None or wanted == current:
                    return False
                if self.pinned_version is None and current is not None and wanted < current:
                    return False
                try:
                    model = load_version(
                        self.model_dir, wanted, self.device, self.runtime, self.threads
                    )
                except ModelLoadError as err:
                    self._record_failure(wanted, str(err))
                    continue  # the failure is remembered: the next pass tries another
                self._current = model  # the swap: one reference, read once per batch
                self._failures.pop(wanted, None)
                self._metrics.model_loads.labels("ok").inc()
                self._metrics.set_model(model)
                if current is not None:
                    log.info("now serving version %d (was %d)", model.version, current)
                return True

    def _wanted_version(self) -> int | None:
        versions = list_versions(self.model_dir)
        if self.pinned_version is not None:
            candidates = [v for v in versions if v == self.pinned_version]
        else:
            candidates = versions
        for version in reversed(candidates):
            failure = self._failures.get(version)
            if failure is None or failure.stamp != self._stamp(version):
                return version
            if self._current is not None and version <= self._current.version:
                break
        return None

    def _stamp(self, version: int) -> float:
        try:
            path = self.model_dir / str(version)
            return max(p.stat().st_mtime for p in [path, *path.iterdir()])
        except (OSError, ValueError):
            return 0.0

    def _record_failure(self, version: int, reason: str) -> None:
        failure = LoadFailure(version, reason, self._stamp(version))
        self._failures[version] = failure
        self.last_failure = failure
        self._metrics.model_loads.labels("failed").inc()
        log.error(
            "model version %d rejected, still serving %s: %s",
            version,
            self._current.version if self._current else "nothing",
            reason,
        )
