"""Misbehaving clients against the real server in the test's process (real gRPC on 127.0.0.1):
no client can lock the others out, expansions are charged, errors stay short, and calls gRPC
had received before SIGTERM are answered. Each is observed through state, not timing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest

from mnist_client import AsyncDigitClient
from mnist_client.pb import digit_classifier_pb2 as pb
from server.app import ModelServer, transport_calls
from server.errors import MAX_MESSAGE_CHARS
from tests.conftest import StartGated, until

PREDICT = "/mnist.v1.DigitClassifier/Predict"
STREAM = "/mnist.v1.DigitClassifier/PredictStream"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
TFS_PREDICT = "/tensorflow.serving.PredictionService/Predict"


def _target(server: ModelServer) -> str:
    return f"127.0.0.1:{server.port}"


async def _never(stop: asyncio.Event) -> AsyncIterator[bytes]:
    """A request stream that sends nothing until ``stop`` (headers only: no body, no message)."""
    await stop.wait()
    if False:  # an async generator that yields nothing
        yield b""


async def test_bodyless_calls_and_idle_streams_lock_nobody_out_and_are_ended(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, _ = await start_gated(
        "--read-timeout-seconds", "3", "--max-open-streams", "100", "--max-concurrent-rpcs", "256"
    )
    x, _ = mnist_test
    stop = asyncio.Event()
    # one hostile client, one connection: 300 Predicts that never send a body, 300 streams
    # that never send a message (100 fit the stream budget, the rest are refused)
    async with grpc.aio.insecure_channel(_target(server)) as hostile:
        bodyless = [
            asyncio.ensure_future(hostile.stream_unary(PREDICT)(_never(stop))) for _ in range(300)
        ]
        idle = [hostile.stream_stream(STREAM)(_never(stop)) for _ in range(300)]
        idle_ends = [asyncio.ensure_future(_codes_of(stream)) for stream in idle]
        await until(lambda: server.calls.reading == 300 and server.calls.streams == 100)
        assert server.calls.unary == 0  # waiting for a body holds no place in flight
        async with AsyncDigitClient(_target(server)) as other:
            digits = [(await other.predict(x[i])).digit for i in range(50)]
            batch = await other.batch_predict(x[:50])
            assert digits == batch.digits.tolist()
            assert await other.health() == "SERVING"
        # then each is ended by the server after its bounded wait, and gives back its place
        ended = await asyncio.gather(*bodyless, return_exceptions=True)
        codes = [e.code() for e in ended if isinstance(e, grpc.aio.AioRpcError)]
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 300
        assert "no complete request message within 3 s" in ended[0].details()  # type: ignore[union-attr]
        stream_codes = await asyncio.gather(*idle_ends)
        assert stream_codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 100
        assert stream_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 200
        stop.set()
    assert (server.calls.reading, server.calls.streams, server.calls.active) == (0, 0, 0)
    assert server.calls.answered["DEADLINE_EXCEEDED"] == 400


async def _codes_of(stream: Any) -> grpc.StatusCode:
    try:
        async for _ in stream:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_a_stream_idle_after_its_answers_is_ended(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, _ = await start_gated("--stream-idle-seconds", "1")
    x, _ = mnist_test
    stop = asyncio.Event()

    async def one_then_silence() -> AsyncIterator[bytes]:
        yield pb.PredictStreamRequest(id=5, image=x[0].tobytes()).SerializeToString()
        await stop.wait()

    async with grpc.aio.insecure_channel(_target(server)) as channel:
        stream = channel.stream_stream(
            STREAM, response_deserializer=pb.PredictStreamResponse.FromString
        )(one_then_silence())
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for answer in stream:
                answers.append(answer)
        stop.set()
    assert [a.id for a in answers] == [5] and answers[0].WhichOneof("result") == "prediction"
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "sent no message for 1 s" in (ended.value.details() or "")
    assert server.calls.streams == 0


def _tf_compact(n: int) -> bytes:
    from server.protocols.pb import tensorflow_core_pb2 as tfc
    from server.protocols.pb import tensorflow_serving_pb2 as tfs

    request = tfs.PredictRequest(model_spec=tfs.ModelSpec(name="mnist"))
    tensor = request.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    tensor.int_val.append(0)  # one value: TensorFlow's compact form repeats it
    for size in (n, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    return request.SerializeToString()


async def test_the_byte_budget_charges_what_a_compact_tf_request_expands_to(
    start_gated: StartGated,
) -> None:
    server, gate = await start_gated("--max-inflight-bytes", str(8 * 1024 * 1024))
    body = _tf_compact(4096)
    assert len(body) < 50  # 41 bytes asking for 4,096 images (3.2 MB)
    async with grpc.aio.insecure_channel(_target(server)) as channel:
        call = channel.unary_unary(TFS_PREDICT)
        gate.close()
        held = [asyncio.ensure_future(call(body))]
        await gate.wait_entered()
        held.append(asyncio.ensure_future(call(body)))
        await until(lambda: server.calls.bytes >= 2 * 4096 * 784)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call(body)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "request bytes in flight" in (refused.value.details() or "")
        gate.open.set()
        assert len(await asyncio.gather(*held)) == 2
    assert server.calls.bytes == 0


async def test_error_messages_are_short_and_name_the_first_problem(
    start_gated: StartGated,
) -> None:
    from server.protocols.pb import open_inference_grpc_pb2 as oip

    server, _ = await start_gated()
    many = oip.ModelInferRequest(model_name="mnist")
    for i in range(10_000):
        many.inputs.add(name=f"input-{i}", datatype="UINT8", shape=[1, 28, 28])
    any_n = oip.ModelInferRequest(model_name="mnist", raw_input_contents=[bytes(784)])
    any_n.inputs.add(name="images", datatype="UINT8", shape=[-1, 28, 28])
    long_name = oip.ModelInferRequest(model_name="m" * 100_000)
    async with grpc.aio.insecure_channel(_target(server)) as channel:  # default metadata limit
        infer = channel.unary_unary(KSERVE_INFER)
        details = {}
        for name, request in (("many", many), ("any_n", any_n), ("long_name", long_name)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await infer(request.SerializeToString())
            assert info.value.code() in (
                grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
            ), info.value.details()  # fmt: skip
            details[name] = info.value.details() or ""
    assert all(len(d) <= MAX_MESSAGE_CHARS for d in details.values()), details
    assert details["many"] == "input 'input-0' is not known; the model has one input 'images'"
    assert "has shape [-1, 28, 28]; a request's shape is [N, 28, 28]" in details["any_n"]
    assert "is not served here" in details["long_name"]


async def test_calls_received_before_sigterm_are_answered(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """50 Predicts reach gRPC's transport while the event loop is busy (as on a loaded
    machine: they wait in gRPC's queue); SIGTERM's drain starts before the loop takes any of
    them. Every one is answered, none refused as 'shutting down'."""
    server, _ = await start_gated()
    x, _ = mnist_test
    body = pb.PredictRequest(image=x[0].tobytes()).SerializeToString()
    counts = transport_calls(server.channelz_id)
    assert counts is not None
    before = counts[0]
    channel = grpc.insecure_channel(_target(server))  # a client of its own, on its own thread
    call = channel.unary_unary(PREDICT)
    results: list[Any] = []

    def send() -> None:
        futures = [call.future(body, timeout=30) for _ in range(50)]
        results.extend(f.exception() or f.result() for f in futures)

    sender = threading.Thread(target=send)
    # the loop is held (this coroutine does not yield) until gRPC has received all 50
    sender.start()
    deadline = time.monotonic() + 20
    while (transport_calls(server.channelz_id) or (0, 0))[0] < before + 50:
        assert time.monotonic() < deadline, "the calls never reached gRPC's transport"
        time.sleep(0.01)
    server.begin_drain()  # SIGTERM arrives now, with all 50 waiting in gRPC's queue
    await server.stop()
    await asyncio.to_thread(sender.join, 30)
    channel.close()
    errors = [r for r in results if isinstance(r, grpc.RpcError)]
    assert len(results) == 50 and errors == [], [e.details() for e in errors[:3]]  # type: ignore[attr-defined]
    assert {pb.PredictResponse.FromString(r).model_version for r in results} == {1}
    assert server.calls.answered == {"OK": 50}


async def test_a_call_still_sending_its_body_when_the_drain_begins_is_answered(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    """A call that arrived before SIGTERM, its request message still on the way, is admitted
    and answered once the message arrives; the drain waits for it (and new calls are refused)."""
    server, _ = await start_gated()
    x, _ = mnist_test
    body = pb.PredictRequest(image=x[0].tobytes()).SerializeToString()
    send = asyncio.Event()

    async def late_body() -> AsyncIterator[bytes]:
        await send.wait()
        yield body

    async with grpc.aio.insecure_channel(_target(server)) as channel:
        slow = asyncio.ensure_future(channel.stream_unary(PREDICT)(late_body()))
        await until(lambda: server.calls.reading == 1)
        stopping = asyncio.ensure_future(server.stop())
        await until(lambda: server.calls.draining)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(PREDICT)(body)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not stopping.done()  # the drain waits for the call that is still reading
        send.set()
        answer = pb.PredictResponse.FromString(await slow)
        await stopping
    assert answer.model_version == 1
    assert server.calls.answered == {"OK": 1, "UNAVAILABLE": 1}


async def test_a_hung_model_call_turns_health_not_serving_until_it_returns(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray], monkeypatch: Any
) -> None:
    """The one case where the server truly cannot serve: its model call hangs."""
    import server.app

    monkeypatch.setattr(server.app, "STUCK_MODEL_SECONDS", 0.5)
    srv, gate = await start_gated()
    x, _ = mnist_test
    async with AsyncDigitClient(_target(srv)) as client:
        assert await client.health() == "SERVING"
        gate.close()
        held = asyncio.ensure_future(client.predict(x[0]))
        await gate.wait_entered()
        await until(lambda: not srv.health.serving, timeout=10)
        assert await client.health() == "NOT_SERVING"
        gate.open.set()
        assert (await held).model_version == 1
        await until(lambda: srv.health.serving, timeout=10)
        assert await client.health() == "SERVING"


async def test_a_message_over_the_size_limit_is_counted_as_the_caller_saw_it(
    start_gated: StartGated,
) -> None:
    server, _ = await start_gated(
        "--max-message-bytes", "100000", "--max-images-per-request", "100"
    )
    async with grpc.aio.insecure_channel(_target(server)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary("/mnist.v1.DigitClassifier/BatchPredict")(bytes(200_000))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await until(lambda: sum(server.calls.answered.values()) == 1)
    assert server.calls.answered == {"RESOURCE_EXHAUSTED": 1}  # not CANCELLED: alerts see it
    sample = server.metrics.registry.get_sample_value(
        "mnist_requests_total", {"method": "BatchPredict", "code": "RESOURCE_EXHAUSTED"}
    )
    assert sample == 1
