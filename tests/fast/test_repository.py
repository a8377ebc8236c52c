"""The model repository in the core: several versions loaded at once, each with its own
batcher; the version policy; unloading after the calls in flight; the default."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from server.core import InferenceCore
from server.errors import NotFound
from server.metrics import ServerMetrics
from server.monitoring import ModelMonitoring
from server.settings import parse_settings
from server.versions import LoadedModel, VersionPolicy

from .fakes import FakeLoader, fake_digit, fake_settings, until, write_fake_version

pytestmark = pytest.mark.fast

MakeCore = Callable[..., InferenceCore]


class RecordingLoader(FakeLoader):
    """A fake loader that records, at each load, which versions were reachable then."""

    def __init__(self, core: list[InferenceCore]) -> None:
        super().__init__()
        self.core = core
        self.reachable_at_load: dict[int, set[int]] = {}

    def __call__(
        self, model_dir: Path, version: int, runtime: str, threads: int, max_batch: int
    ) -> LoadedModel:
        if self.core:
            self.reachable_at_load[version] = set(self.core[0].manager.routes.versions)
        return super().__call__(model_dir, version, runtime, threads, max_batch)


@pytest.fixture
async def make_core(tmp_path: Path) -> AsyncIterator[MakeCore]:
    """Makes started cores on ``tmp_path`` (``make_core(*flags)``); stops them at the end."""
    made: list[InferenceCore] = []

    def make(*args: str, monitoring: ModelMonitoring | None = None) -> InferenceCore:
        holder: list[InferenceCore] = []
        loader = RecordingLoader(holder)
        core = InferenceCore.from_settings(
            fake_settings(tmp_path, *args), ServerMetrics(), loader=loader, monitoring=monitoring
        )
        holder.append(core)
        core.start()
        made.append(core)
        return core

    yield make
    for core in made:
        for runtime in _loader(core).runtimes.values():
            runtime.gate.set()
        await core.stop()


def _loader(core: InferenceCore) -> RecordingLoader:
    loader = core.manager._load
    assert isinstance(loader, RecordingLoader)
    return loader


def _images(*digits: int) -> np.ndarray:
    return np.stack([fake_digit(d) for d in digits])


@pytest.mark.parametrize(
    ("text", "on_disk", "loaded"),
    [
        ("latest:1", [1, 2, 3], [3]),
        ("latest:2", [1, 2, 3], [2, 3]),
        ("latest", [1, 2, 3], [3]),
        ("all", [1, 2, 3], [1, 2, 3]),
        ("specific:1,3", [1, 2, 3], [1, 3]),
        ("specific:5", [1, 2, 3], []),
    ],
)
def test_a_version_policy_chooses_like_tf_serving(
    text: str, on_disk: list[int], loaded: list[int]
) -> None:
    policy = VersionPolicy.parse(text)
    assert policy.choose(on_disk) == loaded
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["latest:0", "newest", "specific:", "specific:a", "all:2"])
def test_a_wrong_version_policy_is_refused_at_start(
    text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--model-dir", "m", "--version-policy", text], environ={})
    assert "--version-policy" in capsys.readouterr().err


def test_model_version_is_the_policy_specific_that_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(
            ["--model-dir", "m", "--model-version", "2", "--version-policy", "all"], environ={}
        )
    assert "give one of them" in capsys.readouterr().err


async def test_latest_2_loads_the_two_newest_and_a_new_one_replaces_the_oldest_once_verified(
    make_core: MakeCore, tmp_path: Path
) -> None:
    for version in (1, 2, 3):
        write_fake_version(tmp_path, version)
    monitoring = ModelMonitoring(window_seconds=60)
    core = make_core("--version-policy", "latest:2", monitoring=monitoring)
    assert core.manager.refresh()
    assert sorted(core.manager.routes.versions) == [2, 3]
    assert 1 not in _loader(core).runtimes  # never loaded
    assert core.resolve().version == 3  # the default: the newest
    assert monitoring.unmonitored == {
        ("mnist", "2"),
        ("mnist", "3"),
    }  # a monitor (here: no profile) per version
    answers = await asyncio.gather(
        core.infer(_images(2), None, version=2), core.infer(_images(3), None, version="3")
    )
    assert [list(a.versions) for a in answers] == [[2], [3]]
    assert _loader(core).runtimes[2].batch_sizes == [1] == _loader(core).runtimes[3].batch_sizes

    write_fake_version(tmp_path, 4)
    assert core.manager.refresh()
    # 4 was loaded and checked while 2 still served; only then did 2 leave
    assert _loader(core).reachable_at_load[4] == {2, 3}
    assert sorted(core.manager.routes.versions) == [3, 4]
    await until(lambda: core.manager.unloaded == [2])
    assert monitoring.unmonitored == {("mnist", "3"), ("mnist", "4")}
    assert core.resolve().version == 4
    with pytest.raises(NotFound) as info:
        core.resolve(version=2)
    assert info.value.message == (
        "version '2' of model 'mnist' is not loaded; loaded: versions 3, 4"
    )
    assert not core.manager.refresh()  # nothing changed


async def test_batches_never_mix_versions(make_core: MakeCore, tmp_path: Path) -> None:
    for version in (1, 2):
        write_fake_version(tmp_path, version)
    core = make_core("--version-policy", "all")
    core.manager.refresh()
    runtimes = _loader(core).runtimes
    for runtime in runtimes.values():
        runtime.gate.clear()
    # one call each holds each version's model; the others queue behind it, per version
    held = [asyncio.ensure_future(core.infer(_images(v), None, version=v)) for v in (1, 2)]
    await until(lambda: all(len(r.batch_sizes) == 1 for r in runtimes.values()))
    queued = [
        asyncio.ensure_future(core.infer(_images(v, v), None, version=v)) for v in (1, 2, 1, 2, 1)
    ]
    await until(lambda: core.queued_images == 10)
    for runtime in runtimes.values():
        runtime.gate.set()
    answers = await asyncio.gather(*held, *queued)
    assert [set(a.versions) for a in answers] == [{1}, {2}, {1}, {2}, {1}, {2}, {1}]
    assert [list(a.probabilities.argmax(axis=1)) for a in answers[2:]] == [
        [1, 1], [2, 2], [1, 1], [2, 2], [1, 1]
    ]  # fmt: skip
    # each version's queue became one batch of its own: 3 calls of 2 images, and 2 of 2
    assert runtimes[1].batch_sizes == [1, 6] and runtimes[2].batch_sizes == [1, 4]


async def test_an_unloaded_version_finishes_its_admitted_calls_and_refuses_new_ones(
    make_core: MakeCore, tmp_path: Path
) -> None:
    write_fake_version(tmp_path, 1)
    core = make_core()  # latest:1
    core.manager.refresh()
    one = _loader(core).runtimes[1]
    one.gate.clear()
    admitted = [asyncio.ensure_future(core.infer(_images(0), None))]
    await until(lambda: len(one.batch_sizes) == 1)  # held in the model; the rest queue
    admitted += [asyncio.ensure_future(core.infer(_images(d), None)) for d in range(1, 5)]
    await until(lambda: core.queued_images == 4)
    late = core.resolve(version=1)  # resolved before the unload, reaches the batcher after
    write_fake_version(tmp_path, 2)
    assert await asyncio.to_thread(core.manager.refresh)
    assert sorted(core.manager.routes.versions) == [2]
    assert core.manager.unloaded == []  # 1 waits for its calls in flight
    with pytest.raises(NotFound) as info:
        core.resolve(version=1)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message.endswith("is not loaded; loaded: version 2")
    assert list((await core.infer(_images(7), None)).versions) == [2]  # new calls: version 2
    one.gate.set()
    answers = await asyncio.gather(*admitted)
    assert [list(a.versions) for a in answers] == [[1]] * 5  # every admitted call finished
    await until(lambda: core.manager.unloaded == [1])
    with pytest.raises(NotFound) as late_info:
        await core.submit(_images(1), late, None)
    assert late_info.value.message == "version 1 of model 'mnist' is not loaded; loaded: version 2"
