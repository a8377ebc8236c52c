"""The dynamic batcher: coalesces concurrent requests into few model calls.

Contract
--------
* ``await batcher.submit(images, deadline)`` takes uint8 images ``[N, 28, 28]`` and returns an
  :class:`Answer`: ``probabilities [N, 10]`` and ``versions [N]`` for exactly those images, in
  order, and where its time went (queue wait, model time, size of the batch it rode in).
  ``enqueue(images, deadline)`` does the same without waiting: the returned :class:`Pending`'s
  future resolves with that answer, and ``abandon(pending)`` gives a place back that its
  caller no longer wants (a stream that was cancelled).
* Requests are served first come, first served. One model call runs at a time, on the
  batcher's own thread, never on the event loop. When the model is free, the thread runs
  whatever is queued at that moment, up to ``max_batch_size`` images: an idle server adds no
  wait. While a call runs, new requests accumulate and form the next batch.
* With ``batch_timeout_s > 0`` the thread may wait up to that long after the oldest queued
  request arrived for a batch to fill, but only while ``arriving()`` says more requests are
  on their way (calls the server has taken in that have not reached the batcher yet): a
  request that is alone never waits. Without ``arriving``, it always waits. ``poke()`` tells
  a waiting thread to look again when a call on its way ended without reaching it.
* Requests that reach the batcher in the same turn of the event loop reach the thread
  together: the thread is woken once per turn, after every handler of that turn has run, so
  requests that arrive together are batched together (rather than the first one waking the
  thread for a batch of one).
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
* If the thread itself fails (a bug outside the model call), every queued request, and every
  request of the batch it was working on that has no answer yet, fails with
  :class:`~server.errors.Unavailable`, new ones are refused the same way, and ``on_failure``
  is called on the event loop: the server turns NOT_SERVING and exits non-zero, so that a
  supervisor restarts it rather than leaving requests to queue with no consumer.
* ``stop()`` refuses new requests (:class:`~server.errors.Unavailable`), finishes every
  request already accepted, then ends the thread. Nothing accepted is dropped.

The model function is given at construction and called as ``model_fn(images)``, returning
``(probabilities, version)``; the caller decides which model that is at each call, so a hot
swap takes effect from the next batch while the current one finishes on the old model.

Why a thread of its own rather than an asyncio task handing batches to an executor: the
thread forms the next batch the moment the model is free and hands each finished batch back
to the event loop with one ``call_soon_threadsafe``. A task would need several event-loop
turns per batch, each queued behind every other RPC's callbacks. The queue is shared under
one lock; request futures are only touched on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from mnist_client.contract import NUM_CLASSES
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


class Answer(NamedTuple):
    """What the batcher answers for one request."""

    probabilities: np.ndarray  # [N, 10]
    versions: np.ndarray  # [N]: the model version of each image's batch
    queue_s: float  # from queueing to its first model call
    compute_s: float  # model time of the call(s) that computed it
    batch_size: int  # images in the model call that carried its first image
    dispatched_at: float = 0.0  # time.monotonic() when its first image went to the model


@dataclass(eq=False)
class Pending:
    """A request in the batcher: its images, and the future its answer resolves."""

    images: np.ndarray
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    future: asyncio.Future[BatchResult]
    next_image: int = 0  # first image not yet handed to the model (guarded by the lock)
    parts: list[BatchResult] = field(default_factory=list)  # event loop only
    dispatched: bool = False
    queue_s: float = 0.0  # set when its first image is handed to the model
    dispatched_at: float = 0.0
    compute_s: float = 0.0  # summed over its batches, on the event loop
    batch_size: int = 0
    owner: DynamicBatcher | None = None  # the batcher that queued it (abandon goes there)

    def answer(self) -> Answer:
        """Its answer, once the future is done."""
        probs, versions = self.future.result()
        return Answer(
            probs, versions, self.queue_s, self.compute_s, self.batch_size, self.dispatched_at
        )

    @property
    def waiting_images(self) -> int:
        return len(self.images) - self.next_image


@dataclass(frozen=True)
class _Slice:
    request: Pending
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
        on_failure: Callable[[BaseException], None] | None = None,
        arriving: Callable[[], int] | None = None,
        track_queue: bool = True,
        answered: Any = None,
    ) -> None:
        """``track_queue``: show this batcher's queue as the ``mnist_queue_images`` gauge
        (off where a core sums the queues of several batchers itself); ``answered``: a
        counter (a Prometheus child) of the requests it answers, counted once per batch."""
        if max_batch_size < 1 or max_queue_images < 1 or batch_timeout_s < 0:
            raise ValueError("max_batch_size and max_queue_images must be >= 1, timeout >= 0")
        self._model_fn = model_fn
        self.max_batch_size = max_batch_size
        self.max_queue_images = max_queue_images
        self.batch_timeout_s = batch_timeout_s
        self._metrics = metrics if metrics is not None else ServerMetrics()
        self._on_failure = on_failure
        self._arriving = arriving
        self.unresolved = 0  # requests submitted and not yet answered (written on the event loop)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # signalled when requests arrive or stop
        self._queue: collections.deque[Pending] = collections.deque()
        self._in_hand: list[Pending] = []  # taken off the queue by the thread, not yet handed back
        self._queued_images = 0
        self._stopping = False
        self._failed: BaseException | None = None
        # what the thread is doing (guarded by the lock): "busy" with a batch, "idle" waiting for
        # work, or "filling": waiting for requests on their way to join the next batch
        self._state = "busy"
        self._wake_scheduled = False  # a wake-up is due at the end of this loop turn
        self._computing_since: float | None = None  # monotonic start of the model call running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finished: asyncio.Future[None] | None = None
        # what a request gets once the batcher stops (None: UNAVAILABLE, the server stops);
        # a retired model version says NOT_FOUND naming what is loaded instead
        self.refusal: Callable[[], ServiceError] | None = None
        self._answered = answered
        if track_queue:
            self._metrics.track(self._metrics.queue_images, lambda: self._queued_images)

    @property
    def queued_images(self) -> int:
        """Images accepted but not yet handed to the model."""
        return self._queued_images

    @property
    def started(self) -> bool:
        """Whether :meth:`start` has run (its thread serves)."""
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """False once the thread has failed (see the contract)."""
        return self._failed is None

    def stuck(self, limit_s: float) -> bool:
        """True while one model call has been running for more than ``limit_s`` seconds (a
        hung runtime: nothing queued behind it will be answered)."""
        since = self._computing_since
        return since is not None and time.monotonic() - since > limit_s

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the batcher's thread; results are delivered on ``loop`` (default: the
        running event loop; a version loaded in a worker thread names the server's)."""
        if self._thread is None:
            self._loop = loop if loop is not None else asyncio.get_running_loop()
            self._finished = self._loop.create_future()
            self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
            self._thread.start()

    async def submit(self, images: np.ndarray, deadline: float | None = None) -> Answer:
        """Queue ``images`` (at least one) for the model and wait for their answer."""
        request = self.enqueue(images, deadline)
        self.unresolved += 1
        try:
            await request.future
            return request.answer()
        except asyncio.CancelledError:
            self.abandon(request)
            raise
        finally:
            self.unresolved -= 1

    def enqueue(self, images: np.ndarray, deadline: float | None = None) -> Pending:
        """Queue ``images`` (at least one) and return at once; see the contract."""
        n = len(images)
        loop = self._loop
        if loop is None:
            raise Unavailable("batcher not started")
        request = Pending(images, deadline, time.monotonic(), loop.create_future(), owner=self)
        with self._lock:  # checked under the lock: the thread ends once stopping and empty
            if self._stopping and self._failed is None and self.refusal is not None:
                raise self.refusal()
            if self._stopping or self._failed is not None:
                raise Unavailable(
                    "server is shutting down" if self._stopping else "server is failing"
                )
            if self._queued_images + n > self.max_queue_images:
                raise ResourceExhausted(
                    f"server overloaded: {self._queued_images} images queued, "
                    f"limit {self.max_queue_images}; retry later"
                )
            self._queue.append(request)
            self._queued_images += n
            wake = self._state != "busy" and not self._wake_scheduled
            if wake:
                self._wake_scheduled = True
        if wake:
            loop.call_soon(self._wake)
        return request

    def abandon(self, request: Pending) -> None:
        """Give back the queue place of a request nobody waits for any more."""
        with self._lock:  # still (partly) queued: release its place now
            self._release(request)
        if not request.future.done():
            request.future.cancel()

    def poke(self) -> None:
        """Something the fill wait depends on changed (a call on its way ended without
        reaching the batcher): let a filling thread look again. Event loop only; cheap."""
        if self._state == "filling" and not self._wake_scheduled and self._loop is not None:
            self._wake_scheduled = True
            self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        # Once per loop turn. A filling thread is only woken when its batch is full or nothing
        # more is on its way: waking it for every arrival costs a thread switch each time.
        with self._lock:
            self._wake_scheduled = False
            if self._state == "idle" or (
                self._state == "filling"
                and (
                    self._queued_images >= self.max_batch_size
                    or (self._arriving is not None and self._arriving() <= 0)
                )
            ):
                self._work.notify()

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
            self._serve()
        except BaseException as err:  # a bug here must not leave requests queued forever
            log.critical("batcher thread failed; failing queued requests", exc_info=err)
            with self._lock:
                self._failed = err
                queued = [*self._in_hand, *self._queue]  # in hand: its answer may never come
                self._queue.clear()
                for req in queued:
                    self._release(req)
            self._post(self._fail_all, queued, Unavailable("server is failing; retry"))
            if self._on_failure is not None:
                self._post(self._on_failure, err)
        finally:
            if self._finished is not None:
                self._post(_set_result_once, self._finished)

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._wait("idle")
                if not self._queue:
                    return  # stopping, and everything accepted has been answered
                if self.batch_timeout_s > 0 and not self._stopping:
                    self._wait_to_fill()
                batch, expired = self._take_batch(time.monotonic())
                self._in_hand = [*expired, *(s.request for s in batch)]
            if expired:
                self._metrics.expired_images.inc(sum(len(r.images) for r in expired))
                error = DeadlineExceeded("deadline passed while queued; the model was not run")
                self._post(self._fail_all, expired, error)
            if batch:
                self._compute(batch)
            self._in_hand = []  # every answer or error is posted by now

    def _wait_to_fill(self) -> None:
        fill_by = self._queue[0].enqueued + self.batch_timeout_s
        arriving = self._arriving
        while self._queued_images < self.max_batch_size and not self._stopping:
            remaining = fill_by - time.monotonic()
            if remaining <= 0 or (arriving is not None and arriving() <= 0):
                return
            self._wait("filling", remaining)

    def _wait(self, state: str, timeout: float | None = None) -> None:
        """Wait for a notify (work, a full batch, stop) or ``timeout``. Under the lock."""
        self._state = state
        self._work.wait(timeout)
        self._state = "busy"

    def _take_batch(self, now: float) -> tuple[list[_Slice], list[Pending]]:
        """Pop up to max_batch_size images from the head; split the last request if needed.

        Returns the batch and the requests whose deadline passed. Called under the lock.
        """
        batch: list[_Slice] = []
        expired: list[Pending] = []
        room = self.max_batch_size
        observe_queue = self._metrics.observe_queue
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
                req.queue_s = now - req.enqueued
                req.dispatched_at = now
                req.batch_size = -1  # this batch's size, once known (below)
                observe_queue(req.queue_s)
            req.next_image += take
            room -= take
            if req.waiting_images == 0:
                self._queue.popleft()
        taken = self.max_batch_size - room
        self._queued_images -= taken
        for s in batch:
            if s.request.batch_size == -1:
                s.request.batch_size = taken
        return batch, expired

    def _compute(self, batch: list[_Slice]) -> None:
        n = sum(s.stop - s.start for s in batch)
        try:
            gathering = time.perf_counter()
            parts = [s.request.images[s.start : s.stop] for s in batch]
            images = parts[0] if len(parts) == 1 else np.concatenate(parts)
            started = time.perf_counter()
            input_s = started - gathering
            self._computing_since = time.monotonic()
            try:
                probs, version = self._model_fn(images)
            finally:
                self._computing_since = None
            compute_s = time.perf_counter() - started
            if probs.shape != (n, NUM_CLASSES):
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
        self._metrics.batch_size.observe(n)
        self._post(self._deliver_and_count, batch, probs, version, input_s, compute_s)

    def _release(self, req: Pending) -> None:
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
    def _fail_all(requests: list[Pending], error: Exception) -> None:
        for req in requests:
            if not req.future.done():
                req.future.set_exception(error)

    def _deliver_and_count(
        self, batch: list[_Slice], probs: np.ndarray, version: int, input_s: float,
        compute_s: float,
    ) -> None:  # fmt: skip
        """Hand the batch's answers out, then count the call (both on the event loop)."""
        started = time.perf_counter()
        self._deliver(batch, probs, version, compute_s)
        output_s = time.perf_counter() - started
        self._metrics.stats.observe_batch(len(probs), input_s, compute_s, output_s)
        if self._answered is not None:  # requests whose last image was in this batch
            self._answered.inc(sum(s.stop == len(s.request.images) for s in batch))

    @staticmethod
    def _deliver(batch: list[_Slice], probs: np.ndarray, version: int, compute_s: float) -> None:
        offset = 0
        for s in batch:
            n = s.stop - s.start
            req = s.request
            rows = probs[offset : offset + n], np.full(n, version, np.int64)
            offset += n
            if req.future.done():  # cancelled while computing, or an earlier part failed
                continue
            req.compute_s += compute_s
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


def _set_result_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
