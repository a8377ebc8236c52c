"""gRPC plumbing around the servicer: admission, auth, status mapping, metrics, per call.

Each method is registered with the C core (as generated code does) with raw bytes in and out:
requests are read by :mod:`server.wire`, strictly, and responses are written there too.

A unary method is registered as a *stream-unary* handler that reads its one request itself.
gRPC then runs the handler the moment the call arrives, instead of after the body is
received: a draining server or a wrong token refuses the call before its body is read, a
body that does not arrive within ``--read-timeout-seconds`` ends the call, and a call that
is cancelled or runs out of deadline while its body is still arriving is counted like any
other (with a plain unary handler gRPC drops such calls before any server code sees them,
and no metric shows them). The call takes its place among the calls in flight only once its
body has arrived. For the client nothing changes: it is the same HTTP/2 exchange.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio

from mnist_client.timing import HEADER as TIMING_HEADER
from mnist_client.timing import format_server_timing
from server.batcher import Answer
from server.calls import CallTracker
from server.errors import DeadlineExceeded, InvalidArgument, ServiceError, Unauthenticated
from server.metrics import ServerMetrics

if TYPE_CHECKING:
    from server.tracing import Tracing

log = logging.getLogger(__name__)


class NoRequestMessage(InvalidArgument):
    """The request stream ended without a message. When this status cannot be sent, gRPC's
    core has ended the call itself, because the message was over --max-message-bytes: the
    caller got RESOURCE_EXHAUSTED, and the call is counted so (not as CANCELLED)."""


class Call:
    """What a method implementation gets besides the request bytes."""

    __slots__ = ("answer", "calls", "charged", "context", "deadline", "images")

    def __init__(self, context: grpc.aio.ServicerContext, calls: CallTracker) -> None:
        self.context = context
        self.calls = calls
        self.deadline = deadline_of(context)
        self.images = 0  # set by the implementation once it knows, for the metrics
        self.answer: Answer | None = None  # the batcher's, for the server-timing trailer
        self.charged = 0  # bytes charged beyond the request's own, given back at its end

    def charge(self, size: int) -> None:
        """Charge ``size`` more bytes to the server's byte budget for this call (what its
        request expands to), or refuse it with RESOURCE_EXHAUSTED."""
        self.calls.charge(size)
        self.charged += size


UnaryImpl = Callable[[bytes, Call], Awaitable[bytes]]


class Authenticator:
    """Checks the bearer token of a call in constant time (when the server has one)."""

    def __init__(self, token: bytes | None) -> None:
        self.expected = token

    def check(self, context: grpc.aio.ServicerContext) -> None:
        if self.expected is None:
            return
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(presented, self.expected):
                    return
                raise Unauthenticated("invalid bearer token")
        raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline in ``time.monotonic()`` seconds (the batcher's clock), or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# A call gRPC ends this close to its deadline was ended by the deadline: the client's timer
# starts before the server's (the request takes time to arrive), so it fires a little earlier.
DEADLINE_MARGIN_S = 0.05


def ended_code(context: grpc.aio.ServicerContext) -> str:
    """How to count a call that gRPC ended before we answered it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_MARGIN_S:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"


