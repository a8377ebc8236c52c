"""Streams of images over one call: read, batch, answer as ready, with bounded memory.

A :class:`StreamMethod` serves a bidirectional stream whose every message is one image (or a
few) with a caller-chosen key, and whose every answer carries that key. It is independent of
the wire format: a :class:`StreamCodec` reads a message and writes the answers, so mnist.v1's
PredictStream and other protocols' streams share the same machinery.

Contract of one stream:

* Each image read goes to the shared batcher at once; answers are written as soon as their
  batch is computed, so possibly out of order.
* At most ``window`` images are in flight (read, not yet answered; a message with several
  images may overshoot it once). At the window the reader stops reading, so HTTP/2 flow
  control slows the sender: a fast sender cannot grow the server's memory. The bytes of the
  messages in flight count against the server's byte budget (``CallTracker.charge``), as
  unary calls' bodies do.
* A message that is wrong, that the server refuses (byte budget spent, queue full), or whose
  batch failed, gets its own error answer; the stream goes on.
* A malformed message ends the stream with INVALID_ARGUMENT, and the server draining ends it
  with UNAVAILABLE; either way only after every image already read has been answered.
* A cancelled or broken stream gives back everything it holds (queue places, bytes, its
  in-flight count).
* Streams have a budget of their own (``--max-open-streams``), apart from unary calls. A
  stream with nothing in flight that sends no message for ``read_timeout`` seconds (before
  its first message) or ``idle_timeout`` seconds (after it) is ended with
  DEADLINE_EXCEEDED, so idle streams cannot keep the budget from callers that use it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio
import numpy as np

from server.batcher import Answer, Pending
from server.calls import CallTracker
from server.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from server.metrics import ServerMetrics
from server.rpc import Authenticator, Outcome, deadline_of

if TYPE_CHECKING:
    from server.core import InferenceCore
    from server.tracing import Tracing
    from server.versions import LoadedModel

log = logging.getLogger(__name__)


class ItemError(ServiceError):
    """One message's own error: answered with ``key``, and the stream goes on."""

    def __init__(self, key: Any, error: ServiceError) -> None:
        super().__init__(error.message)
        self.key = key
        self.code = error.code


class StreamCodec(Protocol):
    """How one protocol's stream messages are read and its answers written."""

    def read(self, raw: bytes) -> tuple[Any, np.ndarray, LoadedModel]:
        """The message's key, its images ``[N, 28, 28]`` and the version they are for (the
        core's ``resolve``, which the codec calls where its protocol checks the model).

        Raises:
            ItemError: this message is wrong; answer it with an error, read on.
            ServiceError: the stream itself is broken; end it with this status.
        """
        ...

    def answer(self, key: Any, answer: Answer, total_s: float | None) -> bytes:
        """The answer to the message ``key``: the batcher's ``answer`` for its images, and
        ``total_s`` seconds from reading the message to now for its server timing (None:
        the server gives no timing)."""
        ...

    def fail(self, key: Any, error: ServiceError) -> bytes:
        """The error answer to the message ``key``."""
        ...


