"""The model repository through mnist.v1 (ListModels, ConfigureModel), the SDK
(``list_models``, ``load_model``, ``unload_model``, ``set_labels``, ``set_version_policy``) and
the CLI (``mnist-client models ...``): listing is always allowed, changing needs
``--model-control``; a relabel moves unpinned calls (and a rollback is one more relabel); an
unload refuses calls saying why and a load brings the model back."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from mnist_client import AsyncDigitClient, DigitClient, ModelStatus, VersionStatus, cli
from mnist_client.pb import digit_classifier_pb2 as pb
from mnist_client.pb import digit_classifier_pb2_grpc as pb_grpc
from server.manager import LABELS_FILE

from .fakes import FakeServer, StartFake, fake_digit

pytestmark = pytest.mark.fast

IMAGE = fake_digit(3)


async def _refused(call: Callable[[], Awaitable[Any]], code: grpc.StatusCode) -> str:
    """The message of the ``code`` error ``call`` ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call()
    assert info.value.code() == code, info.value.details()
    return info.value.details() or ""


async def _cli(capsys: pytest.CaptureFixture[str], fake: FakeServer, *argv: str) -> list[str]:
    """Run ``mnist-client ARGV --target FAKE`` (blocking: in a thread, off the server's event
    loop); its stdout lines. It must exit 0."""
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, [*argv, "--target", fake.target])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.splitlines()


async def test_list_models_shows_states_labels_and_the_default(start_fake: StartFake) -> None:
    fake = await start_fake("--version-policy", "latest:2", versions=(1, 2, 3))
    (fake.server.settings.model_dir / LABELS_FILE).write_text(json.dumps({"stable": 2}))
    await asyncio.to_thread(fake.server.manager.refresh)
    async with AsyncDigitClient(fake.target) as client:
        [model] = await client.list_models(timeout=10)
    assert model.name == "mnist" and model.version_policy == "latest:2"
    assert [(v.version, v.state) for v in model.versions] == [
        (1, "UNAVAILABLE"),
        (2, "READY"),
        (3, "READY"),
    ]
    assert "not in the version policy latest:2" in model.versions[0].reason
    assert model.versions[1] == VersionStatus(2, "READY", "")
    assert model.labels == {"stable": 2} and model.labels_of(2) == ["stable"]
    assert model.default_version == 2 and model.loaded_versions == (2, 3)
    # the blocking client answers the same
    with DigitClient(fake.target) as sync_client:
        assert await asyncio.to_thread(sync_client.list_models) == [model]


async def test_configure_without_model_control_is_failed_precondition(
    start_fake: StartFake,
) -> None:
    fake = await start_fake(versions=(1, 2))
    async with AsyncDigitClient(fake.target) as client:
        for call in (
            lambda: client.load_model("mnist", timeout=10),
            lambda: client.unload_model("mnist", timeout=10),
            lambda: client.set_labels("mnist", {"stable": 2}, timeout=10),
            lambda: client.set_version_policy("mnist", "latest:2", timeout=10),
        ):
            why = await _refused(call, grpc.StatusCode.FAILED_PRECONDITION)
            assert "--model-control" in why
        [model] = await client.list_models(timeout=10)  # listing is always allowed
        assert model.loaded_versions == (2,) and model.version_policy == "latest:1"
        assert (await client.predict(IMAGE, timeout=10)).model_version == 2


