"""Several models at once (``MODEL_DIR/<name>/<version>/``, Triton's layout): each protocol
names its model, each model has its own versions, policy, labels and batchers, a model folder
that appears is followed, and calls that name no model go to ``--model-name``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput

from mnist_client import AsyncDigitClient
from mnist_client.pb import digit_classifier_pb2 as pb
from mnist_client.pb import digit_classifier_pb2_grpc as pb_grpc
from server.manager import LABELS_FILE, POLICY_FILE
from server.protocols.pb import tensorflow_core_pb2 as tfc
from server.protocols.pb import tensorflow_serving_pb2 as tfs

from .fakes import FakeServer, StartFake, fake_digit, until, write_fake_version

pytestmark = pytest.mark.fast

IMAGE = fake_digit(7)


def _repository(folder: Path, models: dict[str, tuple[int, ...]]) -> None:
    for name, versions in models.items():
        for version in versions:
            write_fake_version(folder / name, version, architecture=name)


async def _serving(fake: FakeServer, models: dict[str, tuple[int, ...]]) -> None:
    """Write ``models`` into the running fake's (empty) folder and wait until each model's
    newest version serves."""
    _repository(fake.server.settings.model_dir, models)
    repository = fake.server.repository
    await until(
        lambda: all(
            name in repository.models and max(versions) in repository.models[name].routes.versions
            for name, versions in models.items()
        )
    )


async def _mnist_v1(target: str, spec: pb.ModelSpec | None) -> pb.PredictResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DigitClassifierStub(channel)
        request = pb.PredictRequest(image=IMAGE.tobytes(), model_spec=spec)
        response: pb.PredictResponse = await stub.Predict(request, timeout=10)
        return response


async def _tf_serving(target: str, name: str) -> tfs.PredictResponse:
    request = tfs.PredictRequest()
    request.model_spec.name = name
    tensor = request.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = IMAGE.tobytes()
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/tensorflow.serving.PredictionService/Predict",
            request_serializer=tfs.PredictRequest.SerializeToString,
            response_deserializer=tfs.PredictResponse.FromString,
        )
        return await call(request, timeout=10)


async def _kserve(client: triton.InferenceServerClient, name: str) -> tuple[str, str]:
    image = InferInput("images", [1, 28, 28], "UINT8")
    image.set_data_from_numpy(IMAGE[None])
    response = (await client.infer(name, [image])).get_response()
    return response.model_name, response.model_version


async def test_each_protocol_names_its_model_and_reaches_that_models_runtime(
    start_fake: StartFake,
) -> None:
    fake = await start_fake(versions=(), serving=False)
    await _serving(fake, {"mlp": (1,), "cnn": (1, 2)})
    await until(lambda: fake.server.health.serving)
    runtimes = fake.loader.models
    async with triton.InferenceServerClient(fake.target) as kserve:
        cnn = await _mnist_v1(fake.target, pb.ModelSpec(name="cnn"))
        mlp = await _mnist_v1(fake.target, pb.ModelSpec(name="mlp", version=1))
        assert (cnn.digit, cnn.model_version, mlp.model_version) == (7, 2, 1)
        assert await _kserve(kserve, "mlp") == ("mlp", "1")
        assert await _kserve(kserve, "cnn") == ("cnn", "2")
        by_tfs = (await _tf_serving(fake.target, "cnn")).model_spec
        assert (by_tfs.name, by_tfs.version.value) == ("cnn", 2)
        metadata = await kserve.get_model_metadata("cnn", as_json=True)
        assert (metadata["name"], metadata["versions"]) == ("cnn", ["2"])
        # the SDK: model= on every call
        async with AsyncDigitClient(fake.target) as client:
            one = await client.predict(IMAGE, timeout=10, model="mlp")
            many = await client.batch_predict([IMAGE] * 2, timeout=10, model="cnn", version=2)
            streamed = [
                r.prediction.model_version
                async for r in client.predict_stream([IMAGE], timeout=10, model="mlp")
                if r.prediction is not None
            ]
            info = await client.model_info(timeout=10, model="cnn")
        assert (one.model_version, tuple(many.model_versions), streamed) == (1, (2, 2), [1])
        assert (info.model_name, info.architecture, info.loaded_versions) == ("cnn", "cnn", (2,))
        assert [(v.version, v.state, v.reason) for v in info.versions] == [
            (1, "UNAVAILABLE", "not in the version policy latest:1"),
            (2, "READY", ""),
        ]
    # each call ran on its own model's runtime: mlp 1 four times, cnn 2 four times
    assert len(runtimes[("mlp", 1)].batch_sizes) == 4
    assert len(runtimes[("cnn", 2)].batch_sizes) == 4
    assert ("cnn", 1) not in runtimes  # latest:1 per model
    assert fake.count("mnist_version_requests_total", model="cnn", version="2") == 4
    assert fake.count("mnist_model_version", model="mlp") == 1
    # a model that is not served, and a call that names none where no default exists
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _mnist_v1(fake.target, pb.ModelSpec(name="rnn"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'rnn' is not served here; this server serves 'cnn', 'mlp'" in str(err.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _mnist_v1(fake.target, None)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "name a model: this server serves 'cnn', 'mlp'" in str(err.value.details())


async def test_calls_that_name_no_model_go_to_model_name(start_fake: StartFake) -> None:
    fake = await start_fake("--model-name", "cnn", versions=(), serving=False)
    await _serving(fake, {"mlp": (1,), "cnn": (3,)})
    response = await _mnist_v1(fake.target, None)
    assert response.model_version == 3
    assert len(fake.loader.models[("cnn", 3)].batch_sizes) == 1


async def test_each_model_has_its_own_policy_and_labels(start_fake: StartFake) -> None:
    fake = await start_fake(versions=(), serving=False)
    folder = fake.server.settings.model_dir
    _repository(folder, {"mlp": (1, 2), "cnn": (1, 2, 3)})
    (folder / "cnn" / POLICY_FILE).write_text(json.dumps({"version_policy": "all"}))
    (folder / "cnn" / LABELS_FILE).write_text(json.dumps({"stable": 1}))
    repository = fake.server.repository
    await until(
        lambda: (
            {"mlp", "cnn"} <= repository.models.keys()
            and sorted(repository.models["cnn"].routes.versions) == [1, 2, 3]
            and "stable" in repository.models["cnn"].routes.labels
            and repository.models["mlp"].current is not None
        )
    )
    assert sorted(repository.models["mlp"].routes.versions) == [2]  # --version-policy's
    # cnn's stable label is its default; mlp has no label of that name
    assert (await _mnist_v1(fake.target, pb.ModelSpec(name="cnn"))).model_version == 1
    assert (await _mnist_v1(fake.target, pb.ModelSpec(name="mlp"))).model_version == 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _mnist_v1(fake.target, pb.ModelSpec(name="mlp", label="stable"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "label 'stable' of model 'mlp' points at no loaded version" in str(err.value.details())


async def test_batches_never_mix_models(start_fake: StartFake) -> None:
    fake = await start_fake("--max-batch-size", "64", versions=(), serving=False)
    await _serving(fake, {"mlp": (1,), "cnn": (1,)})
    mlp, cnn = fake.loader.models[("mlp", 1)], fake.loader.models[("cnn", 1)]
    mlp.gate.clear()  # hold mlp's first model call so that calls for both queue up
    first = asyncio.ensure_future(_mnist_v1(fake.target, pb.ModelSpec(name="mlp")))
    await until(lambda: len(mlp.batch_sizes) == 1)
    calls = [_mnist_v1(fake.target, pb.ModelSpec(name=name)) for name in ["mlp", "cnn"] * 8]
    pending = asyncio.gather(*calls)
    mlp_batcher = fake.server.repository.models["mlp"].routes.versions[1].batcher
    assert mlp_batcher is not None
    await until(lambda: mlp_batcher.queued_images == 8)  # mlp's wait behind the gate
    mlp.gate.set()
    answers = await pending
    await first
    assert all(a.digit == 7 for a in answers)
    # every image was answered by its own model's runtime: mlp's 8 queued ones in one batch
    # once its first call returned, cnn's 8 by cnn alone
    assert mlp.batch_sizes == [1, 8]
    assert sum(cnn.batch_sizes) == 8
