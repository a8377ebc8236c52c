"""Optional OpenTelemetry tracing (``--tracing otlp``; ``pip install 'mnist-serving[tracing]'``).

Each RPC gets a server span that continues the caller's W3C ``traceparent`` (so a calling
service sees this server inside its own trace), with two child spans per answer: ``queue``
(waiting for a model call) and ``compute`` (that model call), the batch size an attribute.

Unary RPCs are traced by opentelemetry-instrumentation-grpc's aio server interceptor (it
reads the caller's context, names and closes the span, records the status). Its interceptor
iterates streaming handlers as async generators, which reader/writer stream handlers are not,
so the streams are left out of it and open their server span here, the same way.
Spans go to an OTLP exporter (``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other standard
variables configure it). Off (the default), nothing here runs: no interceptor, no spans.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from server.batcher import Answer

TRACER_NAME = "mnist-serving"


def otlp_provider() -> Any:
    """A tracer provider exporting over OTLP/gRPC in batches (needs the tracing extra)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": TRACER_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    """Server spans and their queue/compute children, for one tracer provider."""

    def __init__(self, provider: Any, stream_methods: Sequence[str]) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)
        self._streams = {f"/{m}" for m in stream_methods}  # full method paths

    def interceptors(self) -> list[Any]:
        """The gRPC server interceptor for the unary RPCs."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        streams = self._streams

        def unary_only(details: Any) -> bool:
            return getattr(details, "method", "") not in streams

        return [aio_server_interceptor(tracer_provider=self.provider, filter_=unary_only)]

    @contextlib.contextmanager
    def stream_span(self, method: str, metadata: Any) -> Iterator[Any]:
        """A server span for a streaming RPC, child of the caller's ``traceparent``."""
        from opentelemetry import propagate

        parent = propagate.extract({k: v for k, v in metadata or () if isinstance(v, str)})
        service, _, name = method.strip("/").rpartition("/")
        with self.tracer.start_as_current_span(
            method.strip("/"), context=parent, kind=self._trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        ) as span:  # fmt: skip
            yield span

    def record(self, answer: Answer) -> None:
        """Child spans of the current span: this answer's queue wait and model call."""
        # time.monotonic() seconds (the batcher's clock) to epoch nanoseconds (spans'), taken
        # now: the wall clock may have been stepped since the process started
        epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        start_ns = int(answer.dispatched_at * 1e9) + epoch_offset_ns
        queued_ns = start_ns - int(answer.queue_s * 1e9)
        computed_ns = start_ns + int(answer.compute_s * 1e9)
        attributes = {"mnist.batch_size": answer.batch_size}
        for name, begin, end in (("queue", queued_ns, start_ns),
                                 ("compute", start_ns, computed_ns)):  # fmt: skip
            span = self.tracer.start_span(name, start_time=begin, attributes=attributes)
            span.end(end_time=end)
