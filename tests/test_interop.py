"""The server through other serving systems' own clients: tritonclient (KServe v2 / Open
Inference Protocol) and tensorflow-serving-api, on the same port as mnist.v1."""

from __future__ import annotations

import asyncio
import queue

import grpc
import numpy as np
import pytest

from mnist_client import DigitClient
from tests.conftest import ServerProcess

tc = pytest.importorskip("tritonclient.grpc")
tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import (  # noqa: E402 - after the skip
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


def _triton_input(images: np.ndarray):  # type: ignore[no-untyped-def]
    tensor = tc.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


@pytest.fixture(scope="module")
def sdk_probabilities(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    with DigitClient(server.target) as client:
        return client.batch_predict(mnist_test[0][:64]).probabilities


# --- KServe v2 with tritonclient


def test_triton_health_and_metadata(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist") and client.is_model_ready("mnist", "1")
    assert not client.is_model_ready("mnist", "2") and not client.is_model_ready("other")
    meta = client.get_model_metadata("mnist", as_json=True)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": ["-1", "28", "28"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("mnist", as_json=True)["config"]
    assert config["max_batch_size"] == 4096
    assert config["input"][0]["data_type"] == "TYPE_UINT8" and config["input"][0]["dims"] == [
        "28", "28",
    ]  # fmt: skip
    assert "statistics" in client.get_server_metadata(as_json=True)["extensions"]


@pytest.mark.parametrize("n", [1, 64])
def test_triton_infer_gives_the_sdks_answers(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray], sdk_probabilities, n: int
) -> None:  # type: ignore[no-untyped-def]
    client = tc.InferenceServerClient(server.target)
    result = client.infer(
        "mnist", [_triton_input(mnist_test[0][:n])], request_id=f"r{n}",
        outputs=[tc.InferRequestedOutput("probabilities")],
    )  # fmt: skip
    assert result.get_response().id == f"r{n}" and result.get_response().model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("probabilities"), sdk_probabilities[:n])
    top = client.infer(
        "mnist", [_triton_input(mnist_test[0][:2])],
        outputs=[tc.InferRequestedOutput("probabilities", class_count=2)],
    ).as_numpy("probabilities")  # fmt: skip
    assert top.shape == (2, 2)
    assert [int(cell.split(b":")[1]) for cell in top[:, 0]] == sdk_probabilities[:2].argmax(
        axis=1
    ).tolist()


def test_triton_async_and_stream_infer(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray], sdk_probabilities
) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc.aio as tca

    x = mnist_test[0]

    async def async_infer() -> np.ndarray:
        client = tca.InferenceServerClient(server.target)
        try:
            tensor = tca.InferInput("images", [8, 28, 28], "UINT8")
            tensor.set_data_from_numpy(x[:8])
            return (await client.infer("mnist", [tensor])).as_numpy("probabilities")
        finally:
            await client.close()

    np.testing.assert_array_equal(asyncio.run(async_infer()), sdk_probabilities[:8])

    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = tc.InferenceServerClient(server.target)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(100):
        client.async_stream_infer("mnist", [_triton_input(x[i % 64][None])], request_id=str(i))
    client.stop_stream()
    got = {}
    while not answers.empty():
        result, error = answers.get()
        assert error is None, error
        got[int(result.get_response().id)] = result.as_numpy("probabilities")[0]  # type: ignore[attr-defined]
    assert sorted(got) == list(range(100))
    for i, probs in got.items():
        np.testing.assert_array_equal(probs, sdk_probabilities[i % 64])


def _count(stats: dict, *path: str) -> int:  # type: ignore[type-arg]
    for key in path:
        stats = stats.get(key, {})
    return int(stats or 0)  # type: ignore[arg-type]


def test_triton_statistics_count_what_was_inferred(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.target)
    before = client.get_inference_statistics("mnist", as_json=True)["model_stats"][0]
    client.infer("mnist", [_triton_input(np.zeros((5, 28, 28), np.uint8))])
    after = client.get_inference_statistics("mnist", as_json=True)["model_stats"][0]
    assert _count(after, "inference_count") - _count(before, "inference_count") == 5
    success = ("inference_stats", "success", "count")
    assert _count(after, *success) == _count(before, *success) + 1
    assert _count(after, "inference_stats", "queue", "ns") > 0
    # Triton's three compute phases, counted together (perf_analyzer aborts otherwise)
    phases = ("compute_input", "compute_infer", "compute_output")
    counts = {_count(after, "inference_stats", p, "count") for p in phases}
    assert counts == {_count(after, "execution_count")}
    assert all(_count(after, "inference_stats", p, "ns") > 0 for p in phases)
    # per batch size: the model calls of each size add up to them all
    batches = after["batch_stats"]
    assert {int(b["batch_size"]) for b in batches} >= {5}
    for p in phases:
        assert sum(_count(b, p, "count") for b in batches) == _count(after, "execution_count")
    assert sum(int(b["batch_size"]) * _count(b, "compute_infer", "count") for b in batches) == (
        _count(after, "inference_count")
    )


