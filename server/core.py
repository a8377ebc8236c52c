"""The inference core: what every protocol asks, with no protocol in it.

"These images, for model M, version V or label L (or the default), by deadline D": the
:class:`InferenceCore` answers with the probabilities, the version that computed them and
where the time went (the batcher's :class:`~server.batcher.Answer`). It owns the model lookup
(:class:`~server.manager.ModelManager`), readiness and the batcher; it knows nothing of gRPC.
The protocols (``server.servicer``, ``server.protocols.*``) only convert their messages to a
core call and its answer back to their messages.

Lookup, for every protocol alike, against one snapshot of what serves
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
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from server.batcher import Answer, DynamicBatcher, ModelFn, Pending
from server.errors import NotFound, Unavailable, quoted
from server.manager import ModelManager, VersionLoader
from server.metrics import ServerMetrics
from server.monitoring import ModelMonitoring
from server.settings import Settings
from server.versions import LoadedModel, VersionPolicy, load_version


class UnknownLabel(NotFound):
    """A version label that points at no version (a protocol may word it its own way)."""


class InferenceCore:
    """Model lookup, readiness and batching behind every protocol; see the module docstring."""

    def __init__(self, manager: ModelManager, model_name: str) -> None:
        self.manager = manager
        self.model_name = model_name  # the name callers use for the one model served
        self._loop: asyncio.AbstractEventLoop | None = None

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
        """The core a server with ``settings`` runs: its manager following ``--model-dir``
        with ``--version-policy``, a batcher for each loaded version. ``loader`` loads a
        version (a test's fake runtime comes in here); ``on_failure`` and ``arriving`` are
        the batchers' (see ``server.batcher``)."""
        s = settings

        def make_batcher(model_fn: ModelFn, version: int) -> DynamicBatcher:
            return DynamicBatcher(
                model_fn,
                max_batch_size=s.max_batch_size,
                max_queue_images=s.max_queue_images,
                batch_timeout_s=s.batch_timeout_ms / 1000.0,
                metrics=metrics,
                on_failure=on_failure,
                arriving=arriving,
                track_queue=False,  # the core shows the sum of every version's queue
                answered=metrics.version_requests.labels(str(version)),
            )

        manager = ModelManager(
            s.model_dir,
            metrics,
            pinned_version=s.model_version,
            policy=VersionPolicy.parse(s.version_policy),
            model_name=s.model_name,
            runtime=s.runtime,
            threads=s.model_threads,
            max_batch=s.max_batch_size,
            loader=loader,
            monitoring=monitoring,
            make_batcher=make_batcher,
        )
        core = cls(manager, s.model_name)
        metrics.track(metrics.queue_images, lambda: core.queued_images)
        return core

    # --- the batchers, one per loaded version

    def _batchers(self) -> list[DynamicBatcher]:
        return [m.batcher for m in self.manager.routes.versions.values() if m.batcher]

    @property
    def batcher(self) -> DynamicBatcher | None:
        """The default version's batcher (None while nothing is loaded)."""
        default = self.manager.routes.default
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
        self.manager.attach(self._loop)

    async def stop(self) -> None:
        """Refuse new calls, finish every admitted one (of every version, those being
        unloaded too), end the batchers."""
        await asyncio.gather(*(b.stop() for b in self._batchers()))
        for unloading in list(self.manager.unloading.values()):
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
        if model is not None and model != self.model_name:
            raise NotFound(
                f"model {quoted(model)} is not served here; this server serves '{self.model_name}'"
            )
        routes = self.manager.routes  # one snapshot for the whole lookup
        if label:
            found = routes.labels.get(label)
            if found is None:
                raise UnknownLabel(
                    f"label {quoted(label)} of model '{self.model_name}' points at no loaded "
                    f"version; {routes.loaded()}"
                )
            if version is not None and str(version) != str(found.version):
                raise NotFound(
                    f"label {quoted(label)} of model '{self.model_name}' points at version "
                    f"{found.version}, not {quoted(version)}"
                )
            return found
        if version is None:
            if routes.default is None:
                return self.manager.serving_model()  # UNAVAILABLE saying why
            return routes.default
        if not routes.versions:
            return self.manager.serving_model()
        # a protocol may name versions as text ("3")
        try:
            return routes.versions[int(version)]
        except (KeyError, ValueError):
            raise NotFound(self.manager.not_loaded(quoted(version))) from None

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
        return self.manager.routes.default is not None and all(
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
