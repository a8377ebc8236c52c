"""Every protocol over real gRPC to an in-process server on the fake runtime, each with a
real client: the SDK for mnist.v1, tritonclient for KServe v2, and TensorFlow Serving's
messages (the server's own copy of its protos: TensorFlow Serving's Python package imports
TensorFlow)."""

from __future__ import annotations

from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from mnist_client import AsyncDigitClient
from server.protocols.pb import open_inference_grpc_pb2 as oip
from server.protocols.pb import tensorflow_core_pb2 as tfc
from server.protocols.pb import tensorflow_serving_pb2 as tfs
from server.protocols.pb import triton_extensions_pb2 as tx

from .fakes import SURE, FakeServer, fake_digit

pytestmark = [pytest.mark.fast, pytest.mark.asyncio(loop_scope="module")]

DIGITS = [7, 0, 3, 9, 2]
IMAGES = np.stack([fake_digit(d) for d in DIGITS])
TFS = "/tensorflow.serving.PredictionService/"
KSERVE = "/inference.GRPCInferenceService/"
NOT_SERVED = "model 'other' is not served here; this server serves 'mnist'"


def calls(fake: FakeServer, method: str) -> float:
    """OK answers of ``method`` (its metrics label) so far."""
    return fake.count("mnist_requests_total", method=method, code="OK")


# --- mnist.v1 with the SDK


async def test_mnist_v1_predict_batch_predict_and_model_info(fake_server: FakeServer) -> None:
    before = calls(fake_server, "Predict")
    async with AsyncDigitClient(fake_server.target) as client:
        one = await client.predict(fake_digit(7), timeout=10)
        many = await client.batch_predict(IMAGES, timeout=10)
        info = await client.model_info(timeout=10)
    assert (one.digit, one.model_version) == (7, 1)
    assert one.confidence == pytest.approx(SURE)
    assert one.timing is not None and one.timing.batch_size >= 1
    assert list(many.digits) == DIGITS
    assert list(many.model_versions) == [1] * len(DIGITS)
    assert (info.model_version, info.runtime, info.architecture) == (1, "fake", "fake")
    assert calls(fake_server, "Predict") == before + 1  # the metrics label of mnist.v1


async def test_mnist_v1_stream_answers_each_image_and_a_wrong_one_alone(
    fake_server: FakeServer,
) -> None:
    images: list[Any] = [fake_digit(d) for d in DIGITS]
    images.insert(2, np.zeros((3, 3), np.uint8))  # not 28x28: its own error, the stream goes on
    async with AsyncDigitClient(fake_server.target) as client:
        results = {r.id: r async for r in client.predict_stream(images, timeout=10)}
    assert sorted(results) == list(range(len(images)))
    bad = results.pop(2)
    assert bad.error is not None and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT
    got = [results[i].prediction for i in sorted(results)]
    assert [p.digit for p in got if p is not None] == DIGITS
    assert {p.model_version for p in got if p is not None} == {1}


async def test_health_answers_for_every_service_the_protocols_declare(
    fake_server: FakeServer,
) -> None:
    services = fake_server.server.service_names()
    assert services == [
        "mnist.v1.DigitClassifier",
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
    ]
    async with AsyncDigitClient(fake_server.target) as client:
        assert [await client.health(s, timeout=10) for s in ["", *services]] == ["SERVING"] * 5
        assert await client.health("no.such.Service", timeout=10) == "SERVICE_UNKNOWN"


# --- KServe v2 with tritonclient


def _triton_input(images: np.ndarray) -> InferInput:
    tensor = InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


async def test_kserve_model_infer_metadata_and_ready(fake_server: FakeServer) -> None:
    before = calls(fake_server, "kserve.ModelInfer")
    async with triton.InferenceServerClient(fake_server.target) as client:
        result = await client.infer("mnist", [_triton_input(IMAGES)], request_id="r1")
        pinned = await client.infer("mnist", [_triton_input(IMAGES[:1])], model_version="1")
        metadata = await client.get_model_metadata("mnist", as_json=True)
        ready = [
            await client.is_model_ready("mnist"),
            await client.is_model_ready("mnist", "1"),
            await client.is_model_ready("mnist", "2"),
            await client.is_model_ready("other"),
        ]
        assert await client.is_server_ready()
    probs = result.as_numpy("probabilities")
    assert probs is not None and list(probs.argmax(axis=1)) == DIGITS
    response = result.get_response(as_json=True)
    assert (response["id"], response["model_version"]) == ("r1", "1")
    assert pinned.get_response(as_json=True)["model_version"] == "1"
    assert metadata["name"] == "mnist"
    assert (metadata["versions"], metadata["platform"]) == (["1"], "fake")
    assert ready == [True, True, False, False]
    assert calls(fake_server, "kserve.ModelInfer") == before + 2  # the protocol's label prefix


async def test_kserve_classification_extension(fake_server: FakeServer) -> None:
    async with triton.InferenceServerClient(fake_server.target) as client:
        output = InferRequestedOutput("probabilities", class_count=2)
        result = await client.infer("mnist", [_triton_input(IMAGES[:2])], outputs=[output])
    top = result.as_numpy("probabilities")
    assert top is not None and top.shape == (2, 2)
    assert [row[0].decode().split(":")[1] for row in top] == ["7", "0"]


