"""Labels (``MODEL_DIR/labels.json``): re-read when the file changes, pointing only at loaded
versions; the ``stable`` label is the default; TF Serving's ``version_label`` and mnist.v1's
label resolve through them; a relabel under load from every protocol fails no call and every
answer comes from the version its label pointed at when the call was admitted."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput

from mnist_client import AsyncDigitClient
from server.core import InferenceCore
from server.errors import NotFound
from server.manager import LABELS_FILE
from server.metrics import ServerMetrics
from server.protocols.pb import tensorflow_core_pb2 as tfc
from server.protocols.pb import tensorflow_serving_pb2 as tfs

from .fakes import FakeLoader, StartFake, fake_digit, fake_settings, until, write_fake_version

pytestmark = pytest.mark.fast

IMAGE = fake_digit(6)
TFS_PREDICT = "/tensorflow.serving.PredictionService/Predict"


def write_labels(model_dir: Path, labels: dict[str, int] | str) -> None:
    """Replace the labels file at once (write aside, rename), as an operator should."""
    text = labels if isinstance(labels, str) else json.dumps(labels)
    aside = model_dir / f".{LABELS_FILE}.tmp"
    aside.write_text(text)
    os.replace(aside, model_dir / LABELS_FILE)


def _tfs_request(version: int | None = None, label: str = "") -> tfs.PredictRequest:
    request = tfs.PredictRequest()
    request.model_spec.name = "mnist"
    if version is not None:
        request.model_spec.version.value = version
    if label:
        request.model_spec.version_label = label
    tensor = request.inputs["images"]
    tensor.dtype = tfc.DT_UINT8
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    tensor.tensor_content = IMAGE.tobytes()
    return request


def _tfs_stub(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        TFS_PREDICT,
        request_serializer=tfs.PredictRequest.SerializeToString,
        response_deserializer=tfs.PredictResponse.FromString,
    )


async def test_labels_point_at_loaded_versions_and_stable_is_the_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for version in (1, 2, 3):
        write_fake_version(tmp_path, version)
    write_labels(tmp_path, {"stable": 2, "canary": 3, "old": 9})
    core = InferenceCore.from_settings(
        fake_settings(tmp_path, "--version-policy", "all"), ServerMetrics(), loader=FakeLoader()
    )
    core.start()
    try:
        with caplog.at_level(logging.WARNING, "server.manager"):
            assert core.manager.refresh()
        assert "label 'old' points at version 9, which is not loaded: ignored" in caplog.text
        assert core.resolve().version == 2  # stable, not the newest
        assert core.resolve(label="canary").version == 3
        assert core.resolve(label="stable", version=2).version == 2
        with pytest.raises(NotFound) as info:
            core.resolve(label="old")
        assert info.value.message == (
            "label 'old' of model 'mnist' points at no loaded version; loaded: versions 1, "
            "2, 3 (labels: canary=3, stable=2)"
        )
        # an unreadable file changes nothing; a fixed one is taken
        with caplog.at_level(logging.ERROR, "server.manager"):
            write_labels(tmp_path, "{not json")
            assert not core.manager.refresh()
        assert "labels unchanged" in caplog.text
        assert core.resolve().version == 2
        write_labels(tmp_path, {"stable": 1})
        assert core.manager.refresh()
        assert core.resolve().version == 1
        with pytest.raises(NotFound):
            core.resolve(label="canary")
        (tmp_path / LABELS_FILE).unlink()  # no labels: the newest is the default
        assert core.manager.refresh()
        assert core.resolve().version == 3
    finally:
        await core.stop()


async def test_a_call_keeps_the_version_it_was_admitted_for_across_a_relabel(
    tmp_path: Path,
) -> None:
    for version in (2, 3):
        write_fake_version(tmp_path, version)
    write_labels(tmp_path, {"stable": 2})
    loader = FakeLoader()
    core = InferenceCore.from_settings(
        fake_settings(tmp_path, "--version-policy", "all"), ServerMetrics(), loader=loader
    )
    core.start()
    try:
        core.manager.refresh()
        admitted = core.resolve()  # admitted while stable is 2
        write_labels(tmp_path, {"stable": 3})
        assert core.manager.refresh()
        answer = await core.submit(IMAGE[None], admitted, None)
        assert list(answer.versions) == [2]  # computed by the version it was admitted for
        assert list((await core.infer(IMAGE[None], None)).versions) == [3]
        assert len(loader.runtimes[2].batch_sizes) == 1 == len(loader.runtimes[3].batch_sizes)
    finally:
        await core.stop()


async def test_every_protocol_resolves_labels(start_fake: StartFake) -> None:
    fake = await start_fake(
        "--version-policy", "all", "--model-control", "on", versions=(1, 2, 3), serving=False
    )
    write_labels(fake.server.settings.model_dir, {"stable": 1, "canary": 2})
    await until(lambda: fake.server.manager.routes.labels.keys() == {"stable", "canary"})
    async with (
        AsyncDigitClient(fake.target) as client,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        assert (await client.predict(IMAGE, timeout=10)).model_version == 1
        assert (await client.predict(IMAGE, timeout=10, label="canary")).model_version == 2
        many = await client.batch_predict(np.stack([IMAGE] * 2), timeout=10, label="canary")
        assert list(many.model_versions) == [2, 2]
        info = await client.model_info(timeout=10, label="canary")
        assert (info.model_version, info.labels) == (2, {"stable": 1, "canary": 2})
        predict = _tfs_stub(channel)
        answer = await predict(_tfs_request(label="canary"), timeout=10)
        assert answer.model_spec.version.value == 2
        assert (await predict(_tfs_request(), timeout=10)).model_spec.version.value == 1
        with pytest.raises(grpc.aio.AioRpcError) as info_tf:
            await predict(_tfs_request(label="nightly"), timeout=10)
        assert info_tf.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info_tf.value.details().startswith("Unrecognized servable version label: nightly")
        with pytest.raises(grpc.aio.AioRpcError) as info_v1:
            await client.predict(IMAGE, timeout=10, label="nightly")
        assert info_v1.value.code() == grpc.StatusCode.NOT_FOUND
        assert "loaded: versions 1, 2, 3 (labels: canary=2, stable=1)" in info_v1.value.details()


@pytest.mark.parametrize("relabel", ["labels.json", "management call"])
async def test_relabel_under_load_from_every_protocol(start_fake: StartFake, relabel: str) -> None:
    """stable 2 -> 3 -> 2 (by writing the labels file, or by the SDK's ``set_labels``)
    while mnist.v1, KServe and TF Serving callers call unpinned, and pinned callers call
    versions 1 and 3: no call fails; every unpinned answer comes from a
    version the label pointed at while the call was between sent and answered (admission
    is inside that window; around a switch either version is right for a call whose window
    spans it); the server resolved exactly as many unpinned calls to each version as
    answers came back from it; pinned callers always get their version."""
    folder_labels = {"stable": 2}
    fake = await start_fake(
        "--version-policy", "all", "--model-control", "on", versions=(1, 2, 3), serving=False
    )
    folder = fake.server.settings.model_dir
    write_labels(folder, folder_labels)
    # every version loaded (the newest loads first: stable may point at 2 before 1 is there)
    await until(lambda: sorted(fake.server.manager.routes.versions) == [1, 2, 3])
    await until(lambda: fake.server.manager.current.version == 2)  # type: ignore[union-attr]

    # what the stable label may point at, by generation: a switch is a generation of both
    # (from the file's write until the server has surely read it), then one of the new
    history: list[set[int]] = [{2}]
    resolved: collections.Counter[tuple[bool, int]] = collections.Counter()
    core = fake.server.core
    resolve = core.resolve

    def counting(*args: Any, **kwargs: Any) -> Any:
        loaded = resolve(*args, **kwargs)
        pinned = any(a is not None and a != "" for a in args[1:]) or any(kwargs.values())
        resolved[(bool(pinned), loaded.version)] += 1
        return loaded

    core.resolve = counting  # type: ignore[method-assign]
    answers: dict[str, list[tuple[int, int, int]]] = collections.defaultdict(list)
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def caller(name: str, call: Callable[[], Any]) -> None:
        while not stop.is_set():
            start = len(history) - 1
            try:
                version = await call()
            except Exception as err:  # counted: the test fails on any
                failures.append(err)
                return
            answers[name].append((start, len(history) - 1, version))

    async with (
        AsyncDigitClient(fake.target) as client,
        triton.InferenceServerClient(fake.target) as kserve,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        tf_predict = _tfs_stub(channel)

        async def mnist_v1() -> int:
            return (await client.predict(IMAGE, timeout=30)).model_version

        async def mnist_v1_batch() -> int:
            many = await client.batch_predict(np.stack([IMAGE] * 3), timeout=30)
            assert len(set(many.model_versions)) == 1  # one version answers a whole call
            return int(many.model_versions[0])

        async def kserve_call() -> int:
            image = InferInput("images", [1, 28, 28], "UINT8")
            image.set_data_from_numpy(IMAGE[None])
            result = await kserve.infer("mnist", [image], client_timeout=30)
            return int(result.get_response().model_version)

        async def tf_serving() -> int:
            answer = await tf_predict(_tfs_request(), timeout=30)
            return int(answer.model_spec.version.value)

        async def pinned_1() -> int:
            return (await client.predict(IMAGE, timeout=30, version=1)).model_version

        async def pinned_3() -> int:
            answer = await tf_predict(_tfs_request(version=3), timeout=30)
            return int(answer.model_spec.version.value)

        unpinned = {
            "mnist.v1": mnist_v1,
            "mnist.v1 batch": mnist_v1_batch,
            "kserve": kserve_call,
            "tfserving": tf_serving,
        }
        pinned = {"pinned 1": pinned_1, "pinned 3": pinned_3}
        tasks = [
            asyncio.ensure_future(caller(name, call))
            for name, call in {**unpinned, **pinned}.items()
            for _ in range(3)  # three concurrent callers of each kind
        ]

        async def progress() -> None:
            """Every caller kind answers a few more calls under the current label."""
            marks = {name: len(answers[name]) for name in {**unpinned, **pinned}}
            await until(lambda: failures or all(len(answers[n]) >= marks[n] + 5 for n in marks))

        await progress()
        for old, new in ((2, 3), (3, 2)):
            history.append({old, new})
            if relabel == "labels.json":
                write_labels(folder, {"stable": new})
                await asyncio.to_thread(fake.server.manager.refresh)  # read by now, at the latest
            else:  # applied when it answers
                assert (await client.set_labels("mnist", {"stable": new})).default_version == new
            assert fake.server.manager.current.version == new  # type: ignore[union-attr]
            history.append({new})
            await progress()
        stop.set()
        await asyncio.gather(*tasks)

    assert failures == []
    for name in unpinned:
        assert answers[name], name
        for start, end, version in answers[name]:
            allowed = set().union(*history[start : end + 1])
            assert version in allowed, (name, start, end, version)
    assert {v for _, _, v in answers["pinned 1"]} == {1}
    assert {v for _, _, v in answers["pinned 3"]} == {3}
    # the server's side: unpinned calls resolved to each version == answers from it
    got = collections.Counter(v for name in unpinned for _, _, v in answers[name])
    assert {v: n for (p, v), n in resolved.items() if not p} == dict(got)
    assert set(got) == {2, 3}  # the load really ran under both labels