def test_triton_stream_requests_are_counted_and_marked_final(server: ServerProcess) -> None:
    client = tc.InferenceServerClient(server.target)
    before = client.get_inference_statistics("mnist", as_json=True)["model_stats"][0]
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    image = _triton_input(np.zeros((1, 28, 28), np.uint8))
    for i in range(3):
        client.async_stream_infer("mnist", [image], request_id=str(i),
                                  enable_empty_final_response=True)  # fmt: skip
    client.async_stream_infer("other", [image], request_id="bad", enable_empty_final_response=True)
    finals = {}
    for _ in range(4):  # each request's only answer is its final one: waiting ends
        result, error = answers.get(timeout=10)
        if error is not None:  # the error's bare message, as Triton's
            assert str(error.message()).startswith("model 'other' is not served")  # type: ignore[attr-defined]
            continue
        response = result.get_response(as_json=True)  # type: ignore[attr-defined]
        finals[response["id"]] = response["parameters"]["triton_final_response"]["bool_param"]
    client.stop_stream()
    assert finals == {"0": True, "1": True, "2": True}
    after = client.get_inference_statistics("mnist", as_json=True)["model_stats"][0]
    success = ("inference_stats", "success", "count")
    assert _count(after, *success) - _count(before, *success) == 3
    assert _count(after, "inference_stats", "fail", "count") == _count(
        before, "inference_stats", "fail", "count"
    )  # a request for another model never reached a model: not an inference


def test_triton_stream_error_answers_are_final_with_the_bare_message(
    server: ServerProcess,
) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="other", id="e1")
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        (answer,) = list(stub.ModelStreamInfer(iter([request]), timeout=10))
    assert answer.error_message == "model 'other' is not served here; this server serves 'mnist'"
    assert answer.infer_response.id == "e1"
    assert answer.infer_response.parameters["triton_final_response"].bool_param


def test_triton_refusals_and_clamps_as_triton(server: ServerProcess) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="mnist")
        tensor = request.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
        tensor.contents.uint_contents.extend([0] * 784)
        request.raw_input_contents.append(bytes(784))  # and the same again, raw
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "contents field must not be specified" in info.value.details()  # type: ignore[attr-defined]
    # more classes than there are: all ten, best first
    client = tc.InferenceServerClient(server.target)
    top = client.infer(
        "mnist", [_triton_input(np.zeros((1, 28, 28), np.uint8))],
        outputs=[tc.InferRequestedOutput("probabilities", class_count=25)],
    ).as_numpy("probabilities")  # fmt: skip
    assert top.shape == (1, 10)
    assert sorted(int(cell.split(b":")[1]) for cell in top[0]) == list(range(10))


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "message"),
    [
        ("images", "FP32", [1, 28, 28], "input 'images' has datatype FP32, expected UINT8"),
        ("images", "UINT8", [1, 28, 27], "has shape [1, 28, 27]; a request's shape is [N, 28, 28]"),
        ("pixels", "UINT8", [1, 28, 28], "input 'pixels' is not known"),
    ],
)
def test_triton_bad_inputs_are_invalid_argument(
    server: ServerProcess, name: str, datatype: str, shape: list[int], message: str
) -> None:
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(server.target)
    tensor = tc.InferInput(name, shape, datatype)
    dtype = np.float32 if datatype == "FP32" else np.uint8
    tensor.set_data_from_numpy(np.zeros(shape, dtype))
    with pytest.raises(InferenceServerException) as info:
        client.infer("mnist", [tensor])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("other", [_triton_input(np.zeros((1, 28, 28), np.uint8))])
    assert info.value.status() == "StatusCode.NOT_FOUND"


# --- TensorFlow Serving with tensorflow-serving-api


@pytest.fixture(scope="module")
def tfs_channel(server: ServerProcess):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        yield channel


@pytest.mark.parametrize("n", [1, 64])
def test_tf_serving_predict_gives_the_sdks_answers(
    tfs_channel: grpc.Channel,
    mnist_test: tuple[np.ndarray, np.ndarray],
    sdk_probabilities,
    n: int,
) -> None:  # type: ignore[no-untyped-def]
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(mnist_test[0][:n]))
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tfs_channel)
    response = stub.Predict(request, timeout=10)
    assert response.model_spec.version.value == 1
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["probabilities"]), sdk_probabilities[:n]
    )
    # the same images as typed int_val values instead of tensor_content
    typed = request.inputs["images"]
    typed.ClearField("tensor_content")
    typed.int_val.extend(mnist_test[0][:n].ravel().tolist())
    response = stub.Predict(request, timeout=10)
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["probabilities"]), sdk_probabilities[:n]
    )


def test_tf_serving_metadata_and_status(tfs_channel: grpc.Channel) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    response = prediction_service_pb2_grpc.PredictionServiceStub(tfs_channel).GetModelMetadata(
        request, timeout=10
    )
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["images"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in signature.inputs["images"].tensor_shape.dim] == [-1, 28, 28]
    assert signature.outputs["probabilities"].dtype == tf.float32.as_datatype_enum
    status = model_service_pb2_grpc.ModelServiceStub(tfs_channel).GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}), timeout=10
    )
    (version,) = status.model_version_status
    assert version.version == 1 and version.state == version.AVAILABLE


def test_tf_serving_errors(tfs_channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(tfs_channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "other"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(np.zeros((1, 28, 28), np.uint8)))
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    request.model_spec.name = "mnist"
    request.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    request.model_spec.version.value = 0  # a version like any other, not "the latest"
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    request.model_spec.ClearField("version")
    request.model_spec.version_label = "stable"  # no labels are assigned
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "Unrecognized servable version label: stable" in info.value.details()  # type: ignore[attr-defined]
    request.model_spec.ClearField("version_label")
    request.inputs["pixels"].CopyFrom(request.inputs["images"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "input tensor alias not found in signature: pixels" in info.value.details()  # type: ignore[attr-defined]
    request.model_spec.signature_name = "nope"  # TF Serving's status and words
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert info.value.details() == 'Serving signature key "nope" not found.'  # type: ignore[attr-defined]
    classify = tfs_channel.unary_unary("/tensorflow.serving.PredictionService/Classify")
    with pytest.raises(grpc.RpcError) as info:
        classify(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
