"""Where a caller's time went: server-timing on every answer, OpenTelemetry spans that continue
the caller's trace, and the SDK's own load tester."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_client import AsyncDigitClient, DigitClient
from mnist_client.timing import format_server_timing, parse_server_timing
from server.app import ModelServer
from server.settings import parse_settings
from tests.conftest import ROOT, ServerProcess, start_server, until


def test_the_server_timing_syntax_round_trips() -> None:
    value = format_server_timing(0.0005, 0.00125, 0.004, 17, 3)
    assert value == (
        'queue;dur=0.500, compute;dur=1.250, total;dur=4.000, batch;desc="17", version;desc="3"'
    )
    timing = parse_server_timing(value)
    assert timing is not None and (timing.batch_size, timing.model_version) == (17, 3)
    assert (timing.queue_ms, timing.compute_ms, timing.total_ms) == (0.5, 1.25, 4.0)
    assert parse_server_timing("cache;dur=1") is None


def test_every_answer_says_where_its_time_went(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test
    with DigitClient(server.target) as client:
        single = client.predict(x[0])
        batch = client.batch_predict(x[:300])  # > max batch size 256: two model calls
        streamed = list(client.predict_stream(x[:20]))

    async def aio() -> tuple[object, object]:
        async with AsyncDigitClient(server.target) as client:
            return (await client.predict(x[1])).timing, (await client.batch_predict(x[:5])).timing

    for timing in (single.timing, batch.timing, *asyncio.run(aio())):
        assert timing is not None, "no server-timing trailer"
        assert timing.batch_size >= 1 and timing.model_version == 1  # type: ignore[attr-defined]
        assert timing.queue_ms >= 0 and 0 < timing.compute_ms <= timing.total_ms  # type: ignore[attr-defined]
    assert batch[0].timing == batch.timing
    assert batch.timing is not None and batch.timing.batch_size == 256
    for result in streamed:
        t = result.prediction.timing  # type: ignore[union-attr]
        assert t is not None and t.batch_size >= 1 and 0 < t.compute_ms <= t.total_ms


def test_server_timing_can_be_turned_off(trained_model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(trained_model_dir, tmp_path / "server.log", "--server-timing", "off")
    try:
        with DigitClient(srv.target) as client:
            assert client.predict(np.zeros((28, 28), np.uint8)).timing is None
            assert client.batch_predict(np.zeros((3, 28, 28), np.uint8)).timing is None
            streamed = list(client.predict_stream(np.zeros((3, 28, 28), np.uint8)))
            assert [r.prediction.timing for r in streamed] == [None] * 3  # type: ignore[union-attr]
    finally:
        assert srv.stop() == 0


async def test_spans_continue_the_callers_trace(
    trained_model_dir: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    server_provider = sdk_trace.TracerProvider()
    server_provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = parse_settings(
        ["--model-dir", str(trained_model_dir), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0"], environ={},
    )  # fmt: skip
    server = ModelServer(settings, tracer_provider=server_provider)
    await server.start()
    try:
        await until(lambda: server.health.serving)
        caller = sdk_trace.TracerProvider().get_tracer("caller")
        async with AsyncDigitClient(f"127.0.0.1:{server.port}") as client:
            with caller.start_as_current_span("caller") as parent:
                await client.predict(mnist_test[0][0])
                results = [r async for r in client.predict_stream(mnist_test[0][:3])]
        assert len(results) == 3
    finally:
        await server.stop()
    spans = exporter.get_finished_spans()
    trace_id = parent.get_span_context().trace_id
    by_name: dict[str, list] = {}  # type: ignore[type-arg]
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    (unary,) = by_name["/mnist.v1.DigitClassifier/Predict"]
    (stream,) = by_name["mnist.v1.DigitClassifier/PredictStream"]
    for rpc_span in (unary, stream):
        assert rpc_span.context.trace_id == trace_id  # the caller's trace, continued
        assert rpc_span.parent.span_id == parent.get_span_context().span_id
    children = [s for s in spans if s.name in ("queue", "compute")]
    assert len(children) == 2 * (1 + 3)  # per answer: its queue wait and its model call
    assert {s.parent.span_id for s in children} == {
        unary.context.span_id, stream.context.span_id,
    }  # fmt: skip
    assert all(s.attributes["mnist.batch_size"] >= 1 for s in children)
    assert all(s.end_time >= s.start_time for s in children)


@pytest.mark.parametrize("method", ["predict", "batch", "stream"])
def test_the_sdk_load_tester_reports_figures(
    server: ServerProcess, mnist_dir: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "mnist_client", "bench", "--target", server.target,
         "--method", method, "--concurrency", "4", "--duration", "2", "--batch-size", "16",
         "--data", str(mnist_dir), "--json", str(out), "--fail-on-error", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["errors"] == {} and figures["answers"] > 0
    assert figures["images_per_s"] >= figures["requests_per_s"] > 0
    assert figures["accuracy"] > 0.8  # 2 epochs of the small model on 6,000 images
    for name in (
        "client_latency_ms",
        "server_total_ms",
        "server_queue_ms",
        "network_and_client_ms",
    ):
        assert set(figures[name]) == {"p50", "p90", "p99", "max"}, name
    assert figures["mean_batch_size"] >= 1
    assert "requests/s" in result.stdout and "server total" in result.stdout
