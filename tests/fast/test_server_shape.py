"""The server's shape: a server with nothing loaded answers every protocol UNAVAILABLE
saying why; a protocol is one list entry; server.app and server.workers import one way."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest

import server.app
from mnist_client import AsyncDigitClient
from server.protocols.base import ProtocolContext, Service
from server.protocols.pb import open_inference_grpc_pb2 as oip
from server.protocols.pb import tensorflow_core_pb2 as tfc
from server.protocols.pb import tensorflow_serving_pb2 as tfs
from server.rpc import Call

from .fakes import StartFake, fake_digit

pytestmark = pytest.mark.fast

SERVER = Path(server.app.__file__).parent


async def test_nothing_loaded_every_protocol_is_unavailable_saying_why(
    start_fake: StartFake,
) -> None:
    fake = await start_fake(versions=(), serving=False)
    why = "holds no version yet"
    async with AsyncDigitClient(fake.target) as client:
        assert await client.health(timeout=10) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.predict(fake_digit(1), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert why in (info.value.details() or "")
    kserve = oip.ModelInferRequest(model_name="mnist", raw_input_contents=[bytes(784)])
    kserve.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
    predict = tfs.PredictRequest()
    predict.model_spec.name = "mnist"
    tensor = predict.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = bytes(784)
    async with grpc.aio.insecure_channel(fake.target) as channel:
        for method, request in (
            ("/inference.GRPCInferenceService/ModelInfer", kserve),
            ("/tensorflow.serving.PredictionService/Predict", predict),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(method)(request.SerializeToString(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, method
            assert why in (info.value.details() or ""), method
        ready = await channel.unary_unary(
            "/inference.GRPCInferenceService/ModelReady",
            response_deserializer=oip.ModelReadyResponse.FromString,
        )(oip.ModelReadyRequest(name="mnist").SerializeToString(), timeout=10)
        assert ready.ready is False


class Echo:
    """A protocol of one method that answers the digits of the images it is sent."""

    label_prefix = "echo."

    def __init__(self, context: ProtocolContext) -> None:
        self._core = context.core

    def services(self) -> list[Service]:
        return [Service("test.Echo", {"Digits": self.digits})]

    async def digits(self, raw: bytes, call: Call) -> bytes:
        images = np.frombuffer(raw, np.uint8).reshape(-1, 28, 28)
        call.images = len(images)
        answer = call.answer = await self._core.infer(images, call.deadline)
        return bytes(answer.probabilities.argmax(axis=1).astype(np.uint8))


async def test_a_protocol_is_one_entry_in_the_list(
    start_fake: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server.app, "PROTOCOLS", (*server.app.PROTOCOLS, Echo))
    fake = await start_fake()
    images = np.stack([fake_digit(d) for d in (5, 2)])
    async with grpc.aio.insecure_channel(fake.target) as channel:
        answer = await channel.unary_unary("/test.Echo/Digits")(images.tobytes(), timeout=10)
    assert list(answer) == [5, 2]
    assert fake.count("mnist_requests_total", method="echo.Digits", code="OK") == 1
    async with AsyncDigitClient(fake.target) as client:  # health knows it too
        assert await client.health("test.Echo", timeout=10) == "SERVING"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (inside functions too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_app_and_workers_do_not_import_each_other() -> None:
    assert "server.app" in _imports(SERVER / "workers.py")  # the spawned worker's entry
    assert "server.workers" not in _imports(SERVER / "app.py")
