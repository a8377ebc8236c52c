"""Pinning a version in every protocol: mnist.v1's optional ModelSpec (read off the wire
exactly as protobuf reads it; callers that never set it unchanged), the SDK's ``version=``,
KServe's ``model_version`` and TF Serving's ``model_spec.version``, each reaching that
version's own batcher; what is not loaded is NOT_FOUND naming what is."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from mnist_client import AsyncDigitClient
from mnist_client.pb import digit_classifier_pb2 as pb
from server import wire
from server.errors import InvalidArgument
from server.protocols.pb import tensorflow_core_pb2 as tfc
from server.protocols.pb import tensorflow_serving_pb2 as tfs

from .fakes import FakeServer, StartFake, fake_digit, write_fake_version

pytestmark = pytest.mark.fast

IMAGE = fake_digit(4)
IMAGE_BYTES = IMAGE.tobytes()
TFS = "/tensorflow.serving.PredictionService/"

SPECS: list[dict[str, Any]] = [
    {},
    {"version": 3},
    {"version": 0},
    {"version": -2},
    {"label": "canary"},
    {"name": "mnist", "version": 2},
    {"name": "mnist", "label": "stable"},
    {"name": "mnist"},
]


def _pin(spec: dict[str, Any]) -> wire.Pin | None:
    if not spec:
        return None
    return wire.Pin(spec.get("name"), spec.get("version"), spec.get("label"))


@pytest.mark.parametrize("spec", SPECS)
def test_the_model_spec_reads_as_protobuf_writes_it(spec: dict[str, Any]) -> None:
    model_spec = pb.ModelSpec(**spec) if spec else None
    one = pb.PredictRequest(image=IMAGE_BYTES, model_spec=model_spec).SerializeToString()
    image, pin = wire.parse_predict_pinned(one)
    assert image.tobytes() == IMAGE_BYTES and pin == _pin(spec)
    batch = pb.BatchPredictRequest(images=[IMAGE_BYTES] * 3, model_spec=model_spec)
    images, pin = wire.parse_batch_predict_pinned(batch.SerializeToString(), 10)
    assert images.tobytes() == IMAGE_BYTES * 3 and pin == _pin(spec)
    stream = pb.PredictStreamRequest(id=9, image=IMAGE_BYTES, model_spec=model_spec)
    request_id, image, pin = wire.parse_stream_pinned(stream.SerializeToString())
    assert (request_id, image.tobytes(), pin) == (9, IMAGE_BYTES, _pin(spec))
    info = pb.GetModelInfoRequest(model_spec=model_spec).SerializeToString()
    assert wire.parse_model_info(info) == _pin(spec)


def test_a_pin_before_the_images_and_a_second_pin() -> None:
    spec = pb.ModelSpec(version=2).SerializeToString()
    body = b"\x12" + bytes([len(spec)]) + spec  # field 2, as a hand-written client may put it
    images = pb.BatchPredictRequest(images=[IMAGE_BYTES] * 2).SerializeToString()
    got, pin = wire.parse_batch_predict_pinned(body + images, 10)
    assert got.tobytes() == IMAGE_BYTES * 2 and pin == wire.Pin(None, 2, None)
    with pytest.raises(InvalidArgument, match=r"model_spec \(field 2\) appears more than once"):
        wire.parse_batch_predict_pinned(images + body + body, 10)
    with pytest.raises(InvalidArgument, match=r"ModelSpec\.label is not UTF-8"):
        wire.parse_model_info(b"\x0a\x03\x1a\x01\xff")


async def _tfs_predict(target: str, version: int) -> tfs.PredictResponse:
    request = tfs.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.version.value = version
    tensor = request.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = IMAGE_BYTES
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            TFS + "Predict",
            request_serializer=tfs.PredictRequest.SerializeToString,
            response_deserializer=tfs.PredictResponse.FromString,
        )
        return await call(request, timeout=10)


async def _kserve_version(client: triton.InferenceServerClient, version: str) -> int:
    image = InferInput("images", [1, 28, 28], "UINT8")
    image.set_data_from_numpy(IMAGE[None])
    result = await client.infer("mnist", [image], model_version=version)
    return int(result.get_response().model_version)


def _model_calls(fake: FakeServer) -> dict[int, int]:
    """Model calls so far, by the version whose runtime ran them."""
    return {v: len(r.batch_sizes) for v, r in fake.loader.runtimes.items()}


async def test_every_protocol_pins_a_version_and_reaches_its_batcher(
    start_fake: StartFake,
) -> None:
    fake = await start_fake("--version-policy", "all", versions=(1, 2, 3))
    await asyncio.to_thread(fake.server.manager.refresh)  # all three loaded
    assert sorted(fake.server.manager.routes.versions) == [1, 2, 3]
    async with (
        AsyncDigitClient(fake.target) as client,
        triton.InferenceServerClient(fake.target) as kserve,
    ):
        for version in (1, 2, 3):
            before = _model_calls(fake)
            one = await client.predict(IMAGE, timeout=10, version=version)
            many = await client.batch_predict(np.stack([IMAGE] * 3), timeout=10, version=version)
            streamed = [
                r.prediction.model_version
                async for r in client.predict_stream([IMAGE] * 2, timeout=10, version=version)
                if r.prediction is not None
            ]
            info = await client.model_info(timeout=10, version=version)
            by_kserve = await _kserve_version(kserve, str(version))
            by_tfs = (await _tfs_predict(fake.target, version)).model_spec.version.value
            assert (one.digit, one.model_version) == (4, version)
            assert set(many.model_versions) == {version}
            assert streamed == [version, version]
            assert (info.model_version, by_kserve, by_tfs) == (version, version, version)
            # every one of those calls ran on that version's runtime, none on another's
            after = _model_calls(fake)
            assert {v for v in after if after[v] != before.get(v, 0)} == {version}
        # the per-version request counter: Predict, BatchPredict, 2 streamed images, KServe
        # and TF Serving each
        for version in (1, 2, 3):
            assert (
                fake.count("mnist_version_requests_total", model="mnist", version=str(version)) == 6
            )
        unpinned = await client.predict(IMAGE, timeout=10)
        info = await client.model_info(timeout=10)
    assert unpinned.model_version == 3  # the default: the newest loaded
    assert (info.model_version, info.loaded_versions, info.labels) == (3, (1, 2, 3), {})
    assert [(v.version, v.state) for v in info.versions] == [(v, "READY") for v in (1, 2, 3)]
    assert info.model_name == "mnist"
    assert info.memory_bytes == len(b"fake weights of version 3")


async def test_a_version_that_is_not_loaded_is_not_found_naming_what_is(
    start_fake: StartFake,
) -> None:
    fake = await start_fake("--version-policy", "latest:2", versions=(1, 2, 3))
    loaded = "loaded: versions 2, 3"
    async with AsyncDigitClient(fake.target) as client:
        for call in (
            lambda: client.predict(IMAGE, timeout=10, version=1),
            lambda: client.batch_predict(np.stack([IMAGE]), timeout=10, version=1),
            lambda: client.model_info(timeout=10, version=1),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.value.details() == f"version '1' of model 'mnist' is not loaded; {loaded}"
        results = [r async for r in client.predict_stream([IMAGE], timeout=10, version=1)]
    assert results[0].error is not None and results[0].error.code == grpc.StatusCode.NOT_FOUND
    assert results[0].error.message.endswith(loaded)
    async with triton.InferenceServerClient(fake.target) as kserve:
        with pytest.raises(InferenceServerException) as refused:
            await _kserve_version(kserve, "1")
    assert refused.value.status() == str(grpc.StatusCode.NOT_FOUND)
    assert refused.value.message() == f"version '1' of model 'mnist' is not loaded; {loaded}"
    with pytest.raises(grpc.aio.AioRpcError) as tf_refused:
        await _tfs_predict(fake.target, 1)
    assert tf_refused.value.details() == (
        f"Servable not found for request: Specific(mnist, 1); {loaded}"
    )


async def test_a_pinned_caller_keeps_its_version_while_the_default_moves(
    start_fake: StartFake, tmp_path: Path
) -> None:
    fake = await start_fake("--version-policy", "all", versions=(1, 2))
    folder = fake.server.settings.model_dir
    async with AsyncDigitClient(fake.target) as client:
        assert (await client.predict(IMAGE, timeout=10)).model_version == 2
        write_fake_version(folder, 3)
        assert await asyncio.to_thread(fake.server.manager.refresh)
        assert (await client.predict(IMAGE, timeout=10)).model_version == 3  # the default moved
        pinned = await asyncio.gather(
            *(client.predict(IMAGE, timeout=10, version=1) for _ in range(8))
        )
    assert {p.model_version for p in pinned} == {1}
