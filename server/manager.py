"""Which model version is served, the swap to a newer one, and following the model folder.

The manager owns the current :class:`~server.versions.LoadedModel`. ``predict`` reads it once
per batch, so swapping is one reference assignment: the batch already running finishes on the
old version and the next batch uses the new one. New versions are loaded, warmed up and
checked beside the current one (in a worker thread) before the swap; a version that fails is
recorded and skipped until its files change, and the current version keeps serving. A version
still being written (:class:`~server.versions.VersionIncomplete`) is no failure: it is
looked at again whenever its files change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.errors import Unavailable
from server.metrics import ServerMetrics
from server.monitoring import ModelMonitoring, VersionMonitor
from server.versions import (
    LoadedModel,
    ModelLoadError,
    VersionIncomplete,
    list_versions,
    load_version,
)

log = logging.getLogger(__name__)
WAITING_LOG_SECONDS = 30.0  # while no version serves, the reason is logged this often


class VersionLoader(Protocol):
    """How a version folder becomes a checked, warmed-up model (:func:`load_version`)."""

    def __call__(
        self, model_dir: Path, version: int, runtime: str, threads: int, max_batch: int
    ) -> LoadedModel: ...


@dataclass(frozen=True)
class LoadFailure:
    version: int
    reason: str
    stamp: tuple[int, ...]  # the version's files when it failed; a change retries it


class ModelManager:
    """Holds the served model; loads the wanted version and follows new ones unless pinned."""

    def __init__(
        self,
        model_dir: Path,
        metrics: ServerMetrics,
        *,
        pinned_version: int | None = None,
        runtime: str = "auto",
        threads: int = 0,
        max_batch: int = 256,
        monitoring: ModelMonitoring | None = None,
        loader: VersionLoader = load_version,
    ) -> None:
        self.model_dir = model_dir
        self.monitoring = monitoring
        self._load = loader  # load_version; a test's fake runtime comes in here
        self.pinned_version = pinned_version
        self.runtime = runtime
        self.threads = threads
        self.max_batch = max_batch
        self._metrics = metrics
        # the served model with its compute-time histogram and its monitor: one reference,
        # swapped atomically
        self._serving: tuple[LoadedModel, Any, VersionMonitor | None] | None = None
        self._failures: dict[int, LoadFailure] = {}
        self._incomplete: dict[int, tuple[int, ...]] = {}  # version -> its stamp then
        self.last_failure: LoadFailure | None = None
        self._load_lock = threading.Lock()
        self._next_waiting_log = 0.0  # time.monotonic() of the next "not serving" warning

    @property
    def current(self) -> LoadedModel | None:
        """The version being served, or None before the first successful load."""
        serving = self._serving
        return serving[0] if serving else None

    def serving_model(self) -> LoadedModel:
        """The version being served; UNAVAILABLE (retry elsewhere) while none is loaded yet."""
        model = self.current
        if model is None:
            raise Unavailable(f"no model version is loaded yet: {self.waiting_for() or 'loading'}")
        return model

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """Probabilities from the current version, and that version. Called once per batch."""
        serving = self._serving
        if serving is None:
            raise Unavailable("no model version is loaded")
        model, compute_seconds, monitor = serving
        started = time.perf_counter()
        probs = model.predict(images)
        self._metrics.observe_compute(compute_seconds, time.perf_counter() - started, len(images))
        if monitor is not None:
            monitor.observe(images, probs)
        return probs, model.version

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
                previous = self.current
                current = previous.version if previous else None
                if wanted is None or wanted == current:
                    return False
                if self.pinned_version is None and current is not None and wanted < current:
                    return False
                try:
                    model = self._load(
                        self.model_dir, wanted, self.runtime, self.threads, self.max_batch
                    )
                except VersionIncomplete as err:
                    self._record_incomplete(wanted, str(err))
                    continue  # looked at again once its files change
                except ModelLoadError as err:
                    self._record_failure(wanted, str(err))
                    continue  # the failure is remembered: the next pass tries another
                monitor = None
                if self.monitoring is not None:
                    monitor = self.monitoring.start(model.version, model.profile)
                # the swap: one reference, read once per batch
                hist = self._metrics.compute_seconds.labels(model.device)
                self._serving = (model, hist, monitor)
                if self.monitoring is not None and previous is not None:
                    self.monitoring.stop(previous.version)
                self._failures.pop(wanted, None)
                self._incomplete.pop(wanted, None)
                self._metrics.model_loads.labels("ok").inc()
                self._metrics.set_model(model, previous)
                if current is not None:
                    log.info("now serving version %d (was %d)", model.version, current)
                return True

    def waiting_for(self) -> str | None:
        """While no version serves: why, in one line (what is missing); else None."""
        if self.current is not None:
            return None
        folder = self.model_dir
        if not folder.is_dir():
            return f"--model-dir {folder} does not exist (a typo?); no version can load"
        versions = list_versions(folder)
        if self.pinned_version is not None and self.pinned_version not in versions:
            there = ", ".join(map(str, versions)) or "none"
            return f"--model-version {self.pinned_version} is not in {folder} (versions: {there})"
        if self.last_failure is not None:
            return f"no version loaded; last failure: {self.last_failure.reason}"
        if self._incomplete:
            newest = max(self._incomplete)
            return f"no version loaded; version {newest} is incomplete (still being written?)"
        if not versions:
            return f"{folder} holds no version yet (MODEL_DIR/1/, MODEL_DIR/2/, ...)"
        return None

    def warn_if_waiting(self) -> None:
        """Log why no version serves (a WARNING), at most every :data:`WAITING_LOG_SECONDS`."""
        reason = self.waiting_for()
        now = time.monotonic()
        if reason is not None and now >= self._next_waiting_log:
            log.warning("not serving: %s", reason)
            self._next_waiting_log = now + WAITING_LOG_SECONDS

    async def watch(self, poll_seconds: float, on_swap: Callable[[], Awaitable[object]]) -> None:
        """Check the folder every ``poll_seconds`` for a newer version; await ``on_swap`` after
        each swap. Runs until cancelled; a pinned version that is serving is never left."""
        loop = asyncio.get_running_loop()
        while self.pinned_version is None or self._serving is None:
            self.warn_if_waiting()
            await asyncio.sleep(poll_seconds)
            try:
                swapped = await loop.run_in_executor(None, self.refresh)
            except Exception:  # a watcher that dies silently would freeze the version
                log.exception("model refresh failed")
                continue
            if swapped:
                await on_swap()

    def _wanted_version(self) -> int | None:
        versions = list_versions(self.model_dir)
        if self.pinned_version is not None:
            candidates = [v for v in versions if v == self.pinned_version]
        else:
            candidates = versions
        for version in reversed(candidates):
            failure = self._failures.get(version)
            stamp = self._stamp(version)
            passed_over = (failure is not None and failure.stamp == stamp) or (
                self._incomplete.get(version) == stamp
            )
            if not passed_over:
                return version
            current = self.current
            if current is not None and version <= current.version:
                break
        return None

    def _stamp(self, version: int) -> tuple[int, ...]:
        """What changes when any file of the version is added, removed, grown or rewritten."""
        try:
            path = self.model_dir / str(version)
            stats = [p.stat() for p in [path, *path.rglob("*")]]
        except OSError:
            return (0,)
        return (len(stats), max(st.st_mtime_ns for st in stats), sum(st.st_size for st in stats))

    def _record_incomplete(self, version: int, reason: str) -> None:
        stamp = self._stamp(version)
        if version not in self._incomplete:
            log.info("%s; waiting for it (still serving %s)", reason,
                     self.current.version if self.current else "nothing")  # fmt: skip
        self._incomplete[version] = stamp

    def _record_failure(self, version: int, reason: str) -> None:
        failure = LoadFailure(version, reason, self._stamp(version))
        self._failures[version] = failure
        self.last_failure = failure
        self._metrics.model_loads.labels("failed").inc()
        log.error(
            "model version %d rejected, still serving %s: %s",
            version,
            self.current.version if self.current else "nothing",
            reason,
        )
