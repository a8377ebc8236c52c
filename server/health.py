"""Whether the server serves, told to everyone who asks: gRPC health, /readyz, the metrics,
and the ready file.

The server is SERVING when a model version is loaded and checked, the batcher's thread is
alive, it is not draining, and (with ``--workers``) every worker serves. Anything else is
NOT_SERVING. ``update()`` recomputes it from those facts and pushes the answer out; it is
cheap and idempotent, so whoever changes one of the facts calls it.

The health service ``liveness`` answers whether the process itself is sound (for a liveness
probe): SERVING from the start, even before a model is loaded or while draining, and
NOT_SERVING only once the process has failed and is about to exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grpc_health.v1 import health, health_pb2

from server.metrics import ServerMetrics
from server.ready_file import write_ready_file

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"


class _CountedHealthServicer(health.aio.HealthServicer):  # type: ignore[misc,name-defined]
    """grpcio-health-checking's servicer, telling ``on_call`` of each call it takes (the drain
    counts every call the server has taken off gRPC's queue)."""

    def __init__(self, on_call: Callable[[], None], on_return: Callable[[], None]) -> None:
        super().__init__()
        self._on_call = on_call
        self._on_return = on_return

    async def Check(self, request: Any, context: Any) -> Any:
        self._on_call()
        try:
            return await super().Check(request, context)
        finally:
            self._on_return()

    async def Watch(self, request: Any, context: Any) -> None:
        self._on_call()
        try:
            await super().Watch(request, context)
        finally:
            self._on_return()


class Health:
    """The serving state of one server process, and where it is published."""

    def __init__(
        self,
        services: Sequence[str],
        metrics: ServerMetrics,
        conditions: Sequence[Callable[[], bool]],
        alive: Callable[[], bool] = lambda: True,
        on_call: Callable[[], None] = lambda: None,
        on_return: Callable[[], None] = lambda: None,
    ) -> None:
        self.servicer = _CountedHealthServicer(on_call, on_return)
        self._services = ["", *services]
        self._metrics = metrics
        self._conditions = list(conditions)
        self._alive = alive
        self._published_alive: bool | None = None
        self.serving = False
        self._published: bool | None = None
        self._ready_file: Path | None = None
        self._facts: Callable[[], dict[str, Any]] = dict
        # one update at a time: servicer.set() can yield, and an update that started earlier
        # must not publish its older answer after a later one
        self._updating = asyncio.Lock()

    def add_condition(self, condition: Callable[[], bool]) -> None:
        """One more thing that must hold for the server to be SERVING."""
        self._conditions.append(condition)

    def publish_to(self, ready_file: Path | None, facts: Callable[[], dict[str, Any]]) -> None:
        """Also write the state to ``ready_file`` as JSON, with ``facts()`` (ports, version)."""
        self._ready_file = ready_file
        self._facts = facts

    def write_final(self, **facts: Any) -> None:
        """After the drain: the ready file says the process stopped, with ``facts``."""
        content = {"pid": os.getpid(), **self._facts(), "serving": False, "stopped": True}
        self._write_ready_file({**content, **facts})

    def _write_ready_file(self, content: dict[str, Any]) -> None:
        if self._ready_file is None:
            return
        try:
            write_ready_file(self._ready_file, content)
        except OSError as err:  # a tool's file must not stop a drain or a swap
            log.error("cannot write the ready file %s: %s", self._ready_file, err)

    async def update(self) -> bool:
        """Recompute the state from the conditions and publish it if it changed."""
        async with self._updating:
            return await self._update()

    async def _update(self) -> bool:
        alive = self._alive()
        if alive != self._published_alive:
            self._published_alive = alive
            await self.servicer.set(LIVENESS, SERVING if alive else NOT_SERVING)
        serving = all(condition() for condition in self._conditions)
        self.serving = serving
        if serving == self._published:
            return serving
        self._published = serving
        self._metrics.serving.set(1 if serving else 0)
        status = SERVING if serving else NOT_SERVING
        for service in self._services:
            await self.servicer.set(service, status)
        self._write_ready_file({"pid": os.getpid(), **self._facts(), "serving": serving})
        log.info("health: %s", "SERVING" if serving else "NOT_SERVING")
        return serving