@pytest.mark.parametrize(
    ("model", "version", "message"),
    [
        ("other", "", NOT_SERVED),
        ("mnist", "2", "version '2' of model 'mnist' is not loaded; loaded: version 1"),
    ],
)
async def test_kserve_pinning_what_is_not_served_is_not_found(
    fake_server: FakeServer, model: str, version: str, message: str
) -> None:
    async with triton.InferenceServerClient(fake_server.target) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer(model, [_triton_input(IMAGES[:1])], model_version=version)
        assert info.value.status() == str(grpc.StatusCode.NOT_FOUND)
        assert info.value.message() == message
        with pytest.raises(InferenceServerException) as meta:
            await client.get_model_metadata(model, version)
        assert meta.value.status() == str(grpc.StatusCode.NOT_FOUND)


async def test_kserve_stream_answers_in_order_of_readiness_with_errors_alone(
    fake_server: FakeServer,
) -> None:
    def request(rid: str, model: str, digit: int) -> bytes:
        req = oip.ModelInferRequest(model_name=model, id=rid, raw_input_contents=[
            fake_digit(digit).tobytes()
        ])  # fmt: skip
        req.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
        return req.SerializeToString()

    sent = [request("a", "mnist", 4), request("b", "other", 5), request("c", "mnist", 6)]
    async with grpc.aio.insecure_channel(fake_server.target) as channel:
        stream = channel.stream_stream(
            KSERVE + "ModelStreamInfer",
            response_deserializer=tx.ModelStreamInferResponse.FromString,
        )
        answers = [a async for a in stream(iter(sent), timeout=10)]
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == ["a", "b", "c"]
    assert by_id["b"].error_message == NOT_SERVED
    for rid, digit in (("a", 4), ("c", 6)):
        response = by_id[rid].infer_response
        assert by_id[rid].error_message == ""
        probs = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 10)
        assert int(probs.argmax()) == digit
        assert response.model_version == "1"
    assert all(a.infer_response.parameters["triton_final_response"].bool_param for a in answers)


# --- TensorFlow Serving with its messages


def _tfs_predict(spec: dict[str, Any], images: np.ndarray = IMAGES) -> tfs.PredictRequest:
    request = tfs.PredictRequest()
    request.model_spec.name = spec.get("name", "mnist")
    if "version" in spec:
        request.model_spec.version.value = spec["version"]
    if "label" in spec:
        request.model_spec.version_label = spec["label"]
    tensor = request.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    for size in images.shape:
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = images.tobytes()
    return request


async def _tfs_call(target: str, method: str, request: Any, response: Any) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return await call(request, timeout=10)


async def test_tf_serving_predict_metadata_and_status(fake_server: FakeServer) -> None:
    before = calls(fake_server, "tfserving.Predict")
    t = fake_server.target
    for spec in ({}, {"version": 1}):
        answer = await _tfs_call(t, TFS + "Predict", _tfs_predict(spec), tfs.PredictResponse)
        out = answer.outputs["probabilities"]
        assert [d.size for d in out.tensor_shape.dim] == [len(DIGITS), 10]
        probs = np.frombuffer(out.tensor_content, "<f4").reshape(-1, 10)
        assert list(probs.argmax(axis=1)) == DIGITS
        assert (answer.model_spec.name, answer.model_spec.version.value) == ("mnist", 1)
    metadata_request = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata_request.model_spec.name = "mnist"
    metadata = await _tfs_call(
        t, TFS + "GetModelMetadata", metadata_request, tfs.GetModelMetadataResponse
    )
    signatures = tfs.SignatureDefMap()
    assert metadata.metadata["signature_def"].Unpack(signatures)
    assert list(signatures.signature_def["serving_default"].inputs) == ["images"]
    status_request = tfs.GetModelStatusRequest()
    status_request.model_spec.name = "mnist"
    status = await _tfs_call(
        t, "/tensorflow.serving.ModelService/GetModelStatus", status_request,
        tfs.GetModelStatusResponse,
    )  # fmt: skip
    (version,) = status.model_version_status
    assert (version.version, version.state) == (1, tfs.ModelVersionStatus.AVAILABLE)
    assert calls(fake_server, "tfserving.Predict") == before + 2


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        ({"name": "other"}, "NOT_FOUND", "Servable not found for request: Latest(other)"),
        (
            {"version": 7},
            "NOT_FOUND",
            "Servable not found for request: Specific(mnist, 7); loaded: version 1",
        ),
        (
            {"version": 0},
            "NOT_FOUND",
            "Servable not found for request: Specific(mnist, 0); loaded: version 1",
        ),
        (
            {"label": "stable"},
            "INVALID_ARGUMENT",
            "Unrecognized servable version label: stable; loaded: version 1",
        ),
    ],
)
async def test_tf_serving_pinning_answers_in_tf_serving_words(
    fake_server: FakeServer, spec: dict[str, Any], code: str, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _tfs_call(
            fake_server.target, TFS + "Predict", _tfs_predict(spec), tfs.PredictResponse
        )
    assert (info.value.code().name, info.value.details()) == (code, message)
