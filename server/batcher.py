"""The dynamic batcher: coalesces concurrent requests into few model calls.

Contract
--------
* ``await batcher.submit(images, deadline)`` takes uint8 images ``[N, 28, 28]`` and returns
  ``(probabilities [N, 10], versions [N])`` for exactly those images, in order.
* Requests are served first come, first served. One model call runs at a time, on the
  batcher's own thread, never on the event loop. When the model is free, the thread runs
  whatever is queued at that moment, up to ``max_batch_size`` images: an idle server adds no
  wait. While a call runs, new requests accumulate and form the next batch. With
  ``batch_timeout_s > 0`` the thread waits up to that long after the oldest queued request
  arrived for a batch to fill.
* A request larger than the room left in a batch is split: the part that fits rides in this
  batch, the rest leads the next one, and the parts are reassembled in order. The head of the
  queue is never skipped, so no request waits for a batch it does not fit in.
* The queue is bounded by ``max_queue_images`` (images not yet handed to the model); a request
  that would exceed it fails at once with :class:`~server.errors.ResourceExhausted`.
* A request whose deadline (``time.monotonic()`` seconds) has passed when its batch is formed
  is failed with :class:`~server.errors.DeadlineExceeded` and costs no model time. A cancelled
  request is taken out of the queue count at once and skipped.
* If a model call raises, every request with images in that batch fails with the same
  :class:`~server.errors.ModelFailed` (or the model function's own
  :class:`~server.errors.ServiceError`, e.g. Unavailable when no model is loaded); the
  batcher keeps serving the next batch.
* ``stop()`` refuses new requests (:class:`~server.errors.Unavailable`), finishes every
  request already accepted, then ends the thread. Nothing accepted is dropped.

The model function is given at construction and called as ``model_fn(images)``, returning
``(probabilities, version)``; the caller decides which model that is at each call, so a hot
swap takes effect from the next batch while the current one finishes on the old model.

Why a thread of its own rather than an asyncio task handing batches to an executor: the
thread forms the next batch the moment the model is free and hands each finished batch back
to the event loop with one ``call_soon_threadsafe``. A task would need several event-loop
turns per batch, each queued behind every other RPC's callbacks; measured at 64 concurrent
calls, that kept the model idle between small batches. The queue is shared under one lock;
request futures are only touched on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    future: asyncio.Future[BatchResult]
    next_image: int = 0  # first image not yet handed to the model (guarded by the lock)
    parts: list[BatchResult] = field(default_factory=list)  # event loop only
    dispatched: bool = False

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
        self._compute_seconds = self._metrics.compute_seconds.labels(device)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # signalled when requests arrive or stop
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_images = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finished: asyncio.Future[None] | None = None
        # read at scrape time: no per-request cost on the hot path
        self._metrics.queue_images.set_function(lambda: self._queued_images)

    @property
    def queued_images(self) -> int:
        """Images accepted but not yet handed to the model."""
        return self._queued_images

    def start(self) -> None:
        """Start the batcher's thread; results are delivered on the running event loop."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._finished = self._loop.create_future()
            self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
            self._thread.start()

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> BatchResult:
        """Queue ``images`` for the model and wait for their probabilities and versions."""
        n = len(images)
        if self._loop is None:
            raise Unavailable("batcher not started")
        request = _Request(images, deadline, time.monotonic(), self._loop.create_future())
        with self._lock:  # checked under the lock: the thread ends once stopping and empty
            if self._stopping:
                raise Unavailable("server is shutting down")
            if n == 0:
                return np.zeros((0, 10), np.float32), np.zeros(0, np.int64)
            if self._queued_images + n > self.max_queue_images:
                raise ResourceExhausted(
                    f"server overloaded: {self._queued_images} images queued, "
                    f"limit {self.max_queue_images}; retry later"
                )
            self._queue.append(request)
            self._queued_images += n
            self._work.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            with self._lock:  # still (partly) queued: release its place now
                self._release(request)
            raise

    async def stop(self) -> None:
        """Refuse new requests, finish every accepted one, then end the thread."""
        with self._lock:
            self._stopping = True
            self._work.notify()
        if self._finished is not None:
            # set by the thread after its last hand-back: every result has been delivered
            await asyncio.shield(self._finished)

    # --- the batcher's thread

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._stopping:
                        self._work.wait()
                    if not self._queue:
                        return  # stopping, and everything accepted has been answered
                    if self.batch_timeout_s > 0 and not self._stopping:
                        self._wait_to_fill()
                    batch, expired = self._take_batch(time.monotonic())
                if expired:
                    error = DeadlineExceeded("deadline passed while queued; the model was not run")
                    self._post(self._fail_all, expired, error)
                if batch:
                    self._compute(batch)
        finally:
            if self._finished is not None:
                self._post(self._finished.set_result, None)

    def _wait_to_fill(self) -> None:
        fill_by = self._queue[0].enqueued + self.batch_timeout_s
        while self._queued_images < self.max_batch_size and not self._stopping:
            remaining = fill_by - time.monotonic()
            if remaining <= 0:
                return
            self._work.wait(remaining)

    def _take_batch(self, now: float) -> tuple[list[_Slice], list[_Request]]:
        """Pop up to max_batch_size images from the head; split the last request if needed.

        Returns the batch and the requests whose deadline passed. Called under the lock.
        """
        batch: list[_Slice] = []
        expired: list[_Request] = []
        room = self.max_batch_size
        while room and self._queue:
            req = self._queue[0]
            if req.waiting_images == 0:  # cancelled, or failed earlier
                self._queue.popleft()
                continue
            if req.deadline is not None and req.deadline <= now:
                self._queue.popleft()
                self._release(req)
                expired.append(req)
                continue
            take = min(room, req.waiting_images)
            batch.append(_Slice(req, req.next_image, req.next_image + take))
            if not req.dispatched:
                req.dispatched = True
                self._metrics.queue_seconds.observe(now - req.enqueued)
            req.next_image += take
            room -= take
            if req.waiting_images == 0:
                self._queue.popleft()
        self._queued_images -= self.max_batch_size - room
        return batch, expired

    def _compute(self, batch: list[_Slice]) -> None:
        n = sum(s.stop - s.start for s in batch)
        started = time.perf_counter()
        try:
            parts = [s.request.images[s.start : s.stop] for s in batch]
            images = parts[0] if len(parts) == 1 else np.concatenate(parts)
            probs, version = self._model_fn(images)
            if probs.shape != (n, 10):
                raise ValueError(f"model returned shape {probs.shape} for {n} images")
        except Exception as err:
            if isinstance(err, ServiceError):  # e.g. Unavailable: no model loaded yet
                error: ServiceError = err
            else:
                log.error("model call on %d images failed", n, exc_info=err)
                self._metrics.batch_failures.inc()
                error = ModelFailed(f"model failed on a batch of {n} images")
            with self._lock:  # the rest of a split request will not run either
                for s in batch:
                    self._release(s.request)
            self._post(self._fail_all, [s.request for s in batch], error)
            return
        self._compute_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(n)
        self._post(self._deliver, batch, probs, np.full(n, version, np.int64))

    def _release(self, req: _Request) -> None:
        """Take a request's images that are still queued out of the count. Under the lock."""
        if req.waiting_images:
            self._queued_images -= req.waiting_images
            req.next_image = len(req.images)

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting for the answer any more
            log.debug("event loop closed; dropping a batch hand-back")

    # --- back on the event loop

    @staticmethod
    def _fail_all(requests: list[_Request], error: Exception) -> None:
        for req in requests:
            if not req.future.done():
                req.future.set_exception(error)

    @staticmethod
    def _deliver(batch: list[_Slice], probs: np.ndarray, versions: np.ndarray) -> None:
        offset = 0
        for s in batch:
            n = s.stop - s.start
            req = s.request
            rows = probs[offset : offset + n], versions[offset : offset + n]
            offset += n
            if req.future.done():  # cancelled while computing, or an earlier part failed
                continue
            if s.start == 0 and s.stop == len(req.images):
                req.future.set_result(rows)
                continue
            req.parts.append(rows)
            if s.stop == len(req.images):
                req.future.set_result(
                    (
                        np.concatenate([p for p, _ in req.parts]),
                        np.concatenate([v for _, v in req.parts]),
                    )
                )
