"""The dynamic batcher: coalesces concurrent requests into few model calls.

Contract
--------
* ``await batcher.submit(images, deadline)`` takes uint8 images ``[N, 28, 28]`` and returns
  ``(probabilities [N, 10], versions [N])`` for exactly those images, in order.
* Requests are served first come, first served. One model call runs at a time, on a worker
  thread, never on the event loop. When the model is free, the worker runs whatever is queued
  at that moment, up to ``max_batch_size`` images: an idle server adds no wait. While a call
  runs, new requests accumulate and form the next batch. With ``batch_timeout_s > 0`` the
  worker waits up to that long after the oldest queued request arrived for a batch to fill.
* A request larger than the room left in a batch is split: the part that fits rides in this
  batch, the rest leads the next one, and the parts are reassembled in order. The head of the
  queue is never skipped, so no request waits for a batch it does not fit in.
* The queue is bounded by ``max_queue_images`` (images not yet handed to the model); a request
  that would exceed it fails at once with :class:`~server.errors.ResourceExhausted`.
* A request whose deadline has passed when its batch is formed is failed with
  :class:`~server.errors.DeadlineExceeded` and costs no model time. A cancelled request is
  taken out of the queue count at once and skipped.
* If a model call raises, every request with images in that batch fails with the same
  :class:`~server.errors.ModelFailed` (or the model function's own
  :class:`~server.errors.ServiceError`, e.g. Unavailable when no model is loaded); the
  batcher keeps serving the next batch.
* ``stop()`` refuses new requests (:class:`~server.errors.Unavailable`), finishes every
  request already accepted, then ends the worker. Nothing accepted is dropped.

The model function is given at construction and called as ``model_fn(images)``, returning
``(probabilities, version)``; the caller decides which model that is at each call, so a hot
swap takes effect from the next batch while the current one finishes on the old model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.errors import (
    DeadlineExceeded,
    ModelFailed,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

ModelFn = Callable[[np.ndarray], tuple[np.ndarray, int]]
BatchResult = tuple[np.ndarray, np.ndarray]


@dataclass(eq=False)
class _Request:
    images: np.ndarray
    deadline: float | None  # loop.time() seconds
    enqueued: float
    future: asyncio.Future[BatchResult]
    next_image: int = 0  # first image not yet handed to the model
    parts: list[BatchResult] = field(default_factory=list)
    dispatched_at: float | None = None

    @property
    def waiting_images(self) -> int:
        return len(self.images) - self.next_image


@dataclass(frozen=True)
class _Slice:
    request: _Request
    start: int
    stop: int


class DynamicBatcher:
    """Coalesces concurrent requests into model calls; see the module docstring."""

    def __init__(
        self,
        model_fn: ModelFn,
        *,
        max_batch_size: int,
        max_queue_images: int,
        batch_timeout_s: float = 0.0,
        metrics: ServerMetrics | None = None,
        device: str = "cpu",
    ) -> None:
        if max_batch_size < 1 or max_queue_images < 1 or batch_timeout_s < 0:
            raise ValueError("max_batch_size and max_queue_images must be >= 1, timeout >= 0")
        self._model_fn = model_fn
        self.max_batch_size = max_batch_size
        self.max_queue_images = max_queue_images
        self.batch_timeout_s = batch_timeout_s
        self._metrics = metrics if metrics is not None else ServerMetrics()
        self._device = device
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._worker: asyncio.Task[None] | None = None
        # read at scrape time: no per-request cost on the hot path
        self._metrics.queue_images.set_function(lambda: self._queued_images)

    @property
    def queued_images(self) -> int:
        """Images accepted but not yet handed to the model."""
        return self._queued_images

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> BatchResult:
        """Queue ``images`` for the model and wait for their probabilities and versions."""
        n = len(images)
        if self._stopping or self._worker is None:
            raise Unavailable(
                "server is shutting down" if self._stopping else "batcher not started"
            )
        if n == 0:
            return np.zeros((0, 10), np.float32), np.zeros(0, np.int64)
        if self._queued_images + n > self.max_queue_images:
            raise ResourceExhausted(
                f"server overloaded: {self._queued_images} images queued, "
                f"limit {self.max_queue_images}; retry later"
            )
        loop = asyncio.get_running_loop()
        request = _Request(images, deadline, loop.time(), loop.create_future())
        self._queue.append(request)
        self._queued_images += n
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            if request.waiting_images:  # still (partly) queued: release its place now
                self._queued_images -= request.waiting_images
                request.next_image = len(request.images)
            raise

    async def stop(self) -> None:
        """Refuse new requests, finish every accepted one, then end the worker."""
        self._stopping = True
        self._wakeup.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_finished_head()
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batch_timeout_s > 0 and not self._stopping:
                await self._wait_to_fill(loop)
            batch = self._take_batch(loop.time())
            if batch:
                await self._compute(batch, loop)

    def _drop_finished_head(self) -> None:
        while self._queue and (self._queue[0].waiting_images == 0 or self._queue[0].future.done()):
            self._queue.popleft()

    async def _wait_to_fill(self, loop: asyncio.AbstractEventLoop) -> None:
        fill_by = self._queue[0].enqueued + self.batch_timeout_s
        while self._queued_images < self.max_batch_size and not self._stopping:
            remaining = fill_by - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self, now: float) -> list[_Slice]:
        """Pop up to max_batch_size images from the head; split the last request if needed."""
        batch: list[_Slice] = []
        room = self.max_batch_size
        while room and self._queue:
            req = self._queue[0]
            if req.future.done() or req.waiting_images == 0:  # cancelled, or failed earlier
                self._queue.popleft()
                continue
            if req.deadline is not None and req.deadline <= now:
                self._queue.popleft()
                self._queued_images -= req.waiting_images
                req.next_image = len(req.images)
                req.future.set_exception(
                    DeadlineExceeded("deadline passed while queued; the model was not run")
                )
                continue
            take = min(room, req.waiting_images)
            batch.append(_Slice(req, req.next_image, req.next_image + take))
            if req.dispatched_at is None:
                req.dispatched_at = now
                self._metrics.queue_seconds.observe(now - req.enqueued)
            req.next_image += take
            room -= take
            if req.waiting_images == 0:
                self._queue.popleft()
        self._queued_images -= self.max_batch_size - room
        return batch

    async def _compute(self, batch: list[_Slice], loop: asyncio.AbstractEventLoop) -> None:
        parts = [s.request.images[s.start : s.stop] for s in batch]
        images = parts[0] if len(parts) == 1 else np.concatenate(parts)
        try:
            probs, version, seconds = await loop.run_in_executor(
                self._executor, self._call_model, images
            )
        except ServiceError as err:  # e.g. Unavailable: no model loaded yet
            for s in batch:
                self._fail(s.request, err)
            return
        except Exception as err:
            log.error("model call on %d images failed", len(images), exc_info=err)
            self._metrics.batch_failures.inc()
            failure = ModelFailed(f"model failed on a batch of {len(images)} images")
            for s in batch:
                self._fail(s.request, failure)
            return
        self._metrics.batch_size.observe(len(images))
        self._metrics.compute_seconds.labels(self._device).observe(seconds)
        versions = np.full(len(images), version, np.int64)
        offset = 0
        for s in batch:
            n = s.stop - s.start
            self._deliver(s, probs[offset : offset + n], versions[offset : offset + n])
            offset += n

    def _call_model(self, images: np.ndarray) -> tuple[np.ndarray, int, float]:
        started = time.perf_counter()
        probs, version = self._model_fn(images)
        if probs.shape != (len(images), 10):
            raise ValueError(f"model returned shape {probs.shape} for {len(images)} images")
        return probs, version, time.perf_counter() - started

    def _fail(self, req: _Request, error: Exception) -> None:
        if req.waiting_images:  # the rest of a split request will not run either
            self._queued_images -= req.waiting_images
            req.next_image = len(req.images)
        if not req.future.done():
            req.future.set_exception(error)

    def _deliver(self, s: _Slice, probs: np.ndarray, versions: np.ndarray) -> None:
        req = s.request
        if req.future.done():  # cancelled while computing: nothing to deliver
            return
        if s.start == 0 and s.stop == len(req.images):
            req.future.set_result((probs, versions))
            return
        req.parts.append((probs, versions))
        if s.stop == len(req.images):
            req.future.set_result(
                (
                    np.concatenate([p for p, _ in req.parts]),
                    np.concatenate([v for _, v in req.parts]),
                )
            )
