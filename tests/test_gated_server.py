"""The real server in the test's process (real gRPC on 127.0.0.1, the real SDK), with its model
behind a gate the test opens: batching, deadlines, cancellation and a failing batcher are
observed deterministically, not by timing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_client import AsyncDigitClient, DigitClient
from server.app import EXIT_BATCHER_FAILED, ModelServer
from server.ready_file import wait_for_ready_file
from tests.conftest import ROOT, GatedRuntime, StartGated, until


def _target(server: ModelServer) -> str:
    return f"127.0.0.1:{server.port}"


async def test_callers_that_arrive_while_the_model_is_busy_share_one_call(
    gated: tuple[ModelServer, GatedRuntime], mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = gated
    x, _ = mnist_test
    n = 50
    async with AsyncDigitClient(_target(server)) as client:
        expected = (await client.batch_predict(x[:n])).digits.tolist()
        gate.close()
        first = asyncio.ensure_future(client.predict(x[0]))
        await gate.wait_entered()  # the model is busy with the first caller
        rest = [asyncio.ensure_future(client.predict(x[i])) for i in range(1, n)]
        await until(lambda: server.batcher.queued_images == n - 1)
        gate.open.set()
        digits = [(await first).digit] + [(await r).digit for r in rest]
    assert gate.batch_sizes == [1, n - 1]  # everyone who queued meanwhile: one call
    assert digits == expected


async def test_a_request_whose_deadline_passes_while_queued_never_reaches_the_model(
    gated: tuple[ModelServer, GatedRuntime], mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = gated
    x, _ = mnist_test
    async with AsyncDigitClient(_target(server)) as client:
        gate.close()
        blocker = asyncio.ensure_future(client.predict(x[0]))
        await gate.wait_entered()
        doomed = asyncio.ensure_future(client.batch_predict(x[1:8], timeout=2.0))
        await until(lambda: server.batcher.queued_images == 7)  # queued before it expired
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await doomed
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: server.batcher.queued_images == 0)  # the server let it go
        gate.open.set()
        await blocker
        assert (await client.predict(x[9])).model_version == 1
    assert gate.batch_sizes == [1, 1]  # the 7 expired images were never computed
    assert server.calls.answered["DEADLINE_EXCEEDED"] == 1


async def test_cancelled_calls_never_reach_the_model_and_leave_nothing_behind(
    gated: tuple[ModelServer, GatedRuntime], mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = gated
    x, _ = mnist_test
    async with AsyncDigitClient(_target(server)) as client:
        gate.close()
        blocker = asyncio.ensure_future(client.predict(x[0]))
        await gate.wait_entered()
        doomed = [asyncio.ensure_future(client.batch_predict(x[:64])) for _ in range(8)]
        await until(lambda: server.batcher.queued_images == 8 * 64)
        for call in doomed:
            call.cancel()
        await asyncio.gather(*doomed, return_exceptions=True)
        await until(lambda: server.batcher.queued_images == 0 and server.calls.active == 1)
        gate.open.set()
        await blocker
        assert len(await client.batch_predict(x[:3])) == 3
    assert gate.batch_sizes == [1, 3]  # none of the 512 cancelled images was computed
    assert server.calls.answered["CANCELLED"] == 8


async def test_a_lone_request_never_waits_for_a_batch_to_fill(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = await start_gated("--batch-timeout-ms", "60000")
    async with AsyncDigitClient(_target(server), timeout=20) as client:
        for image in mnist_test[0][:5]:  # a minute's wait each would time out
            await client.predict(image)
    assert gate.batch_sizes == [1] * 5


async def test_a_failed_batcher_thread_turns_the_server_not_serving(
    gated: tuple[ModelServer, GatedRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = gated

    def broken(now: float) -> None:
        raise RuntimeError("a bug outside the model call")

    monkeypatch.setattr(server.batcher, "_take_batch", broken)
    async with AsyncDigitClient(_target(server)) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.predict(np.zeros((28, 28), np.uint8))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await until(lambda: server.fatal.is_set())
        assert await client.health() == "NOT_SERVING"
    assert server.exit_code == EXIT_BATCHER_FAILED


def test_a_process_whose_batcher_fails_exits_non_zero(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    # the real command line, with a bug planted in the batcher's thread
    code = (
        "import sys, server.batcher as b\n"
        "def broken(self, now): raise RuntimeError('planted bug')\n"
        "b.DynamicBatcher._take_batch = broken\n"
        "from server.__main__ import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    ready = tmp_path / "batcher-fails.ready.json"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "--model-dir", str(trained_model_dir), "--host",
             "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", str(ready)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        port = wait_for_ready_file(ready, proc, 60)["grpc_port"]
        with DigitClient(f"127.0.0.1:{port}", timeout=10) as client, pytest.raises(grpc.RpcError):
            client.predict(np.zeros((28, 28), np.uint8))
        assert proc.wait(60) == EXIT_BATCHER_FAILED
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_calls_beyond_the_admission_limit_are_refused_at_once(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = await start_gated("--max-concurrent-rpcs", "4")
    x, _ = mnist_test
    async with AsyncDigitClient(_target(server)) as client:
        gate.close()
        held = [asyncio.ensure_future(client.predict(x[0]))]
        await gate.wait_entered()
        held += [asyncio.ensure_future(client.predict(x[i])) for i in (1, 2, 3)]
        await until(lambda: server.calls.active == 4)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.predict(x[4])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4 calls in flight, limit 4" in (info.value.details() or "")
        gate.open.set()
        assert len(await asyncio.gather(*held)) == 4  # the admitted ones are all answered
    assert server.calls.answered["RESOURCE_EXHAUSTED"] == 1
    assert (
        server.metrics.registry.get_sample_value(
            "mnist_requests_total", {"method": "Predict", "code": "RESOURCE_EXHAUSTED"}
        )
        == 1
    )


async def test_request_bytes_beyond_the_budget_are_refused(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = await start_gated(
        "--max-images-per-request",
        "100",
        "--max-message-bytes",
        "100000",
        "--max-inflight-bytes",
        "100000",
    )
    x, _ = mnist_test
    async with AsyncDigitClient(_target(server)) as client:
        gate.close()
        held = asyncio.ensure_future(client.batch_predict(x[:100]))  # 78,700 bytes
        await gate.wait_entered()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.batch_predict(x[100:200])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "request bytes in flight, limit 100000" in (info.value.details() or "")
        gate.open.set()
        assert len(await held) == 100
        assert len(await client.batch_predict(x[100:200])) == 100  # budget given back
    assert server.calls.bytes == 0


# --- PredictStream


def _stream_message(request_id: int, image: bytes) -> bytes:
    from mnist_client.pb import digit_classifier_pb2 as pb

    return pb.PredictStreamRequest(id=request_id, image=image).SerializeToString()


def _stream_call(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    from mnist_client.pb import digit_classifier_pb2 as pb

    return channel.stream_stream(
        "/mnist.v1.DigitClassifier/PredictStream",
        response_deserializer=pb.PredictStreamResponse.FromString,
    )


async def test_a_stream_gives_unary_answers_and_a_bad_image_fails_alone(
    gated: tuple[ModelServer, GatedRuntime], mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, _ = gated
    x, _ = mnist_test
    async with AsyncDigitClient(_target(server)) as client:
        unary = (await client.batch_predict(x[:2000])).digits.tolist()
        results = [r async for r in client.predict_stream(x[:2000])]
    assert sorted(r.id for r in results) == list(range(2000))
    assert [r.prediction.digit for r in sorted(results, key=lambda r: r.id)] == unary  # type: ignore[union-attr]
    assert {r.prediction.model_version for r in results} == {1}  # type: ignore[union-attr]

    messages = [_stream_message(i, x[i].tobytes()) for i in range(10)]
    messages[4] = _stream_message(4, b"\x01" * 783)  # a wrong image in the middle
    async with grpc.aio.insecure_channel(_target(server)) as channel:
        answers = [a async for a in _stream_call(channel)(iter(messages))]
    by_id = {a.id: a for a in answers}
    assert sorted(by_id) == list(range(10))
    assert by_id[4].WhichOneof("result") == "error"
    assert by_id[4].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image has 783 bytes" in by_id[4].error.message
    assert [by_id[i].prediction.digit for i in (0, 9)] == [unary[0], unary[9]]
    reg = server.metrics.registry
    labels = {"method": "PredictStream"}
    assert reg.get_sample_value("mnist_requests_total", {**labels, "code": "OK"}) == 2
    assert reg.get_sample_value("mnist_images_total", {**labels, "code": "OK"}) == 2009
    assert reg.get_sample_value("mnist_images_total", {**labels, "code": "INVALID_ARGUMENT"}) == 1


async def test_a_stream_stops_reading_at_its_window_and_gives_back_everything_on_cancel(
    start_gated: StartGated, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = await start_gated("--max-stream-images", "8")
    x, _ = mnist_test
    async with grpc.aio.insecure_channel(_target(server)) as channel:
        gate.close()
        call = _stream_call(channel)(
            iter([_stream_message(i, x[i % 100].tobytes()) for i in range(500)])
        )  # a sender that never reads its answers
        await gate.wait_entered()
        computing = len(gate.calls[0])  # the first images read share the first call

        def in_flight() -> int:
            return computing + server.batcher.queued_images

        await until(lambda: in_flight() == 8)
        await asyncio.sleep(0.5)
        assert in_flight() == 8  # the window holds: nothing more was read
        assert server.calls.active == 1
        first_eight = sum(len(_stream_message(i, x[i].tobytes())) for i in range(8))
        assert server.calls.bytes == first_eight  # the bytes in flight are charged
        call.cancel()
        await until(lambda: server.calls.active == 0)
        assert server.batcher.queued_images == 0  # the cancelled stream let its places go
        assert server.calls.bytes == 0  # and its bytes
        gate.open.set()
    reg = server.metrics.registry
    assert reg.get_sample_value("mnist_queue_images") == 0
    assert reg.get_sample_value("mnist_inflight_requests", {"method": "PredictStream"}) == 0
    assert server.calls.answered["CANCELLED"] == 1


async def test_a_drain_answers_every_image_read_then_ends_the_stream_unavailable(
    gated: tuple[ModelServer, GatedRuntime], mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    server, gate = gated
    x, _ = mnist_test
    sent = asyncio.Event()

    async def messages():  # type: ignore[no-untyped-def]
        for i in range(20):
            yield _stream_message(i, x[i].tobytes())
        sent.set()
        await asyncio.sleep(3600)  # keeps the stream open: the server ends it

    async with grpc.aio.insecure_channel(_target(server)) as channel:
        gate.close()
        call = _stream_call(channel)(messages())
        await sent.wait()
        await gate.wait_entered()
        await until(lambda: len(gate.calls[0]) + server.batcher.queued_images == 20)
        stopping = asyncio.ensure_future(server.stop())
        await until(lambda: server.draining)
        gate.open.set()
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for answer in call:
                answers.append(answer)
        await stopping
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sorted(a.id for a in answers) == list(range(20))  # every image read was answered


async def test_a_stream_goes_on_across_a_hot_swap(
    trained_model_dir: Path,
    start_gated: StartGated,
    tmp_path: Path,
    mnist_test: tuple[np.ndarray, np.ndarray],
) -> None:
    import shutil

    models = tmp_path / "models"
    shutil.copytree(trained_model_dir / "1", models / "1")
    server, gate = await start_gated("--poll-seconds", "3600", model_dir=models)
    x, _ = mnist_test
    async with AsyncDigitClient(_target(server)) as client:
        gate.close()
        more = asyncio.Event()

        async def feed():  # type: ignore[no-untyped-def]
            yield x[0]  # alone in the first model call, which the gate holds
            await more.wait()
            for image in x[1:30]:
                yield image

        async def collect() -> list:  # type: ignore[type-arg]
            return [r async for r in client.predict_stream(feed())]

        stream = asyncio.ensure_future(collect())
        await gate.wait_entered()
        more.set()
        await until(lambda: len(gate.calls[0]) + server.batcher.queued_images == 30)
        shutil.copytree(trained_model_dir / "1", models / "2")
        assert await asyncio.to_thread(server.manager.refresh)  # version 2 now serves
        gate.open.set()
        # every image was admitted (resolved) while version 1 was the default: version 1
        # answers all of them, those queued behind the swap too (its batcher drains before
        # it is unloaded); the next call goes to version 2
        answers = await stream
        after = await client.predict(x[0])
    versions = {r.id: r.prediction.model_version for r in answers}
    assert sorted(versions) == list(range(30))
    assert set(versions.values()) == {1}
    assert after.model_version == 2


async def test_calls_of_every_protocol_share_one_model_call(
    gated: tuple[ModelServer, GatedRuntime], mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    from server.protocols.pb import open_inference_grpc_pb2 as oip
    from server.protocols.pb import tensorflow_core_pb2 as tfc
    from server.protocols.pb import tensorflow_serving_pb2 as tfs

    server, gate = gated
    x, _ = mnist_test
    kserve = oip.ModelInferRequest(model_name="mnist", raw_input_contents=[x[1:4].tobytes()])
    kserve.inputs.add(name="images", datatype="UINT8", shape=[3, 28, 28])
    tf_serving = tfs.PredictRequest(model_spec=tfs.ModelSpec(name="mnist"))
    tensor = tf_serving.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    tensor.tensor_content = x[4:6].tobytes()
    for size in (2, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    async with (
        AsyncDigitClient(_target(server)) as client,
        grpc.aio.insecure_channel(_target(server)) as channel,
    ):
        gate.close()
        blocker = asyncio.ensure_future(client.predict(x[0]))
        await gate.wait_entered()
        calls = [
            client.predict(x[0]),
            channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(
                kserve.SerializeToString()
            ),
            channel.unary_unary("/tensorflow.serving.PredictionService/Predict")(
                tf_serving.SerializeToString()
            ),
        ]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await until(lambda: server.batcher.queued_images == 6)
        gate.open.set()
        await blocker
        results = await asyncio.gather(*tasks)
    assert gate.batch_sizes == [1, 6]  # three protocols, one model call
    answer = oip.ModelInferResponse.FromString(results[1])
    probs = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(3, 10)
    assert probs.argmax(axis=1).tolist() == [int(d) for d in (await _digits(server, x[1:4]))]


async def _digits(server: ModelServer, images: np.ndarray) -> list[int]:
    async with AsyncDigitClient(_target(server)) as client:
        return (await client.batch_predict(images)).digits.tolist()  # type: ignore[no-any-return]


def _server_frames_holding(size: int) -> list[str]:
    """Frames of server code (live or kept by a traceback) with a bytes local of ``size``+."""
    import gc
    import types

    found = []
    for obj in gc.get_objects():
        if isinstance(obj, types.FrameType) and "/server/" in obj.f_code.co_filename:
            for name, value in obj.f_locals.items():
                if isinstance(value, bytes) and len(value) >= size:
                    found.append(f"{obj.f_code.co_name}: {name}")
    return found


@pytest.mark.parametrize(
    ("method", "body"),
    [("Predict", b"\x10\x01" * (1 << 20)), ("BatchPredict", b"\x0a\x00" * (1 << 20))],
    ids=["unknown-field", "empty-images"],
)
async def test_a_refused_body_is_not_kept_by_the_calls_frames(
    gated: tuple[ModelServer, GatedRuntime], method: str, body: bytes
) -> None:
    """A refused call's traceback (often in a reference cycle, freed only by a garbage
    collection that an idle server may not run for a long time) must not keep its body."""
    import gc

    server, _ = gated
    gc.collect()
    gc.disable()  # what the cycles keep stays visible
    try:
        async with grpc.aio.insecure_channel(_target(server)) as channel:
            call = channel.unary_unary(f"/mnist.v1.DigitClassifier/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(body)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _server_frames_holding(len(body) // 2) == []
    finally:
        gc.enable()
