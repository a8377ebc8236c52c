"""The RPC lifecycle's own counts: admission, calls in flight, answers given, and the drain.

A unary prediction call is admitted (:meth:`CallTracker.admit`) once its request message has
arrived, never before: a call that sends headers and no body holds no place that another
caller needs, and it is ended after ``--read-timeout-seconds`` (``server.rpc``). Past
``max_calls`` unary calls in flight, or once the server is draining, a call is refused at
once (RESOURCE_EXHAUSTED, UNAVAILABLE). Streams have a budget of their own (``max_streams``
open at once) and are admitted when they open; an idle one is ended (``server.streams``).

Request bytes are charged against ``max_bytes`` (what a request expands to, where that is
more than its wire bytes); a call that would exceed the budget is refused and its bytes
freed. So the memory and work held by accepted calls is bounded however many clients
connect, and overload turns into fast refusals, not latency.

The drain reads these counts, never the metrics: metrics observe the server, this steers it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from server.errors import ResourceExhausted, Unavailable


class CallTracker:
    """Counts of calls by method: in flight now, answered so far by status code."""

    def __init__(self, max_calls: int, max_bytes: int, max_streams: int = 128) -> None:
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.max_streams = max_streams
        self.active = 0  # unary calls and streams admitted and not finished
        self.streams = 0  # of those, streams
        self.reading = 0  # unary calls waiting for their request message (not admitted yet)
        self.arrived = 0  # calls taken off gRPC's queue so far, any method (see ``arrive``)
        self.live = 0  # of those, the ones whose handler has not returned yet
        self.active_by_method: collections.Counter[str] = collections.Counter()
        self.bytes = 0
        self.answered: collections.Counter[str] = collections.Counter()  # by status code name
        self.draining = False
        self._idle: asyncio.Event | None = None  # set when active drops to 0 while draining
        self._drain_listeners: set[Callable[[], None]] = set()  # streams that must stop reading
        self.on_finish: Callable[[], None] | None = None  # called after every admitted call

    @property
    def unary(self) -> int:
        """Unary calls admitted and not finished."""
        return self.active - self.streams

    def arrive(self) -> None:
        """Count a call the server has just taken off gRPC's queue (any method, admitted or
        not); its handler calls :meth:`leave` when it returns. The drain compares these with
        what gRPC's transport has received."""
        self.arrived += 1
        self.live += 1

    def leave(self) -> None:
        """A handler counted by :meth:`arrive` has returned."""
        self.live -= 1

    def check_open(self) -> None:
        """UNAVAILABLE while draining: a new call is refused before anything is read."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")

    def begin_read(self) -> None:
        """A unary call that passed :meth:`check_open` waits for its request message: the
        drain waits for it too (it arrived before the drain began)."""
        self.reading += 1

    def end_read(self) -> None:
        """Its message arrived (the call is admitted next, with no await between) or never
        will."""
        self.reading -= 1
        self._check_idle()

    def admit(self, method: str, stream: bool = False) -> None:
        """Take a call in (a unary call with its request read, or a stream as it opens), or
        refuse it at once when over a limit. The caller has passed :meth:`check_open` (a
        unary call as it arrived: the drain waits for its message). Every admitted call must
        :meth:`finish`."""
        if stream:
            if self.streams >= self.max_streams:
                raise ResourceExhausted(
                    f"server busy: {self.streams} streams open, limit {self.max_streams}; "
                    "retry later, or send unary calls"
                )
            self.streams += 1
        elif self.active - self.streams >= self.max_calls:
            raise ResourceExhausted(
                f"server overloaded: {self.active - self.streams} calls in flight, limit "
                f"{self.max_calls}; retry later"
            )
        self.active += 1
        self.active_by_method[method] += 1

    def charge(self, size: int) -> None:
        """Count ``size`` request bytes against the budget, or refuse them."""
        if self.bytes + size > self.max_bytes:
            raise ResourceExhausted(
                f"server overloaded: {self.bytes} request bytes in flight, limit "
                f"{self.max_bytes}; retry later"
            )
        self.bytes += size

    def release(self, size: int) -> None:
        """Give back what :meth:`charge` took."""
        self.bytes -= size

    def finish(self, method: str, code: str, admitted: bool, stream: bool = False) -> None:
        """Record one answered call (admitted or refused at the door)."""
        self.answered[code] += 1
        if admitted:
            self.active -= 1
            if stream:
                self.streams -= 1
            self.active_by_method[method] -= 1
            self._check_idle()
            if self.on_finish is not None:
                self.on_finish()

    def _check_idle(self) -> None:
        if self.active == 0 and self.reading == 0 and self._idle is not None:
            self._idle.set()

    def on_drain(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the drain begins (a stream stops reading then)."""
        if self.draining:
            listener()
        self._drain_listeners.add(listener)

    def off_drain(self, listener: Callable[[], None]) -> None:
        self._drain_listeners.discard(listener)

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls from now on, tell streams to stop reading, and wait up to
        ``timeout`` s for the calls in flight (and for the unary calls that arrived before
        and are still reading their request: ``--read-timeout-seconds`` bounds those).

        Returns True when every call in flight finished in time.
        """
        self.draining = True
        for listener in list(self._drain_listeners):
            listener()
        if self.active == 0 and self.reading == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
