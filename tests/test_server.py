"""The real server on 127.0.0.1, called through real gRPC with the real SDK."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_client import AsyncDigitClient, DigitClient, StreamResult
from mnist_client.pb import digit_classifier_pb2 as pb
from tests.conftest import ROOT, ServerProcess, start_server


@pytest.fixture(scope="module")
def in_process_model(trained_model_dir: Path):  # type: ignore[no-untyped-def]
    import tensorflow as tf

    return tf.saved_model.load(str(trained_model_dir / "1")).signatures["serving_default"]


def test_predictions_equal_the_in_process_model(
    server: ServerProcess, in_process_model, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    import tensorflow as tf

    x, _ = mnist_test
    x = x[:500]
    expected = in_process_model(images=tf.constant(x))["probabilities"].numpy()
    with DigitClient(server.target) as client:
        batch = client.batch_predict(x)
        singles = [client.predict(img) for img in x[:20]]
    np.testing.assert_allclose(batch.probabilities, expected, atol=1e-5)
    assert batch.digits.tolist() == expected.argmax(axis=1).tolist()
    assert set(batch.model_versions.tolist()) == {1}
    for i, p in enumerate(singles):
        np.testing.assert_allclose(p.probabilities, expected[i], atol=1e-5)
        assert p.digit == int(expected[i].argmax())
        assert p.model_version == 1
        assert abs(float(p.probabilities.sum()) - 1.0) < 1e-4


def test_model_agrees_with_labels_on_real_digits(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = mnist_test
    with DigitClient(server.target) as client:
        batch = client.batch_predict(x)
    assert len(batch) == len(x)
    assert (batch.digits == y).mean() > 0.85  # 2 epochs on 6k images: ~90%


def test_large_batch_is_split_and_kept_in_order(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test
    with DigitClient(server.target) as client:
        whole = client.batch_predict(x[:1500])  # > max batch size 256: several model calls
        parts = [client.batch_predict(x[i : i + 100]) for i in range(0, 1500, 100)]
    np.testing.assert_array_equal(whole.digits, np.concatenate([p.digits for p in parts]))


def _raw_call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError:
    call = channel.unary_unary(f"/mnist.v1.DigitClassifier/{method}")
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=10)
    return info.value  # type: ignore[return-value]


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _batch(*sizes: int) -> bytes:
    return pb.BatchPredictRequest(images=[bytes(n) for n in sizes]).SerializeToString()


BAD_REQUESTS = [
    ("Predict", pb.PredictRequest(image=b"\x01" * 783).SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT, "image has 783 bytes, expected 784"),
    ("Predict", b"", grpc.StatusCode.INVALID_ARGUMENT, "image has 0 bytes"),
    ("BatchPredict", pb.BatchPredictRequest().SerializeToString(),
     grpc.StatusCode.INVALID_ARGUMENT, "at least one image"),
    ("BatchPredict", _batch(784, 784, 784, 785), INVALID, "images[3] has 785 bytes"),
    ("BatchPredict", _batch(784, 1568, 0), INVALID, "images[1] has 1568 bytes"),  # sum is right
    ("BatchPredict", _batch(*[784] * 4097), INVALID, "4097 images in one request, limit 4096"),
    ("Predict", b"\x08\x05", INVALID, "image (field 1) has the wrong type"),
    ("Predict", b"\x78\x01", INVALID, "image has 0 bytes"),  # unknown field 15 is skipped
    ("Predict", b"\x0a\xff\xff", INVALID, "not a valid mnist.v1.PredictRequest"),
    ("Predict", (b"\x0a\x90\x06" + bytes(784)) * 2, INVALID, "image (field 1) appears more"),
    # (unknown field 5: fields 1 of GetModelInfoRequest and 2 of BatchPredictRequest are the
    # optional model_spec)
    ("GetModelInfo", b"\x28\x01" * 65, INVALID, "more than 64 unknown fields"),
    ("BatchPredict", _batch(784, 784) + b"\x28\x00" * 65, INVALID, "more than 64 unknown"),
    ("BatchPredict", b"\x0a\x00" * 1000, INVALID, "images[0] has 0 bytes"),
    ("BatchPredict", b"\x0a\x05ab", grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
    ("BatchPredict", bytes(12000 * 790), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]  # fmt: skip


@pytest.mark.parametrize(("method", "payload", "code", "message"), BAD_REQUESTS)
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(
    server: ServerProcess,
    mnist_test: tuple[np.ndarray, np.ndarray],
    method: str,
    payload: bytes,
    code: grpc.StatusCode,
    message: str,
) -> None:
    x, _y = mnist_test
    with DigitClient(server.target) as client:
        err = _raw_call(client._channel, method, payload)
        assert err.code() == code, err.details()
        assert message in (err.details() or "")
        assert client.predict(x[0]).digit == client.batch_predict(x[:1]).digits[0]


def test_rejected_requests_are_counted_by_code(server: ServerProcess) -> None:
    with DigitClient(server.target) as client:
        _raw_call(client._channel, "Predict", b"\x01\x02")
    assert server.metric("mnist_requests_total", method="Predict", code="INVALID_ARGUMENT") >= 1


def test_health_and_model_info(server: ServerProcess) -> None:
    with DigitClient(server.target) as client:
        assert client.health() == "SERVING"
        assert client.health("mnist.v1.DigitClassifier") == "SERVING"
        assert client.health("no.such.Service") != "SERVING"
        info = client.model_info()
    assert info.model_version == 1
    assert info.architecture == "mlp"
    assert 0.8 < info.test_accuracy <= 1.0
    assert info.input_shape == (-1, 28, 28) and info.input_dtype == "uint8"
    assert info.device == "cpu"
    assert info.runtime == "litert"  # runtime auto on a CPU
    assert info.batching["max_batch_size"] == 256
    assert info.metadata["version"] == 1


def test_reflection_lists_and_describes_the_service(server: ServerProcess) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        pool = DescriptorPool(db)
        service = pool.FindServiceByName("mnist.v1.DigitClassifier")
    assert {"mnist.v1.DigitClassifier", "grpc.health.v1.Health"} <= services
    assert [m.name for m in service.methods] == [
        "Predict",
        "BatchPredict",
        "GetModelInfo",
        "PredictStream",
        "ListModels",
        "ConfigureModel",
    ]


def test_metrics_page_has_every_metric(server: ServerProcess) -> None:
    with DigitClient(server.target) as client:
        client.predict(np.zeros((28, 28), np.uint8))
    text = server.metrics()
    for name in (
        'mnist_rpc_duration_seconds_bucket{code="OK",le="0.001",method="Predict"}',
        'mnist_requests_total{code="OK",method="Predict"}',
        'mnist_images_total{code="OK",method="Predict"}',
        "mnist_batch_queue_seconds_bucket",
        'mnist_model_compute_seconds_bucket{device="cpu"',
        "mnist_batch_size_images_bucket",
        "mnist_queue_images",
        "mnist_inflight_requests",
        'mnist_model_info{architecture="mlp",device="cpu",model="mnist",runtime="litert",'
        'version="1"} 1.0',
        'mnist_model_version{model="mnist"} 1.0',
        "mnist_serving 1.0",
    ):
        assert name in text, name


def test_async_client_has_the_same_methods(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test

    async def go() -> tuple[int, int, str, int]:
        async with AsyncDigitClient(server.target) as client:
            p = await client.predict(x[0])
            b = await client.batch_predict(x[:10])
            return (
                p.digit,
                int(b.digits[0]),
                await client.health(),
                (await client.model_info()).model_version,
            )

    digit, first, health, version = asyncio.run(go())
    assert digit == first and health == "SERVING" and version == 1


def test_a_bad_image_fails_alone_and_a_broken_source_ends_the_stream_sync_and_async(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test

    def images() -> Iterator[object]:
        yield x[0]
        yield b"not an image"  # its own error answer, as the README promises; the stream goes on
        yield x[1]

    def failing_source() -> Iterator[object]:
        yield x[0]
        raise RuntimeError("the caller's own source broke")

    async def async_images() -> AsyncIterator[object]:
        for image in images():
            await asyncio.sleep(0)
            yield image

    def check(results: list[StreamResult]) -> None:
        by_id = {r.id: r for r in results}
        assert sorted(by_id) == [0, 1, 2] and by_id[0].ok and by_id[2].ok
        error = by_id[1].error
        assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "12 bytes, expected 784" in error.message

    with DigitClient(server.target) as client:
        check(list(client.predict_stream(images())))
        seen: list[int] = []
        with pytest.raises(RuntimeError, match="source broke"):
            seen.extend(r.id for r in client.predict_stream(failing_source()))
        assert seen == [0]

    async def go() -> list[StreamResult]:
        async with AsyncDigitClient(server.target) as client:
            return [r async for r in client.predict_stream(async_images())]

    check(asyncio.run(go()))


def test_cli_predicts_image_files(
    server: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from PIL import Image

    x, _ = mnist_test
    with DigitClient(server.target) as client:
        expected = client.batch_predict(x[:3]).digits.tolist()
    files = []
    for i in range(3):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(x[i]).save(path)
        files.append(str(path))
    raw = tmp_path / "digit.raw"
    raw.write_bytes(x[0].tobytes())
    result = subprocess.run(
        [sys.executable, "-m", "mnist_client", "predict", "--target", server.target,
         *files, str(raw)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    for line, digit, name in zip(lines, [*expected, expected[0]], [*files, str(raw)], strict=False):
        assert line.startswith(f"{name}: {digit} (p=")
    for sub in ("info", "health"):
        out = subprocess.run(
            [sys.executable, "-m", "mnist_client", sub, "--target", server.target],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "SERVING"


def test_server_without_a_model_is_unavailable_then_loads_one(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    srv = start_server(empty, tmp_path / "server.log", serving=False)
    try:
        with DigitClient(srv.target, timeout=5) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                client.predict(np.zeros((28, 28), np.uint8))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            shutil.copytree(trained_model_dir / "1", empty / "1")
            deadline = time.monotonic() + 30
            while client.health() != "SERVING" and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.health() == "SERVING"
            assert client.predict(np.zeros((28, 28), np.uint8)).model_version == 1
    finally:
        assert srv.stop() == 0
