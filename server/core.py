"""The inference core: what every protocol asks, with no protocol in it.

"These images, for model M, version V or label L (or the default), by deadline D": the
:class:`InferenceCore` answers with the probabilities, the version that computed them and
where the time went (the batcher's :class:`~server.batcher.Answer`). It owns the model lookup
(:class:`~server.manager.ModelManager`), readiness and the batcher; it knows nothing of gRPC.
The protocols (``server.servicer``, ``server.protocols.*``) only convert their messages to a
core call and its answer back to their messages.

Lookup, for every protocol alike:

* a model name that is not served: NOT_FOUND naming what is served;
* a label: NOT_FOUND (no labels are assigned yet);
* nothing loaded yet: UNAVAILABLE saying why (what is missing);
* a version that is not loaded: NOT_FOUND naming the loaded version.

Today one version of one model serves, over one batcher. The calls take the resolved
:class:`~server.versions.LoadedModel` already so that a repository of several models and
versions (one batcher per version: batches never mix versions) changes this module only.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from server.batcher import Answer, DynamicBatcher, Pending
from server.errors import NotFound, Unavailable, quoted
from server.manager import ModelManager, VersionLoader
from server.metrics import ServerMetrics
from server.monitoring import ModelMonitoring
from server.settings import Settings
from server.versions import LoadedModel, load_version


class UnknownLabel(NotFound):
    """A version label that points at no version (a protocol may word it its own way)."""


class InferenceCore:
    """Model lookup, readiness and batching behind every protocol; see the module docstring."""

    def __init__(self, manager: ModelManager, batcher: DynamicBatcher, model_name: str) -> None:
        self.manager = manager
        self.batcher = batcher
        self.model_name = model_name  # the name callers use for the one model served

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
        and one batcher. ``loader`` loads a version (a test's fake runtime comes in here);
        ``on_failure`` and ``arriving`` are the batcher's (see ``server.batcher``)."""
        s = settings
        manager = ModelManager(
            s.model_dir,
            metrics,
            pinned_version=s.model_version,
            runtime=s.runtime,
            threads=s.model_threads,
            max_batch=s.max_batch_size,
            loader=loader,
            monitoring=monitoring,
        )
        batcher = DynamicBatcher(
            manager.predict,
            max_batch_size=s.max_batch_size,
            max_queue_images=s.max_queue_images,
            batch_timeout_s=s.batch_timeout_ms / 1000.0,
            metrics=metrics,
            on_failure=on_failure,
            arriving=arriving,
        )
        return cls(manager, batcher, s.model_name)

    # --- lookup and readiness

    def resolve(
        self, model: str | None = None, version: int | str | None = None, label: str | None = None
    ) -> LoadedModel:
        """The loaded version that serves a call for ``model`` (None: the default model),
        pinned to ``version`` or ``label`` when given.

        Raises:
            NotFound: the model, label or version is not served (the message names what is).
            Unavailable: no version is loaded yet (the message says why).
        """
        if model is not None and model != self.model_name:
            raise NotFound(
                f"model {quoted(model)} is not served here; this server serves '{self.model_name}'"
            )
        if label:
            raise UnknownLabel(
                f"label {quoted(label)} of model '{self.model_name}' points at no version "
                "(no labels are assigned)"
            )
        loaded = self.manager.serving_model()
        # a protocol may name versions as text ("3"); the comparison is as text
        if version is not None and str(version) != str(loaded.version):
            raise NotFound(
                f"version {quoted(version)} of model '{self.model_name}' is not served; "
                f"version {loaded.version} is"
            )
        return loaded

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
        """Whether the core can answer: a version is loaded and the batcher runs, with no
        model call running longer than ``stuck_s`` (a hung runtime). The server adds its
        own drain to this."""
        return (
            self.manager.current is not None
            and self.batcher.alive
            and not self.batcher.stuck(stuck_s)
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
        before the rest of its request, as its own servers do)."""
        # one batcher serves the one loaded version today: ``loaded`` picks it once several
        # versions each have their own
        return self.batcher.submit(images, deadline)

    def enqueue(self, images: np.ndarray, loaded: LoadedModel, deadline: float | None) -> Pending:
        """:meth:`submit` without waiting, for a stream: the answer resolves the returned
        :class:`~server.batcher.Pending`'s future (see ``DynamicBatcher.enqueue``)."""
        return self.batcher.enqueue(images, deadline)

    def abandon(self, pending: Pending) -> None:
        """Give back the queue place of an :meth:`enqueue` that nobody waits for any more."""
        self.batcher.abandon(pending)
