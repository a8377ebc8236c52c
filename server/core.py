"""The inference core: what every protocol asks, with no protocol in it.

"These images, for model M, version V or label L (or the default), by deadline D": the
:class:`InferenceCore` answers with the probabilities, the version that computed them and
where the time went (the batcher's :class:`~server.batcher.Answer`). It owns the model lookup
(:class:`~server.repository.ModelRepository`: a :class:`~server.manager.ModelManager` per
model), readiness, the batchers and the repository's management calls (list, load, unload,
relabel, behind ``--model-control``); it knows nothing of gRPC.
The protocols (``server.servicer``, ``server.protocols.*``) only convert their messages to a
core call and its answer back to their messages.

Lookup, for every protocol alike, against one snapshot of what a model serves
(:class:`~server.manager.Routes`):

* a model name that is not served: NOT_FOUND naming what is served;
* a label that points at no loaded version: NOT_FOUND naming what is loaded;
* nothing loaded yet: UNAVAILABLE saying why (what is missing);
* a version that is not loaded: NOT_FOUND naming what is loaded;
* nothing pinned: the default (the ``stable`` label's version, else the newest loaded).

Each loaded version has its own batcher (batches never mix versions): a call is resolved at
its admission and the version it resolved computes its answer, whatever is relabelled or
loaded meanwhile; a version being unloaded finishes the calls it admitted.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.batcher import Answer, DynamicBatcher, ModelFn, Pending
from server.errors import FailedPrecondition, NotFound, Unavailable, quoted
from server.manager import KEEP, KeepType, ModelManager, Routes, VersionLoader, VersionState
from server.metrics import ServerMetrics
from server.monitoring import ModelMonitoring
from server.repository import ModelRepository
from server.settings import Settings
from server.versions import LoadedModel, VersionPolicy, load_version


class UnknownLabel(NotFound):
    """A version label that points at no version (a protocol may word it its own way)."""


@dataclass(frozen=True)
class ModelStatus:
    """One model as the repository calls list it."""

    name: str
    policy: str  # its version policy ("latest:1", "none" once unloaded)
    versions: list[VersionState]  # on disk or loaded, ascending
    labels: Mapping[str, int]  # the labels that point at a loaded version
    default_version: int | None  # what unpinned calls get (None: nothing loaded)


class InferenceCore:
    """Model lookup, readiness and batching behind every protocol; see the module docstring."""

    def __init__(self, repository: ModelRepository, model_control: bool = False) -> None:
        """``model_control``: whether the management calls may change what serves."""
        self.repository = repository
        self.model_control = model_control
        # awaited after a management call changed what serves (the server's health update)
        self.on_change: Callable[[], Awaitable[object]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def model_name(self) -> str:
        """The model calls get when they name none (``--model-name``)."""
        return self.repository.default_name

    @property
    def manager(self) -> ModelManager:
        """The default model's manager (the only one in the one-model layout)."""
        return self.repository.model()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        metrics: ServerMetrics,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        arriving: Callable[[], int] | None = None,
        loader: VersionLoader = load_version,
        monitoring: ModelMonitoring | None = None,
    ) -> InferenceCore:
        """The core a server with ``settings`` runs: a manager per model under
        ``--model-dir`` with ``--version-policy``, a batcher for each loaded version.
        ``loader`` loads a version (a test's fake runtime comes in here); ``on_failure`` and
        ``arriving`` are the batchers' (see ``server.batcher``)."""
        s = settings
        policy = VersionPolicy.parse(s.version_policy)

        def make_batcher(model_fn: ModelFn, model: LoadedModel) -> DynamicBatcher:
            return DynamicBatcher(
                model_fn,
                max_batch_size=s.max_batch_size,
                max_queue_images=s.max_queue_images,
                batch_timeout_s=s.batch_timeout_ms / 1000.0,
                metrics=metrics,
                on_failure=on_failure,
                arriving=arriving,
                track_queue=False,  # the core shows the sum of every version's queue
                answered=metrics.version_requests.labels(model.name, str(model.version)),
            )

        def make_manager(name: str, folder: Path) -> ModelManager:
            return ModelManager(
                folder,
                metrics,
                pinned_version=s.model_version,
                policy=policy,
                model_name=name,
                runtime=s.runtime,
                threads=s.model_threads,
                max_batch=s.max_batch_size,
                loader=loader,
                monitoring=monitoring,
                make_batcher=make_batcher,
            )

        core = cls(ModelRepository(s.model_dir, s.model_name, make_manager), s.model_control)
        metrics.track(metrics.queue_images, lambda: core.queued_images)
        return core

    # --- the batchers, one per loaded version

    def _batchers(self) -> list[DynamicBatcher]:
        return [m.batcher for m in self.repository.loaded() if m.batcher]

    @property
    def batcher(self) -> DynamicBatcher | None:
        """The default version's batcher (None while nothing is loaded)."""
        default = self.repository.current
        return default.batcher if default is not None else None

    @property
    def queued_images(self) -> int:
        """Images accepted by every version's batcher and not yet handed to a model."""
        return sum(b.queued_images for b in self._batchers())

    @property
    def unresolved(self) -> int:
        """Calls submitted to any batcher and not answered yet."""
        return sum(b.unresolved for b in self._batchers())

    @property
    def alive(self) -> bool:
        """False once a batcher's thread has failed."""
        return all(b.alive for b in self._batchers())

    def poke(self) -> None:
        """A call on its way ended without reaching a batcher (see ``DynamicBatcher.poke``)."""
        for batcher in self._batchers():
            batcher.poke()

    def start(self) -> None:
        """Start serving on the running event loop: the batchers of the versions loaded and
        of every one loaded later deliver their answers here."""
        self._loop = asyncio.get_running_loop()
        self.repository.attach(self._loop)

    async def stop(self) -> None:
        """Refuse new calls, finish every admitted one (of every version, those being
        unloaded too), end the batchers."""
        await asyncio.gather(*(b.stop() for b in self._batchers()))
        for manager in list(self.repository.models.values()):
            for unloading in list(manager.unloading.values()):
                await asyncio.wrap_future(unloading)

    # --- lookup and readiness

    def resolve(
        self, model: str | None = None, version: int | str | None = None, label: str | None = None
    ) -> LoadedModel:
        """The loaded version that serves a call for ``model`` (None: the default model),
        pinned to ``version`` or ``label`` when given, else the default.

        Raises:
            NotFound: the model, label or version is not served (the message names what is).
            Unavailable: no version is loaded yet (the message says why).
        """
        manager = self.repository.model(model)
        routes = manager.routes  # one snapshot for the whole lookup
        if label:
            found = routes.labels.get(label)
            if found is None:
                raise UnknownLabel(
                    f"label {quoted(label)} of model '{manager.model_name}' points at no "
                    f"loaded version; {routes.loaded()}"
                )
            if version is not None and str(version) != str(found.version):
                raise NotFound(
                    f"label {quoted(label)} of model '{manager.model_name}' points at version "
                    f"{found.version}, not {quoted(version)}"
                )
            return found
        if version is None:
            if routes.default is None:
                return manager.serving_model()  # UNAVAILABLE saying why
            return routes.default
        if not routes.versions:
            return manager.serving_model()
        # a protocol may name versions as text ("3")
        try:
            return routes.versions[int(version)]
        except (KeyError, ValueError):
            raise NotFound(manager.not_loaded(quoted(version))) from None

    def check_serving(self) -> None:
        """UNAVAILABLE, saying why, while no version of any model is loaded (a new stream
        is refused then; each of its images names its own model and version)."""
        if self.repository.current is None:
            why = self.repository.waiting_for() or "loading"
            raise Unavailable(f"no model version is loaded yet: {why}")

    def routes(self, model: LoadedModel) -> Routes:
        """What the model of a resolved version serves now (its versions and labels)."""
        return self.repository.model(model.name).routes

    def model_ready(
        self, model: str | None = None, version: int | str | None = None, label: str | None = None
    ) -> bool:
        """Whether :meth:`resolve` would find a version for these arguments."""
        try:
            self.resolve(model, version, label)
        except (NotFound, Unavailable):
            return False
        return True

    def ready(self, stuck_s: float) -> bool:
        """Whether the core can answer: a version is loaded and every batcher runs, with no
        model call running longer than ``stuck_s`` (a hung runtime). The server adds its
        own drain to this."""
        batchers = self._batchers()
        return self.repository.current is not None and all(
            b.alive and not b.stuck(stuck_s) for b in batchers
        )

    # --- inference

    # infer and submit hand back the batcher's own coroutine rather than wrapping it in one
    # more: the request path allocates nothing for the core (a lookup refuses at the call)

    def infer(
        self,
        images: np.ndarray,
        deadline: float | None,
        model: str | None = None,
        version: int | str | None = None,
        label: str | None = None,
    ) -> Coroutine[Any, Any, Answer]:
        """``await``: probabilities for uint8 ``images [N, 28, 28]`` from the version that
        serves ``model``/``version``/``label`` (see :meth:`resolve`, whose errors it raises),
        answered by ``deadline`` (``time.monotonic()`` seconds; None: none) or
        DEADLINE_EXCEEDED."""
        return self.submit(images, self.resolve(model, version, label), deadline)

    def submit(
        self, images: np.ndarray, loaded: LoadedModel, deadline: float | None
    ) -> Coroutine[Any, Any, Answer]:
        """:meth:`infer` for a version a protocol has already resolved (it checks the model
        before the rest of its request, as its own servers do): that version's batcher."""
        batcher = loaded.batcher
        if batcher is None:
            raise Unavailable(f"version {loaded.version} has no batcher (not serving)")
        return batcher.submit(images, deadline)

    def enqueue(self, images: np.ndarray, loaded: LoadedModel, deadline: float | None) -> Pending:
        """:meth:`submit` without waiting, for a stream: the answer resolves the returned
        :class:`~server.batcher.Pending`'s future (see ``DynamicBatcher.enqueue``)."""
        batcher = loaded.batcher
        if batcher is None:
            raise Unavailable(f"version {loaded.version} has no batcher (not serving)")
        return batcher.enqueue(images, deadline)

    def abandon(self, pending: Pending) -> None:
        """Give back the queue place of an :meth:`enqueue` that nobody waits for any more
        (to the batcher of the version it was queued for)."""
        if pending.owner is not None:
            pending.owner.abandon(pending)

    # --- the repository's management calls

    def index(self) -> list[ModelStatus]:
        """Every model, with every version on disk or loaded and its state (Triton's
        RepositoryIndex, TF Serving's GetModelStatus). Always allowed: it changes nothing."""
        return [self.status(name) for name in sorted(self.repository.models)]

    def status(self, name: str | None = None) -> ModelStatus:
        """One model as :meth:`index` lists it (None: the default model); NOT_FOUND if it
        is not in the repository."""
        manager = self.repository.model(name)
        routes = manager.routes
        return ModelStatus(
            manager.model_name,
            str(manager.policy),
            manager.version_states(),
            {label: m.version for label, m in routes.labels.items()},
            routes.default.version if routes.default is not None else None,
        )

    async def configure(
        self,
        name: str,
        policy: VersionPolicy | KeepType | None = KEEP,
        labels: Mapping[str, int] | None = None,
    ) -> ModelStatus:
        """Change a model's version policy and/or its labels and apply the change before
        answering (see :meth:`ModelManager.configure`); the model as it serves then.

        Raises:
            FailedPrecondition: ``--model-control`` is off; a label points at a version that
                is not loaded; the repository cannot be written.
            NotFound: no such model.
        """
        self.check_control()
        manager = self.repository.model(name)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, functools.partial(manager.configure, policy, labels))
        finally:
            if self.on_change is not None:
                await self.on_change()
        return self.status(manager.model_name)

    async def load(self, name: str, policy: VersionPolicy | None = None) -> ModelStatus:
        """Load a model (Triton's RepositoryModelLoad): its versions as ``policy`` says
        (None: ``--version-policy``). FAILED_PRECONDITION, saying why, when no version of
        it could be loaded."""
        if name not in self.repository.models:
            self.check_control()
            await asyncio.get_running_loop().run_in_executor(None, self.repository.scan)
        status = await self.configure(name, policy)
        if status.default_version is None:
            why = self.repository.model(name).waiting_for() or "no version loaded"
            raise FailedPrecondition(f"model '{name}' has no version loaded: {why}")
        return status

    async def unload(self, name: str) -> ModelStatus:
        """Unload every version of a model (Triton's RepositoryModelUnload: the policy
        ``none`` until it is loaded again); calls already admitted finish."""
        return await self.configure(name, VersionPolicy.parse("none"))

    def check_control(self) -> None:
        """FAILED_PRECONDITION unless the server was started with ``--model-control``."""
        if not self.model_control:
            raise FailedPrecondition(
                "model control is off: this server changes what it serves only through its "
                "model folder (start it with --model-control to load, unload and relabel)"
            )