async def test_wrong_configure_requests_are_refused_saying_why(start_fake: StartFake) -> None:
    fake = await start_fake("--model-control", "on", versions=(1, 2))
    async with (
        AsyncDigitClient(fake.target) as client,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        why = await _refused(
            lambda: client.set_version_policy("mnist", "newest", timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "latest:N" in why
        stub = pb_grpc.DigitClassifierStub(channel)
        for request, expected in (
            (pb.ConfigureModelRequest(name="mnist", load=True, unload=True), "exclude"),
            (pb.ConfigureModelRequest(name="mnist", unload=True, version_policy="all"), "excl"),
            (pb.ConfigureModelRequest(name="mnist", labels={"stable": 2}), "set_labels"),
            (pb.ConfigureModelRequest(name="mnist", labels={"": 2}, set_labels=True), "empty"),
        ):
            why = await _refused(
                functools.partial(stub.ConfigureModel, request, timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert expected in why
        why = await _refused(
            lambda: client.unload_model("digits", timeout=10), grpc.StatusCode.NOT_FOUND
        )
        assert "'digits'" in why and "mnist" in why
        [model] = await client.list_models(timeout=10)
    assert model.loaded_versions == (2,) and model.labels == {}  # nothing changed


async def test_relabel_moves_unpinned_calls_and_a_rollback_is_one_more(
    start_fake: StartFake,
) -> None:
    fake = await start_fake("--model-control", "on", "--version-policy", "all", versions=(1, 2))
    async with AsyncDigitClient(fake.target) as client:
        assert (await client.predict(IMAGE, timeout=10)).model_version == 2  # the newest
        status = await client.set_labels("mnist", {"stable": 1, "canary": 2}, timeout=10)
        assert status.labels == {"stable": 1, "canary": 2} and status.default_version == 1
        assert (await client.predict(IMAGE, timeout=10)).model_version == 1
        assert (await client.predict(IMAGE, timeout=10, label="canary")).model_version == 2
        status = await client.set_labels("mnist", {"stable": 2}, timeout=10)  # promote 2
        assert status.labels == {"stable": 2} and status.default_version == 2
        assert (await client.predict(IMAGE, timeout=10)).model_version == 2
        status = await client.set_labels("mnist", {"stable": 1}, timeout=10)  # roll back
        assert status.default_version == 1 and status.loaded_versions == (1, 2)
        assert (await client.predict(IMAGE, timeout=10)).model_version == 1
        status = await client.set_labels("mnist", {}, timeout=10)  # no label: the newest
        assert status.labels == {} and status.default_version == 2
    labels = fake.server.settings.model_dir / LABELS_FILE
    assert not labels.exists()  # written into the folder (so every replica follows), removed


async def test_unload_refuses_calls_saying_why_and_load_brings_the_model_back(
    start_fake: StartFake,
) -> None:
    fake = await start_fake("--model-control", "on", versions=(1, 2))
    pinned = pb.PredictRequest(image=IMAGE.tobytes(), model_spec=pb.ModelSpec(name="mnist"))
    async with (
        AsyncDigitClient(fake.target) as client,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        stub = pb_grpc.DigitClassifierStub(channel)
        status = await client.unload_model("mnist", timeout=10)
        assert status.version_policy == "none" and status.default_version is None
        assert status.loaded_versions == ()
        assert {v.state for v in status.versions} <= {"UNLOADING", "UNAVAILABLE"}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Predict(pinned, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # no retry: every replica is alike
        assert "'mnist' was unloaded" in (info.value.details() or ""), info.value.details()
        status = await client.load_model("mnist", timeout=10)  # back to --version-policy
        assert status.version_policy == "latest:1" and status.default_version == 2
        assert (await stub.Predict(pinned, timeout=10)).model_version == 2
        assert (await client.predict(IMAGE, timeout=10)).model_version == 2


async def test_set_version_policy_latest_2_loads_two_and_none_goes_back(
    start_fake: StartFake,
) -> None:
    fake = await start_fake("--model-control", "on", versions=(1, 2, 3))
    async with AsyncDigitClient(fake.target) as client:
        status = await client.set_version_policy("mnist", "latest:2", timeout=10)
        assert status.version_policy == "latest:2" and status.loaded_versions == (2, 3)
        assert (await client.predict(IMAGE, timeout=10, version=2)).model_version == 2
        status = await client.load_model("mnist", "specific:1,3", timeout=10)
        assert status.loaded_versions == (1, 3) and status.default_version == 3
        status = await client.set_version_policy("mnist", None, timeout=10)  # --version-policy
        assert status.version_policy == "latest:1" and status.loaded_versions == (3,)


async def test_a_label_to_a_version_not_loaded_is_failed_precondition(
    start_fake: StartFake,
) -> None:
    fake = await start_fake("--model-control", "on", versions=(1, 2))
    async with AsyncDigitClient(fake.target) as client:
        await client.set_labels("mnist", {"canary": 2}, timeout=10)
        why = await _refused(
            lambda: client.set_labels("mnist", {"stable": 1, "canary": 2}, timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert "'stable'" in why and "version 1" in why and "not loaded" in why
        [model] = await client.list_models(timeout=10)
    assert model.labels == {"canary": 2}  # nothing changed


async def test_cli_models_list_and_label(
    start_fake: StartFake, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = await start_fake("--model-control", "on", "--version-policy", "all", versions=(1, 2))
    lines = await _cli(capsys, fake, "models", "list")
    assert lines[0].split() == list(cli.MODEL_COLUMNS)
    assert [line.split() for line in lines[1:]] == [
        ["mnist", "all", "1", "READY", "-"],
        ["mnist", "all", "2", "READY", "-", "*"],
    ]
    lines = await _cli(capsys, fake, "models", "label", "mnist", "stable=1", "canary=2")
    assert [line.split() for line in lines[1:]] == [
        ["mnist", "all", "1", "READY", "stable", "*"],
        ["mnist", "all", "2", "READY", "canary"],
    ]
    # a rollout and its rollback, each one command; other labels are kept
    await _cli(capsys, fake, "models", "label", "mnist", "stable=2")
    lines = await _cli(capsys, fake, "models", "list")
    assert lines[2].split() == ["mnist", "all", "2", "READY", "canary,stable", "*"]
    await _cli(capsys, fake, "models", "label", "mnist", "stable=1", "--remove", "canary")
    lines = await _cli(capsys, fake, "models", "list")
    assert [line.split() for line in lines[1:]] == [
        ["mnist", "all", "1", "READY", "stable", "*"],
        ["mnist", "all", "2", "READY", "-"],
    ]
    async with AsyncDigitClient(fake.target) as client:
        assert (await client.predict(IMAGE, timeout=10)).model_version == 1
    # refused: a label to a version not on disk (the server's message), a wrong argument
    for argv in (["stable=7"], ["stable"], []):
        code = await asyncio.to_thread(
            cli.main, ["models", "label", "mnist", *argv, "--target", fake.target]
        )
        assert code == 2
    err = capsys.readouterr().err
    assert "FAILED_PRECONDITION" in err and "not LABEL=VERSION" in err


def test_the_model_table_marks_the_default_and_gives_reasons() -> None:
    model = ModelStatus(
        "mnist",
        "latest:1",
        (VersionStatus(1, "UNAVAILABLE", "not in the version policy latest:1"),
         VersionStatus(2, "READY")),
        {"stable": 2, "canary": 2},
        2,
    )  # fmt: skip
    assert cli.model_rows([model, ModelStatus("other", "none")]) == [
        ("mnist", "latest:1", "1", "UNAVAILABLE", "-", "", "not in the version policy latest:1"),
        ("mnist", "latest:1", "2", "READY", "canary,stable", "*", ""),
        ("other", "none", "-", "-", "-", "", "no version on disk"),
    ]