class StreamMethod:
    """One bidirectional streaming RPC over the batcher; see the module docstring."""

    def __init__(
        self,
        name: str,
        codec: StreamCodec,
        core: InferenceCore,
        calls: CallTracker,
        metrics: ServerMetrics,
        auth: Authenticator,
        window: int,
        precondition: Callable[[], object] = lambda: None,
        tracing: Tracing | None = None,
        path: str = "",
        server_timing: bool = True,
        read_timeout: float = 10.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.name = name
        self.codec = codec
        self.core = core
        self.calls = calls
        self.metrics = metrics
        self.auth = auth
        self.window = window
        self.precondition = precondition  # raises a ServiceError to refuse a new stream
        self.tracing = tracing
        self.path = path  # "/service/Method", for its span
        self.server_timing = server_timing  # answers carry where their time went
        self.read_timeout = read_timeout  # seconds for the first message, nothing in flight
        self.idle_timeout = idle_timeout  # seconds for any later one, nothing in flight
        self.ok_images = metrics.images.labels(name, "OK")

    async def handle(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """Serve one stream: admit, authenticate, check the server is ready, run, record."""
        started = time.perf_counter()
        outcome = Outcome(context, self.name)
        admitted = False
        self.calls.arrive()
        try:
            async with outcome:
                self.calls.check_open()
                self.auth.check(context)  # before it takes a place in the stream budget
                self.calls.admit(self.name, stream=True)
                admitted = True
                self.precondition()
                if self.tracing is None:
                    await _Stream(self, context).run()
                else:
                    with self.tracing.stream_span(self.path, context.invocation_metadata()):
                        await _Stream(self, context).run()
        finally:
            self.calls.finish(self.name, outcome.code, admitted, stream=True)
            self.calls.leave()
            self.metrics.observe_rpc(self.name, outcome.code, 0, time.perf_counter() - started)

    def rpc_handler(self) -> grpc.RpcMethodHandler:
        """The handler to register: bidirectional, raw bytes both ways."""
        return grpc.stream_stream_rpc_method_handler(self.handle)


class _Stream:
    """The state of one stream while it runs."""

    def __init__(self, method: StreamMethod, context: grpc.aio.ServicerContext) -> None:
        self.m = method
        self.context = context
        self.deadline = deadline_of(context)
        # images read and not yet answered (a message that could not be read counts as one)
        self.in_flight = 0
        self.held_bytes = 0  # request bytes of those, charged to the server's byte budget
        self.pending: set[Pending] = set()
        # answers to write, each with the images and bytes it settles
        self.outbox: collections.deque[tuple[bytes, int, int]] = collections.deque()
        self.ready = asyncio.Event()  # an answer is in the outbox, or the reader ended
        self.room = asyncio.Event()  # in_flight dropped below the window
        self.draining = False
        self.reading = False  # the reader waits for the next message
        self.reader: asyncio.Task[None] | None = None
        self.messages = 0  # read so far
        self.idle_timer: asyncio.TimerHandle | None = None  # set while idle (see _arm_idle)
        self.idled_out = False

    async def run(self) -> None:
        self.reader = reader = asyncio.get_running_loop().create_task(self._read())
        self.m.calls.on_drain(self._drain)
        try:
            await self._write_until_done(reader)
            if self.draining:
                raise Unavailable("server is shutting down; every image read was answered")
            if self.idled_out:
                first = self.messages == 0
                limit = self.m.read_timeout if first else self.m.idle_timeout
                flag = "--read-timeout-seconds" if first else "--stream-idle-seconds"
                raise DeadlineExceeded(
                    f"the stream sent no {'first ' if first else ''}message for {limit:g} s "
                    f"({flag}) with nothing in flight; it is ended"
                )
            error = None if reader.cancelled() else reader.exception()
            if error is not None:
                raise error
        finally:
            self._disarm_idle()
            self.m.calls.off_drain(self._drain)
            if not reader.done():
                reader.cancel()
            for pending in self.pending:
                self.m.core.abandon(pending)
            self.m.calls.release(self.held_bytes)  # what was never answered

    def _arm_idle(self) -> None:
        """Start the idle clock: the reader waits and nothing is in flight."""
        if self.idle_timer is None and self.reading and self.in_flight == 0:
            limit = self.m.idle_timeout if self.messages else self.m.read_timeout
            self.idle_timer = asyncio.get_running_loop().call_later(limit, self._idle_out)

    def _disarm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_out(self) -> None:
        """The stream was idle too long: stop reading; it ends DEADLINE_EXCEEDED."""
        self.idle_timer = None
        self.idled_out = True
        if self.reader is not None:
            self.reader.cancel()
        self.ready.set()

    def _drain(self) -> None:
        """Stop reading (the server is going away); what was read is still answered."""
        self.draining = True
        if self.reading and self.reader is not None:
            self.reader.cancel()  # waiting for a message that is not read any more
        self.ready.set()
        self.room.set()

    async def _write_until_done(self, reader: asyncio.Task[None]) -> None:
        write = self.context.write
        calls = self.m.calls
        while True:
            while self.outbox:
                answer, images, size = self.outbox.popleft()
                await write(answer)
                self.in_flight -= images
                self.held_bytes -= size
                calls.release(size)
                if self.in_flight < self.m.window:
                    self.room.set()
                if self.in_flight == 0:
                    self._arm_idle()
            if (reader.done() or self.draining) and self.in_flight == 0:
                return
            self.ready.clear()
            await self.ready.wait()

    async def _read(self) -> None:
        try:
            await self._read_messages()
        finally:
            self.ready.set()

    async def _read_messages(self) -> None:
        m, codec = self.m, self.m.codec
        read = self.context.read
        while not self.draining:
            if self.in_flight >= m.window:
                self.room.clear()
                await self.room.wait()
                continue
            self.reading = True
            self._arm_idle()
            try:
                raw = await read()
            finally:
                self.reading = False
                self._disarm_idle()
            if not isinstance(raw, bytes):
                return  # the caller closed its side
            self.messages += 1
            read_at = time.perf_counter()
            try:
                key, images, loaded = codec.read(raw)
            except ItemError as err:  # read, so it is answered, drain or not
                self.in_flight += 1
                self._post(codec.fail(err.key, err), 1, 0, err.code.name)
                continue
            # a malformed message (another ServiceError) ends the stream once answers are out
            n = len(images)
            self.in_flight += n
            try:
                m.calls.charge(len(raw))
            except ServiceError as err:  # the server's byte budget is spent: this one's error
                self._post(codec.fail(key, err), n, 0, err.code.name, read_at)
                continue
            self.held_bytes += len(raw)
            try:
                pending = m.core.enqueue(images, loaded, self.deadline)
            except Unavailable:  # the batcher is shutting down: end like a drain
                self.in_flight -= n
                self.held_bytes -= len(raw)
                m.calls.release(len(raw))
                self.draining = True
                return
            except ServiceError as err:  # e.g. the queue is full: this message's own error
                self._post(codec.fail(key, err), n, len(raw), err.code.name, read_at)
                continue
            self.pending.add(pending)
            pending.future.add_done_callback(self._answered(key, pending, read_at, len(raw)))

    def _answered(
        self, key: Any, pending: Pending, read_at: float, size: int
    ) -> Callable[[asyncio.Future[Any]], None]:
        def done(future: asyncio.Future[Any]) -> None:
            self.pending.discard(pending)
            if future.cancelled():
                return
            n = len(pending.images)
            try:
                self._post(self._answer(key, pending, future, read_at), n, size, None, read_at)
            except ServiceError as err:
                self._post(self.m.codec.fail(key, err), n, size, err.code.name, read_at)
            except Exception as err:  # a bug: answered, logged, the stream goes on
                log.error("stream image failed", exc_info=err)
                failure = Internal("internal server error")
                self._post(self.m.codec.fail(key, failure), n, size, "INTERNAL", read_at)

        return done

    def _answer(
        self, key: Any, pending: Pending, future: asyncio.Future[Any], read_at: float
    ) -> bytes:
        """The answer to write for a finished image (its error is raised)."""
        error = future.exception()
        if error is not None:
            raise error
        answer = pending.answer()
        self.m.ok_images.inc(len(answer.probabilities))
        if self.m.tracing is not None:
            self.m.tracing.record(answer)
        total_s = time.perf_counter() - read_at if self.m.server_timing else None
        return self.m.codec.answer(key, answer, total_s)

    def _post(
        self, answer: bytes, images: int, size: int, error_code: str | None,
        read_at: float | None = None,
    ) -> None:  # fmt: skip
        """Queue an answer that settles ``images`` in flight and ``size`` bytes held.

        ``read_at``: the answer is to an inference request read then (its images were read),
        counted as one in the statistics, as a unary call is (a message that could not be read
        is not an inference request, as a unary call that could not be read is not).
        """
        if error_code is not None:
            self.m.metrics.images.labels(self.m.name, error_code).inc(images)
        if read_at is not None:
            self.m.metrics.stats.observe_request(error_code is None, time.perf_counter() - read_at)
        self.outbox.append((answer, images, size))
        self.ready.set()