class Outcome:
    """How a call ended, as the status code name its metrics record; ``async with`` it around
    the handler's work, and an error leaving the block is sent to the caller as its status:
    a :class:`ServiceError` as itself, anything unexpected as a generic INTERNAL (the detail
    goes to the log, never to the caller)."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        self.context = context
        self.method = method
        self.code = "OK"

    async def __aenter__(self) -> Outcome:
        return self

    async def __aexit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is None:
            return False
        # The finished frames of a refused call hold its request body (up to
        # --max-message-bytes), and the error's traceback keeps them alive for as long as the
        # error lives, often in a reference cycle that only the garbage collector breaks.
        traceback.clear_frames(tb)
        if isinstance(err, ServiceError):
            await self._abort(err.code, err.message, err)
        elif isinstance(err, asyncio.CancelledError):
            self.code = ended_code(self.context)
        elif isinstance(err, Exception):
            log.error("unexpected error in %s", self.method, exc_info=err)
            await self._abort(grpc.StatusCode.INTERNAL, "internal server error")
        return False

    async def _abort(
        self, status: grpc.StatusCode, message: str, err: ServiceError | None = None
    ) -> None:
        self.code = status.name
        try:
            await self.context.abort(status, message)
        except grpc.aio.InternalError:
            # The status could not be sent: gRPC had already ended the call (the client went
            # away, or the C core refused the message, e.g. one larger than
            # --max-message-bytes, which the client sees as RESOURCE_EXHAUSTED).
            if isinstance(err, NoRequestMessage):
                self.code = grpc.StatusCode.RESOURCE_EXHAUSTED.name
            else:
                self.code = ended_code(self.context)
            raise asyncio.CancelledError from None


class UnaryMethod:
    """One unary RPC: admit, authenticate, read, charge, run ``impl``, answer, record."""

    def __init__(
        self,
        name: str,
        impl: UnaryImpl,
        calls: CallTracker,
        metrics: ServerMetrics,
        auth: Authenticator,
        server_timing: bool = True,
        tracing: Tracing | None = None,
        read_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.impl = impl
        self.calls = calls
        self.metrics = metrics
        self.auth = auth
        self.server_timing = server_timing
        self.tracing = tracing
        self.read_timeout = read_timeout  # seconds for the request message to arrive

    async def handle(self, requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        calls = self.calls
        outcome = Outcome(context, self.name)
        call: Call | None = None
        admitted = False
        size = 0
        raw = b""
        calls.arrive()
        try:
            async with outcome:
                calls.check_open()
                self.auth.check(context)
                raw = await self._read(context)
                calls.admit(self.name)  # only now: a call without a body holds no place
                admitted = True
                calls.charge(len(raw))
                size = len(raw)  # charged: given back in `finally`
                call = Call(context, calls)
                response = await self.impl(raw, call)
                answer = call.answer
                if answer is not None and self.tracing is not None:
                    self.tracing.record(answer)
                if answer is not None and self.server_timing:
                    timing = format_server_timing(
                        answer.queue_s, answer.compute_s, time.perf_counter() - started,
                        answer.batch_size, int(answer.versions[-1]) if len(answer.versions) else 0,
                    )  # fmt: skip
                    context.set_trailing_metadata(((TIMING_HEADER, timing),))
                return response
        finally:
            raw = b""  # this frame outlives the call in an error's traceback: not the body
            if call is not None:
                size += call.charged
            if size:
                calls.release(size)
            calls.finish(self.name, outcome.code, admitted)
            calls.leave()
            images = call.images if call is not None else 0
            self.metrics.observe_rpc(self.name, outcome.code, images, time.perf_counter() - started)
        raise AssertionError("unreachable: an error leaves through context.abort")

    async def _read(self, context: grpc.aio.ServicerContext) -> bytes:
        """The request message, or DEADLINE_EXCEEDED once ``read_timeout`` has passed."""
        calls = self.calls
        calls.begin_read()
        try:
            async with asyncio.timeout(self.read_timeout):
                raw = await context.read()
        except TimeoutError:
            raise DeadlineExceeded(
                f"no complete request message within {self.read_timeout:g} s "
                "(--read-timeout-seconds); the call is ended"
            ) from None
        finally:
            calls.end_read()
        if not isinstance(raw, bytes):  # the stream ended before one whole message
            raise NoRequestMessage("the call carried no complete request message")
        return raw

    def rpc_handler(self) -> grpc.RpcMethodHandler:
        """The handler to register (stream-unary: see the module docstring)."""
        return grpc.stream_unary_rpc_method_handler(self.handle)


class Method(Protocol):
    """Anything that serves one RPC (:class:`UnaryMethod`, ``server.streams.StreamMethod``)."""

    name: str  # its label in the metrics

    def rpc_handler(self) -> grpc.RpcMethodHandler: ...


def register(server: grpc.aio.Server, service: str, methods: dict[str, Method]) -> None:
    """Register ``methods`` of ``service`` with the C core (before the server starts)."""
    handlers = {name: method.rpc_handler() for name, method in methods.items()}
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]
