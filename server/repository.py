"""The model repository: every model under ``--model-dir``, each followed by its own
:class:`~server.manager.ModelManager` (versions, policy, labels, batchers).

Two layouts, told apart by what the folder holds:

* ``MODEL_DIR/<version>/`` (a version folder at the top, a ``labels.json`` or ``policy.json``
  there, or nothing yet): one model, named ``--model-name``;
* ``MODEL_DIR/<model name>/<version>/`` (Triton's): one model per folder, several at once
  (for example ``mlp`` and ``cnn`` side by side); hidden folders (``.tmp-*``) are no model.

The folder is looked at again at every poll: a model folder that appears is followed from
then on; one that disappears keeps serving what it has loaded (as a version folder that
disappears does). Calls that name no model go to ``--model-name``, or to the only model when
the repository holds one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from server.errors import NotFound, quoted
from server.manager import LABELS_FILE, POLICY_FILE, ModelManager
from server.versions import LoadedModel

log = logging.getLogger(__name__)
WAITING_LOG_SECONDS = 30.0  # while no version serves, the reason is logged this often
# a model's name: what Triton and TF Serving accept in a URL path or a file name
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

ManagerFactory = Callable[[str, Path], ModelManager]  # (model name, its folder)


class ModelRepository:
    """The models served, by name (swapped as one reference: a lookup sees one set)."""

    def __init__(self, root: Path, default_name: str, make_manager: ManagerFactory) -> None:
        """``make_manager`` makes the manager of a model found in the folder."""
        self.root = root
        self.default_name = default_name
        self._make_manager = make_manager
        self.models: Mapping[str, ModelManager] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_waiting_log = 0.0  # time.monotonic() of the next "not serving" warning
        self._scan_lock = threading.Lock()  # the poll and a management call may both scan
        self.scan()

    def layout(self) -> dict[str, Path]:
        """Each model's name and folder, as the repository folder holds them now."""
        single = {self.default_name: self.root}
        if not self.root.is_dir():
            return single
        named: dict[str, Path] = {}
        for child in self.root.iterdir():
            if child.name in (LABELS_FILE, POLICY_FILE) or child.name.isdigit():
                return single  # a version (or a model's own file) at the top: one model
            if child.is_dir() and MODEL_NAME.fullmatch(child.name):
                named[child.name] = child
        return named or single

    def scan(self) -> bool:
        """Follow the models the folder holds now; True when the set changed."""
        with self._scan_lock:
            return self._scan()

    def _scan(self) -> bool:
        layout = self.layout()
        models = dict(self.models)
        for name, folder in layout.items():
            if name not in models or models[name].model_dir != folder:
                if name not in models:
                    log.info("model '%s' found in %s", name, folder)
                models[name] = self._make_manager(name, folder)
                if self._loop is not None:
                    models[name].attach(self._loop)
        for name in [n for n in models if n not in layout and not models[n].routes.versions]:
            del models[name]  # (a layout change before anything loaded)
        changed = models.keys() != self.models.keys()
        self.models = models
        return changed

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Batchers deliver on ``loop`` (see :meth:`ModelManager.attach`)."""
        self._loop = loop
        for manager in self.models.values():
            manager.attach(loop)

    def refresh(self) -> bool:
        """Look for models, then let each load and unload what its policy says (blocking).
        True when what serves changed."""
        changed = self.scan()
        for manager in list(self.models.values()):
            changed = manager.refresh() or changed
        return changed

    # --- lookup

    def model(self, name: str | None = None) -> ModelManager:
        """The manager of model ``name`` (None or "": the default model).

        Raises:
            NotFound: no such model (the message names those served).
        """
        models = self.models
        if not name:
            if self.default_name in models:
                return models[self.default_name]
            if len(models) == 1:
                return next(iter(models.values()))
            raise NotFound(
                f"name a model: this server serves {self.names()} (none is named "
                f"'{self.default_name}', the default --model-name)"
            )
        manager = models.get(name)
        if manager is None:
            raise NotFound(f"model {quoted(name)} is not served here; this server serves "
                           f"{self.names()}")  # fmt: skip
        return manager

    def names(self) -> str:
        """The models served, for a message: "'cnn', 'mlp'"."""
        return ", ".join(f"'{name}'" for name in sorted(self.models)) or "no model"

    def default_manager(self) -> ModelManager | None:
        """The default model's manager, None when calls must name a model."""
        try:
            return self.model()
        except NotFound:
            return None

    @property
    def current(self) -> LoadedModel | None:
        """The version unpinned calls to the default model get (any model's default when
        calls must name one), None while nothing is loaded."""
        default = self.default_manager()
        if default is not None:
            return default.current
        return next((m.current for m in self.models.values() if m.current is not None), None)

    def loaded(self) -> list[LoadedModel]:
        """Every loaded version of every model."""
        return [m for manager in self.models.values() for m in manager.routes.versions.values()]

    # --- following the folder

    def waiting_for(self) -> str | None:
        """While no version serves: why, in one line (what is missing); else None."""
        if self.current is not None:
            return None
        reasons = [(name, manager.waiting_for()) for name, manager in sorted(self.models.items())]
        if len(reasons) == 1:
            return reasons[0][1]
        return "; ".join(f"model '{name}': {why}" for name, why in reasons if why) or None

    def warn_if_waiting(self) -> None:
        """Log why no version serves (a WARNING), at most every :data:`WAITING_LOG_SECONDS`."""
        reason = self.waiting_for()
        now = time.monotonic()
        if reason is not None and now >= self._next_waiting_log:
            log.warning("not serving: %s", reason)
            self._next_waiting_log = now + WAITING_LOG_SECONDS

    async def watch(self, poll_seconds: float, on_swap: Callable[[], Awaitable[object]]) -> None:
        """Check the folder every ``poll_seconds`` for models, versions, policies and labels;
        await ``on_swap`` after each change. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self.warn_if_waiting()
            await asyncio.sleep(poll_seconds)
            try:
                swapped = await loop.run_in_executor(None, self.refresh)
            except Exception:  # a watcher that dies silently would freeze the versions
                log.exception("model refresh failed")
                continue
            if swapped:
                await on_swap()
