"""The repository's management calls over gRPC: Triton's model repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) with tritonclient and its own
messages, TF Serving's HandleReloadConfigRequest and GetModelStatus with the server's copy of
TF Serving's messages (its Python package imports TensorFlow); load, unload and reload only
with ``--model-control``, and with the token under ``--auth-token-file`` like every call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from server.manager import LABELS_FILE, POLICY_FILE
from server.protocols.pb import tensorflow_core_pb2 as tfc
from server.protocols.pb import tensorflow_serving_pb2 as tfs

from .fakes import (
    FakeServer,
    StartFake,
    fake_digit,
    start_fake_server,
    until,
    write_fake_models,
)

pytestmark = pytest.mark.fast

CONTROL = ("--model-control", "on")
MODEL_SERVICE = "/tensorflow.serving.ModelService/"
TFS_PREDICT = "/tensorflow.serving.PredictionService/Predict"
IMAGE = fake_digit(3)
StartModels = Callable[..., Awaitable[FakeServer]]


@pytest.fixture
async def start_models(tmp_path: Path) -> AsyncIterator[StartModels]:
    """Starts fake servers on a repository of several models (``await start_models({"mlp":
    (1, 2), "cnn": (1,)}, *flags)``, Triton's layout); stops them at the end of the test."""
    started: list[FakeServer] = []

    async def start(models: dict[str, tuple[int, ...]], *args: str) -> FakeServer:
        folder = tmp_path / f"repository{len(started)}"
        write_fake_models(folder, models)
        started.append(await start_fake_server(folder, *args, versions=()))
        return started[-1]

    yield start
    for fake in started:
        await fake.server.stop()


async def index(target: str, ready: bool = False, **kw: Any) -> list[tuple[str, str, str, str]]:
    """RepositoryIndex with Triton's own messages: (name, version, state, reason) each."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        answer = await stub.RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=ready), timeout=10, **kw
        )
    return [(m.name, m.version, m.state, m.reason) for m in answer.models]


async def load(target: str, model: str, policy: str | None = None, **kw: Any) -> None:
    """RepositoryModelLoad with Triton's own messages (tritonclient's load_model cannot send
    the ``version_policy`` parameter)."""
    request = service_pb2.RepositoryModelLoadRequest(model_name=model)
    if policy is not None:
        request.parameters["version_policy"].string_param = policy
    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelLoad(request, timeout=10, **kw)


def reload_request(models: dict[str, dict[str, Any]]) -> tfs.ReloadConfigRequest:
    """A ReloadConfigRequest listing ``models``: {name: {"policy": "latest:2" | "all" |
    [versions], "labels": {...}, "base_path": ...}}."""
    request = tfs.ReloadConfigRequest()
    configs = request.config.model_config_list.config  # set, even when empty
    request.config.model_config_list.SetInParent()
    for name, spec in models.items():
        config = configs.add(name=name, base_path=spec.get("base_path", ""),
                             model_platform="tensorflow")  # fmt: skip
        policy = spec.get("policy")
        choice = config.model_version_policy
        if isinstance(policy, list):
            choice.specific.versions.extend(policy)
        elif policy == "all":
            choice.all.SetInParent()
        elif policy is not None:
            choice.latest.num_versions = int(policy.split(":")[1])
        config.version_labels.update(spec.get("labels", {}))
    return request


async def tfs_call(target: str, method: str, request: Any, response: Any, **kw: Any) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return await call(request, timeout=10, **kw)


async def reload(target: str, models: dict[str, dict[str, Any]], **kw: Any) -> Any:
    return await tfs_call(target, MODEL_SERVICE + "HandleReloadConfigRequest",
                          reload_request(models), tfs.ReloadConfigResponse, **kw)  # fmt: skip


async def model_status(target: str, model: str = "mnist") -> list[tuple[int, str, int, str]]:
    """GetModelStatus of every version: (version, state name, error_code, error_message)."""
    request = tfs.GetModelStatusRequest()
    request.model_spec.name = model
    answer = await tfs_call(
        target, MODEL_SERVICE + "GetModelStatus", request, tfs.GetModelStatusResponse
    )
    state = tfs.ModelVersionStatus.State.Name
    return [(v.version, state(v.state), v.status.error_code, v.status.error_message)
            for v in answer.model_version_status]  # fmt: skip


async def predict_version(target: str, model: str = "mnist") -> int:
    """The version that answers an unpinned TF Serving Predict of ``model``."""
    request = tfs.PredictRequest()
    request.model_spec.name = model
    tensor = request.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = IMAGE.tobytes()
    answer = await tfs_call(target, TFS_PREDICT, request, tfs.PredictResponse)
    return int(answer.model_spec.version.value)


def _triton_input() -> InferInput:
    tensor = InferInput("images", [1, 28, 28], "UINT8")
    tensor.set_data_from_numpy(IMAGE[np.newaxis])
    return tensor


async def test_without_model_control_load_unload_and_reload_are_refused_and_index_answers(
    start_fake: StartFake,
) -> None:
    fake = await start_fake(versions=(1, 2))
    async with triton.InferenceServerClient(fake.target) as client:
        for change in (client.load_model("mnist"), client.unload_model("mnist")):
            with pytest.raises(InferenceServerException) as info:
                await change
            assert info.value.status() == str(grpc.StatusCode.FAILED_PRECONDITION)
            assert "--model-control" in (info.value.message() or "")
        index = await client.get_model_repository_index(as_json=True)
        metadata = await client.get_server_metadata(as_json=True)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await reload(fake.target, {"mnist": {}})
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--model-control" in (refused.value.details() or "")
    assert index["models"] == [
        {"name": "mnist", "version": "1", "state": "UNAVAILABLE",
         "reason": "not in the version policy latest:1"},
        {"name": "mnist", "version": "2", "state": "READY"},
    ]  # fmt: skip
    assert "model_repository" in metadata["extensions"]
    assert await predict_version(fake.target) == 2  # nothing changed
    assert fake.count("mnist_requests_total", method="kserve.RepositoryModelLoad",
                      code="FAILED_PRECONDITION") == 1  # fmt: skip


async def test_triton_unload_and_load_of_one_model_of_several(start_models: StartModels) -> None:
    fake = await start_models({"mlp": (1, 2), "cnn": (1,)}, *CONTROL)
    t = fake.target
    assert await index(t, ready=True) == [("cnn", "1", "READY", ""), ("mlp", "2", "READY", "")]
    async with triton.InferenceServerClient(t) as client:
        await client.unload_model("cnn")
        await until(lambda: fake.server.core.status("cnn").versions[0].state == "UNAVAILABLE")
        for version in ("", "1"):
            with pytest.raises(InferenceServerException) as info:
                await client.infer("cnn", [_triton_input()], model_version=version)
            assert info.value.status() == str(grpc.StatusCode.NOT_FOUND)
            assert "model 'cnn' was unloaded" in (info.value.message() or "")
        assert not await client.is_model_ready("cnn")
        mlp = await client.infer("mlp", [_triton_input()])  # the other model serves on
        assert mlp.get_response(as_json=True)["model_version"] == "2"
        assert await index(t) == [
            ("cnn", "1", "UNAVAILABLE", "not in the version policy none"),
            ("mlp", "1", "UNAVAILABLE", "not in the version policy latest:1"),
            ("mlp", "2", "READY", ""),
        ]
        assert json.loads((fake.server.settings.model_dir / "cnn" / POLICY_FILE).read_text()) == {
            "version_policy": "none"
        }  # in the folder: every replica on it follows

        await client.load_model("cnn")
        assert await client.is_model_ready("cnn")
        cnn = await client.infer("cnn", [_triton_input()])
        assert cnn.get_response(as_json=True)["model_version"] == "1"
        with pytest.raises(InferenceServerException) as unknown:
            await client.unload_model("rnn")
        assert unknown.value.status() == str(grpc.StatusCode.NOT_FOUND)

    await load(t, "mlp", "latest:2")  # the version_policy parameter
    assert await index(t, ready=True) == [
        ("cnn", "1", "READY", ""), ("mlp", "1", "READY", ""), ("mlp", "2", "READY", "")
    ]  # fmt: skip
    for policy, code in (("newest", "INVALID_ARGUMENT"), ("none", "INVALID_ARGUMENT")):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await load(t, "mlp", policy)
        assert bad.value.code().name == code
    assert fake.count("mnist_requests_total", method="kserve.RepositoryModelLoad",
                      code="OK") == 2  # fmt: skip


async def test_triton_load_with_no_version_that_can_load_says_why(
    start_fake: StartFake,
) -> None:
    fake = await start_fake(*CONTROL, versions=(1, 2))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await load(fake.target, "mnist", "specific:7")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model 'mnist' has no version loaded" in (info.value.details() or "")
    await load(fake.target, "mnist")  # back to --version-policy
    assert await predict_version(fake.target) == 2


async def test_tf_serving_reload_sets_policy_and_labels_and_status_lists_states(
    start_fake: StartFake,
) -> None:
    fake = await start_fake(*CONTROL, versions=(1, 2))
    t = fake.target
    assert await model_status(t) == [
        (1, "END", 14, "not in the version policy latest:1"), (2, "AVAILABLE", 0, "")
    ]  # fmt: skip
    answer = await reload(t, {"mnist": {"policy": "all", "labels": {"stable": 1}}})
    assert answer.status.error_code == 0
    assert await model_status(t) == [(1, "AVAILABLE", 0, ""), (2, "AVAILABLE", 0, "")]
    assert await predict_version(t) == 1  # stable is the default
    await reload(t, {"mnist": {"policy": [1, 2], "labels": {"stable": 2, "canary": 1}}})
    assert await predict_version(t) == 2
    model_dir = fake.server.settings.model_dir
    assert json.loads((model_dir / LABELS_FILE).read_text()) == {"canary": 1, "stable": 2}

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await reload(t, {"mnist": {"policy": "all", "labels": {"stable": 3}}})
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "label 'stable' cannot point at version 3" in (info.value.details() or "")
    assert await predict_version(t) == 2  # the labels are unchanged

    await reload(t, {"mnist": {}})  # no policy: --version-policy (latest:1); no labels
    assert await predict_version(t) == 2
    assert not (model_dir / LABELS_FILE).exists()
    await until(lambda: fake.server.core.status().versions[0].state == "UNAVAILABLE")
    assert await model_status(t) == [
        (1, "END", 14, "not in the version policy latest:1"), (2, "AVAILABLE", 0, "")
    ]  # fmt: skip
    pinned = tfs.GetModelStatusRequest()
    pinned.model_spec.name = "mnist"
    pinned.model_spec.version.value = 2
    one = await tfs_call(t, MODEL_SERVICE + "GetModelStatus", pinned, tfs.GetModelStatusResponse)
    assert [(v.version, v.state) for v in one.model_version_status] == [
        (2, tfs.ModelVersionStatus.AVAILABLE)
    ]


async def test_tf_serving_reload_unloads_the_models_it_omits_and_checks_first(
    start_models: StartModels,
) -> None:
    fake = await start_models({"mlp": (1, 2), "cnn": (1,)}, *CONTROL)
    t = fake.target
    mlp_dir = fake.server.settings.model_dir / "mlp"
    refused: list[tuple[dict[str, dict[str, Any]], grpc.StatusCode]] = [
        ({"mlp": {}, "rnn": {}}, grpc.StatusCode.NOT_FOUND),
        ({"mlp": {"base_path": "/elsewhere/mlp"}}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"mlp": {"policy": []}}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"mlp": {}, "cnn": {}, "mlp ": {}}, grpc.StatusCode.NOT_FOUND),
    ]
    for models, code in refused:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reload(t, models)
        assert info.value.code() == code
    twice = reload_request({"mlp": {}, "cnn": {}})
    twice.config.model_config_list.config.add(name="mlp")
    custom = tfs.ReloadConfigRequest()
    custom.config.custom_model_config.type_url = "type.googleapis.com/x.Config"
    for request, code in (
        (twice, grpc.StatusCode.INVALID_ARGUMENT),
        (custom, grpc.StatusCode.FAILED_PRECONDITION),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await tfs_call(t, MODEL_SERVICE + "HandleReloadConfigRequest", request,
                           tfs.ReloadConfigResponse)  # fmt: skip
        assert info.value.code() == code
    nothing = await tfs_call(t, MODEL_SERVICE + "HandleReloadConfigRequest",
                             tfs.ReloadConfigRequest(), tfs.ReloadConfigResponse)  # fmt: skip
    assert nothing.status.error_code == 0  # TF Serving: no config, no action
    assert await index(t, ready=True) == [("cnn", "1", "READY", ""), ("mlp", "2", "READY", "")]

    await reload(t, {"mlp": {"base_path": str(mlp_dir), "policy": "latest:2"}})
    await until(lambda: fake.server.core.status("cnn").versions[0].state == "UNAVAILABLE")
    assert await index(t) == [
        ("cnn", "1", "UNAVAILABLE", "not in the version policy none"),
        ("mlp", "1", "READY", ""),
        ("mlp", "2", "READY", ""),
    ]
    assert await model_status(t, "cnn") == [(1, "END", 14, "not in the version policy none")]
    with pytest.raises(grpc.aio.AioRpcError) as unloaded:
        await predict_version(t, "cnn")
    assert unloaded.value.code() == grpc.StatusCode.NOT_FOUND

    await reload(t, {"mlp": {}, "cnn": {}})  # listed again: loaded again
    assert await predict_version(t, "cnn") == 1
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await model_status(t, "rnn")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_with_a_token_file_the_management_calls_need_the_token(
    start_fake: StartFake, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    fake = await start_fake(*CONTROL, "--auth-token-file", str(token), versions=(1, 2))
    t = fake.target
    good = [("authorization", "Bearer s3cret")]
    for call in (
        load(t, "mnist", "all"),
        load(t, "mnist", "all", metadata=[("authorization", "Bearer wrong")]),
        index(t),
        reload(t, {"mnist": {"policy": "all"}}),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sorted(fake.server.core.repository.model().routes.versions) == [2]  # unchanged
    await load(t, "mnist", "all", metadata=good)
    assert sorted(fake.server.core.repository.model().routes.versions) == [1, 2]
    assert [v for _, v, _, _ in await index(t, metadata=good)] == ["1", "2"]
    answer = await reload(t, {"mnist": {}}, metadata=good)
    assert answer.status.error_code == 0
