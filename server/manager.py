"""Which model versions serve, loading new ones beside them, unloading, labels, following
the model folder.

A version policy (:class:`~server.versions.VersionPolicy`: latest N, all, specific) decides
which versions are loaded. Each loaded version has its own batcher (batches never mix
versions). What serves is one immutable :class:`Routes` snapshot (the loaded versions, the
labels, the default), swapped as one reference: a call resolves against one snapshot at its
admission, and the version it resolved computes its answer whatever changes afterwards.

A new version is loaded, warmed up and checked (in a worker thread) beside the others, and
only then published; a version that fails is recorded and skipped until its files change,
and the loaded ones keep serving. A version still being written
(:class:`~server.versions.VersionIncomplete`) is no failure: it is looked at again whenever
its files change. A version that leaves the policy is first made unreachable, then its
batcher stops (which finishes every call already admitted for it), and only then is it
unloaded. Labels (``MODEL_DIR/labels.json``: ``{"stable": 2, "canary": 3}``) are re-read
whenever the file changes; a label pointing at a version that is not loaded is logged and
ignored. Unpinned calls go to the default: the ``stable`` label if set, else the newest
loaded version. A version policy in ``MODEL_DIR/policy.json`` (``{"version_policy":
"latest:2"}``) overrides ``--version-policy`` for the model. Management calls
(:meth:`ModelManager.configure`) change both files and apply them at once; every replica and
worker on the same folder follows within its poll.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from server.batcher import DynamicBatcher, ModelFn
from server.errors import FailedPrecondition, NotFound, Unavailable
from server.metrics import ServerMetrics
from server.monitoring import ModelMonitoring, VersionMonitor
from server.versions import (
    LoadedModel,
    ModelLoadError,
    VersionIncomplete,
    VersionPolicy,
    list_versions,
    load_version,
)

log = logging.getLogger(__name__)
LABELS_FILE = "labels.json"  # MODEL_DIR/labels.json: {"stable": 2, "canary": 3}
POLICY_FILE = "policy.json"  # MODEL_DIR/policy.json: {"version_policy": "latest:2"}
DEFAULT_LABEL = "stable"  # unpinned calls go to this label's version when it is set


class VersionLoader(Protocol):
    """How a version folder becomes a checked, warmed-up model (:func:`load_version`)."""

    def __call__(
        self, model_dir: Path, version: int, runtime: str, threads: int, max_batch: int
    ) -> LoadedModel: ...


@dataclass(frozen=True)
class VersionState:
    """A version of a model as the repository calls list it."""

    version: int
    state: str  # READY, UNLOADING or UNAVAILABLE (Triton's words)
    reason: str  # why it is not READY ("" when it is)


class KeepType:
    """The type of :data:`KEEP`: "leave this unchanged" in :meth:`ModelManager.configure`."""


KEEP = KeepType()


@dataclass(frozen=True)
class LoadFailure:
    version: int
    reason: str
    stamp: tuple[int, ...]  # the version's files when it failed; a change retries it


@dataclass(frozen=True)
class Routes:
    """What serves, as one snapshot (never changed: a change publishes a new one)."""

    versions: Mapping[int, LoadedModel] = field(default_factory=dict)  # loaded, by version
    labels: Mapping[str, LoadedModel] = field(default_factory=dict)  # those that point at one
    default: LoadedModel | None = None  # the stable label's version, else the newest

    def loaded(self) -> str:
        """What is loaded, for a message: "loaded: versions 2, 3" (and the labels)."""
        if not self.versions:
            return "no version is loaded"
        names = ", ".join(map(str, sorted(self.versions)))
        text = f"loaded: version{'s' if len(self.versions) > 1 else ''} {names}"
        if self.labels:
            text += (
                " (labels: "
                + ", ".join(
                    f"{name}={model.version}" for name, model in sorted(self.labels.items())
                )
                + ")"
            )
        return text


BatcherFactory = Callable[[ModelFn, LoadedModel], DynamicBatcher]  # (model call, version)


class ModelManager:
    """Holds the loaded versions and their labels; loads and unloads as the policy says."""

    def __init__(
        self,
        model_dir: Path,
        metrics: ServerMetrics,
        *,
        pinned_version: int | None = None,
        policy: VersionPolicy | None = None,
        model_name: str = "mnist",
        runtime: str = "auto",
        threads: int = 0,
        max_batch: int = 256,
        monitoring: ModelMonitoring | None = None,
        loader: VersionLoader = load_version,
        make_batcher: BatcherFactory | None = None,
    ) -> None:
        """``pinned_version`` (``--model-version``) is the policy ``specific:V``;
        ``make_batcher`` gives each loaded version its batcher (None: none, the caller
        calls the models itself)."""
        self.model_dir = model_dir
        self.monitoring = monitoring
        self._load = loader  # load_version; a test's fake runtime comes in here
        self.pinned_version = pinned_version
        if pinned_version is not None:
            policy = VersionPolicy(latest=None, specific=(pinned_version,))
        self.default_policy = policy if policy is not None else VersionPolicy()
        self.policy = self.default_policy  # policy.json's when it has one
        self._policy_text: bytes | None = None  # policy.json as last read
        self.model_name = model_name
        self.runtime = runtime
        self.threads = threads
        self.max_batch = max_batch
        self._metrics = metrics
        self._make_batcher = make_batcher
        self._loop: asyncio.AbstractEventLoop | None = None  # where batchers deliver
        self.routes = Routes()  # swapped as one reference (see the module docstring)
        self._label_spec: dict[str, int] = {}  # as the labels file says
        self._labels_text: bytes | None = None  # the file as last read
        self._ignored_labels: dict[str, int] = {}  # logged once each
        self.unloading: dict[int, concurrent.futures.Future[None]] = {}
        self.unloaded: list[int] = []  # versions whose unload finished, in order
        self._failures: dict[int, LoadFailure] = {}
        self._incomplete: dict[int, tuple[int, ...]] = {}  # version -> its stamp then
        self.last_failure: LoadFailure | None = None
        self._load_lock = threading.Lock()
        self._configure_lock = threading.Lock()  # one management change at a time

    @property
    def current(self) -> LoadedModel | None:
        """The default version (what unpinned calls get), or None before the first load."""
        return self.routes.default

    def serving_model(self) -> LoadedModel:
        """The default version; UNAVAILABLE (retry elsewhere) while none is loaded yet,
        NOT_FOUND when the model was unloaded (every replica on the folder is alike: a retry
        elsewhere would not help)."""
        model = self.routes.default
        if model is None and self.policy.loads_nothing:
            raise NotFound(self.waiting_for() or "unloaded")  # says it was unloaded
        if model is None:
            raise Unavailable(f"no model version is loaded yet: {self.waiting_for() or 'loading'}")
        return model

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batchers deliver on ``loop`` from now on: start those of the loaded versions."""
        self._loop = loop
        for model in self.routes.versions.values():
            if model.batcher is not None:
                model.batcher.start(loop)

    def refresh(self) -> bool:
        """Load the versions the policy wants that are not loaded, publish each once it is
        checked, then unload those it no longer wants, and re-read the labels. Blocking.

        Tries the highest wanted version first and falls back to lower ones that have not
        failed (at start-up, a broken newest version must not keep an older good one from
        serving). Returns True when what serves changed. Never raises for a bad version: the
        failure is logged, counted and kept in ``last_failure``.
        """
        with self._load_lock:
            changed = self._read_policy()
            changed = self._read_labels() or changed
            while True:
                wanted = self.policy.choose(self._candidates())
                missing = [v for v in wanted if v not in self.routes.versions]
                if not missing:
                    break
                version = missing[-1]
                try:
                    model = self._load(
                        self.model_dir, version, self.runtime, self.threads, self.max_batch
                    )
                except VersionIncomplete as err:
                    self._record_incomplete(version, str(err))
                    continue  # looked at again once its files change
                except ModelLoadError as err:
                    self._record_failure(version, str(err))
                    continue  # the failure is remembered: the next pass tries another
                self._serve(model)
                changed = True
            for version in sorted(set(self.routes.versions) - set(wanted)):
                self._unload(version)  # only once every wanted version is checked
                changed = True
            if changed:
                self._publish(dict(self.routes.versions))
            return changed

    def _candidates(self) -> list[int]:
        """Versions that could serve, ascending: the loaded ones and those on disk that have
        not failed (or are incomplete) as their files are now."""
        loaded = self.routes.versions
        found = set(loaded)
        for version in list_versions(self.model_dir):
            if version in found:
                continue
            failure = self._failures.get(version)
            stamp = self._stamp(version)
            passed_over = (failure is not None and failure.stamp == stamp) or (
                self._incomplete.get(version) == stamp
            )
            if not passed_over:
                found.add(version)
        return sorted(found)

    def _serve(self, model: LoadedModel) -> None:
        """A checked version: its monitor and batcher, then reachable."""
        model.name = self.model_name
        monitor = None
        if self.monitoring is not None:
            monitor = self.monitoring.start(model.name, model.version, model.profile)
        hist = self._metrics.compute_seconds.labels(model.device, model.name, str(model.version))
        if self._make_batcher is not None:
            model.batcher = self._make_batcher(self._model_fn(model, hist, monitor), model)
            if self._loop is not None:
                model.batcher.start(self._loop)
        previous = self.routes.default
        self._publish({**self.routes.versions, model.version: model})
        self._failures.pop(model.version, None)
        self._incomplete.pop(model.version, None)
        self._metrics.model_loads.labels("ok").inc()
        if previous is not None:  # (the first version's load is logged by the loader)
            log.info("version %d checked and reachable; %s", model.version, self.routes.loaded())

    def _model_fn(self, model: LoadedModel, hist: Any, monitor: VersionMonitor | None) -> ModelFn:
        """The batcher's model call for one version: probabilities, timed and monitored."""
        predict, version = model.predict, model.version
        observe_compute = self._metrics.observe_compute

        def run(images: np.ndarray) -> tuple[np.ndarray, int]:
            started = time.perf_counter()
            probs = predict(images)
            observe_compute(hist, time.perf_counter() - started, len(images))
            if monitor is not None:
                monitor.observe(images, probs)
            return probs, version

        return run

    def _unload(self, version: int) -> None:
        """Make ``version`` unreachable, then stop its batcher (its admitted calls finish)
        and only then let it go."""
        model = self.routes.versions[version]
        self._publish({v: m for v, m in self.routes.versions.items() if v != version})
        log.info("model '%s': unloading version %d (not in the policy %s)", self.model_name,
                 version, self.policy)  # fmt: skip
        batcher = model.batcher
        if batcher is None or self._loop is None or not batcher.started:
            self._finish_unload(model)
            return
        # a call that resolved this version before it left and reaches the batcher after
        # it stopped: NOT_FOUND naming what is loaded (as if it had come a moment later)
        batcher.refusal = lambda: NotFound(self.not_loaded(version))
        self.unloading[version] = asyncio.run_coroutine_threadsafe(
            self._retire(model, batcher), self._loop
        )

    async def _retire(self, model: LoadedModel, batcher: DynamicBatcher) -> None:
        await batcher.stop()  # refuses new calls, finishes every admitted one
        self._finish_unload(model)

    def _finish_unload(self, model: LoadedModel) -> None:
        if self.monitoring is not None and self.routes.versions.get(model.version) is None:
            self.monitoring.stop(model.name, model.version)
        self._metrics.drop_model(model)
        self.unloaded.append(model.version)
        log.info("unloaded version %d; its calls in flight finished", model.version)

    def not_loaded(self, version: int | str) -> str:
        """NOT_FOUND's message for a version that is not loaded: what is."""
        return (
            f"version {version} of model '{self.model_name}' is not loaded; {self.routes.loaded()}"
        )

    def _publish(self, versions: dict[int, LoadedModel]) -> None:
        """Swap in the routes for ``versions`` and the labels file (one reference)."""
        labels: dict[str, LoadedModel] = {}
        ignored: dict[str, int] = {}
        for name, version in self._label_spec.items():
            if version in versions:
                labels[name] = versions[version]
            else:
                ignored[name] = version
        for name, version in ignored.items():
            if self._ignored_labels.get(name) != version:
                log.warning(
                    "label %r points at version %d, which is not loaded: ignored", name, version
                )
        self._ignored_labels = ignored
        default = labels.get(DEFAULT_LABEL)
        if default is None and versions:
            default = versions[max(versions)]
        previous = self.routes.default
        self.routes = Routes(versions, labels, default)
        self._metrics.set_models(self.model_name, list(versions.values()), default)
        if default is not None and previous is not None and default is not previous:
            log.info("unpinned calls now go to version %d (was %d)", default.version,
                     previous.version)  # fmt: skip

    def _read_labels(self) -> bool:
        """Re-read the labels file when it changed; True when the labels changed. The file
        is small and read whole at each poll: an edit is seen even when it keeps the size
        and lands within the file system's timestamp granularity."""
        path = self.model_dir / LABELS_FILE
        text = _read_file(path, "labels")
        if isinstance(text, _Unreadable) or text == self._labels_text:
            return False
        self._labels_text = text
        spec: dict[str, int] = {}
        if text is not None:
            try:
                data = json.loads(text)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object of label: version")
                for name, version in data.items():
                    if not isinstance(version, int) or isinstance(version, bool):
                        raise ValueError(f"label {name!r}: {version!r} is not a version number")
                    spec[str(name)] = version
            except ValueError as err:
                log.error("%s is not valid, labels unchanged: %s", path, err)
                return False
        if spec == self._label_spec:
            return False
        log.info("labels now %s", spec or "none")
        self._label_spec = spec
        return True

    def _read_policy(self) -> bool:
        """Re-read ``policy.json`` when it changed (absent: ``--version-policy``); True when
        the policy changed."""
        path = self.model_dir / POLICY_FILE
        text = _read_file(path, "policy")
        if isinstance(text, _Unreadable) or text == self._policy_text:
            return False
        self._policy_text = text
        policy = self.default_policy
        if text is not None:
            try:
                data = json.loads(text)
                if not isinstance(data, dict) or not isinstance(data.get("version_policy"), str):
                    raise ValueError('not a JSON object {"version_policy": "latest:N"}')
                policy = VersionPolicy.parse(data["version_policy"])
            except ValueError as err:
                log.error("%s is not valid, policy unchanged: %s", path, err)
                return False
        if policy == self.policy:
            return False
        log.info("model '%s': version policy now %s", self.model_name, policy)
        self.policy = policy
        return True

    # --- management (server.core's repository calls): write the files, apply them now

    def configure(
        self,
        policy: VersionPolicy | KeepType | None = KEEP,
        labels: Mapping[str, int] | None = None,
    ) -> None:
        """Change what serves, as a management call asks, and apply it before returning
        (blocking: run it in a worker thread). ``policy``: the model's version policy (None:
        back to ``--version-policy``; :data:`KEEP`: unchanged); ``labels``: the whole new
        label set (None: unchanged), each pointing at a version loaded once the policy is
        applied. The change goes into the model folder's files, so every replica and worker
        on it follows.

        Raises:
            FailedPrecondition: a label points at a version that is not loaded, or the
                folder cannot be written (nothing is changed then).
        """
        with self._configure_lock:
            if not isinstance(policy, KeepType):
                text = None if policy is None else {"version_policy": str(policy)}
                self._write(POLICY_FILE, text)
                self.refresh()
            if labels is not None:
                routes = self.routes
                for name, version in sorted(labels.items()):
                    if version not in routes.versions:
                        raise FailedPrecondition(
                            f"label '{name}' cannot point at version {version} of model "
                            f"'{self.model_name}': it is not loaded; {routes.loaded()}"
                        )
                self._write(LABELS_FILE, dict(labels) if labels else None)
                self.refresh()

    def _write(self, name: str, data: dict[str, Any] | None) -> None:
        """Replace (or with None remove) a file of the model folder in one step."""
        path = self.model_dir / name
        try:
            if data is None:
                path.unlink(missing_ok=True)
                return
            partial = path.with_name(f".{name}.{threading.get_ident()}.tmp")
            partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            partial.replace(path)  # atomic: a reader sees the old file or the new one
        except OSError as err:
            raise FailedPrecondition(
                f"cannot change {path} (is the model repository read-only?): {err.strerror}"
            ) from None

    def version_states(self) -> list[VersionState]:
        """Every version on disk or loaded, ascending, with its state and why: READY
        (loaded), UNLOADING (finishing its calls), UNAVAILABLE (failed, incomplete, or not
        in the policy)."""
        routes = self.routes
        states = []
        for version in sorted(set(list_versions(self.model_dir)) | set(routes.versions)
                              | set(self.unloading)):  # fmt: skip
            failure = self._failures.get(version)
            if version in routes.versions:
                state, reason = "READY", ""
            elif version in self.unloading and not self.unloading[version].done():
                state, reason = "UNLOADING", "finishing the calls it admitted"
            elif failure is not None:
                state, reason = "UNAVAILABLE", failure.reason
            elif version in self._incomplete:
                state, reason = "UNAVAILABLE", "incomplete (still being written?)"
            else:
                state, reason = "UNAVAILABLE", f"not in the version policy {self.policy}"
            states.append(VersionState(version, state, reason))
        return states

    def waiting_for(self) -> str | None:
        """While no version serves: why, in one line (what is missing); else None."""
        if self.current is not None:
            return None
        if self.policy.loads_nothing:  # "none": a management call unloaded it
            return f"model '{self.model_name}' was unloaded (version policy none): load it again"
        folder = self.model_dir
        if not folder.is_dir():
            return f"--model-dir {folder} does not exist (a typo?); no version can load"
        versions = list_versions(folder)
        there = ", ".join(map(str, versions)) or "none"
        if self.pinned_version is not None and self.pinned_version not in versions:
            return f"--model-version {self.pinned_version} is not in {folder} (versions: {there})"
        if self.policy.specific and not set(self.policy.specific) & set(versions):
            return f"--version-policy {self.policy}: none is in {folder} (versions: {there})"
        if self.last_failure is not None:
            return f"no version loaded; last failure: {self.last_failure.reason}"
        if self._incomplete:
            newest = max(self._incomplete)
            return f"no version loaded; version {newest} is incomplete (still being written?)"
        if not versions:
            return f"{folder} holds no version yet (MODEL_DIR/1/, MODEL_DIR/2/, ...)"
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
                     self.routes.loaded())  # fmt: skip
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


class _Unreadable:
    """A file that is there but cannot be read: keep what was read before."""


def _read_file(path: Path, what: str) -> bytes | _Unreadable | None:
    """A model folder's small settings file, whole (None: there is none). An unreadable one
    is logged and an :class:`_Unreadable` (``what`` stays as it was)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        log.error("%s is not readable, %s unchanged: %s", path, what, err)
        return _Unreadable()
