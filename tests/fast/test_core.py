"""The inference core alone, without gRPC: lookup, its refusals, readiness, deadlines."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_client.contract import METADATA_FILE
from server.core import InferenceCore, UnknownLabel
from server.errors import DeadlineExceeded, NotFound, Unavailable
from server.metrics import ServerMetrics

from .fakes import SURE, FakeLoader, fake_digit, fake_settings, write_fake_version

pytestmark = pytest.mark.fast

STUCK_S = 10.0


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[tuple[InferenceCore, FakeLoader]]:
    """A core on an empty model folder (nothing loaded yet), its batcher running."""
    loader = FakeLoader()
    core = InferenceCore.from_settings(fake_settings(tmp_path), ServerMetrics(), loader=loader)
    core.start()
    yield core, loader
    await core.stop()


async def test_nothing_loaded_is_unavailable_saying_why(
    core: tuple[InferenceCore, FakeLoader],
) -> None:
    c, _ = core
    assert not c.ready(STUCK_S)
    assert not c.model_ready()
    with pytest.raises(Unavailable) as info:
        await c.infer(np.zeros((1, 28, 28), np.uint8), None)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "holds no version yet" in info.value.message
    # a pinned version is no different while nothing is loaded: retry elsewhere
    with pytest.raises(Unavailable):
        c.resolve("mnist", 1)


async def test_answers_with_probabilities_version_and_timing(
    core: tuple[InferenceCore, FakeLoader], tmp_path: Path
) -> None:
    c, loader = core
    write_fake_version(tmp_path, 1)
    assert c.manager.refresh()
    assert c.ready(STUCK_S)
    images = np.stack([fake_digit(d) for d in (3, 1, 4, 1, 5)])
    answer = await c.infer(images, None)
    assert answer.probabilities.shape == (5, 10)
    assert list(answer.probabilities.argmax(axis=1)) == [3, 1, 4, 1, 5]
    assert np.allclose(answer.probabilities.max(axis=1), SURE)
    assert list(answer.versions) == [1] * 5
    assert answer.batch_size == 5
    assert answer.queue_s >= 0 and answer.compute_s >= 0
    assert loader.runtimes[1].batch_sizes == [5]
    # every way of naming the served version finds it
    for pin in ({}, {"model": "mnist"}, {"version": 1}, {"version": "1"}):
        assert c.resolve(**pin).version == 1  # type: ignore[arg-type]
        assert c.model_ready(**pin)  # type: ignore[arg-type]


async def test_unknown_model_version_and_label_are_not_found_naming_what_is_served(
    core: tuple[InferenceCore, FakeLoader], tmp_path: Path
) -> None:
    c, loader = core
    write_fake_version(tmp_path, 1)
    c.manager.refresh()
    with pytest.raises(NotFound) as info:
        await c.infer(np.zeros((1, 28, 28), np.uint8), None, model="other")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "model 'other' is not served here; this server serves 'mnist'"
    with pytest.raises(NotFound) as info:
        await c.infer(np.zeros((1, 28, 28), np.uint8), None, model="mnist", version=2)
    assert info.value.message == "version '2' of model 'mnist' is not loaded; loaded: version 1"
    with pytest.raises(UnknownLabel) as label:
        c.resolve(label="stable")
    assert label.value.code == grpc.StatusCode.NOT_FOUND
    assert "'stable'" in label.value.message
    assert not c.model_ready("mnist", "2")
    assert loader.runtimes[1].batch_sizes == []  # a refused call costs no model time


async def test_a_call_past_its_deadline_costs_no_model_time(
    core: tuple[InferenceCore, FakeLoader], tmp_path: Path
) -> None:
    c, loader = core
    write_fake_version(tmp_path, 1)
    c.manager.refresh()
    with pytest.raises(DeadlineExceeded):
        await c.infer(np.zeros((2, 28, 28), np.uint8), time.monotonic() - 1.0)
    assert loader.runtimes[1].batch_sizes == []
    answer = await c.infer(np.zeros((2, 28, 28), np.uint8), time.monotonic() + 60.0)
    assert list(answer.versions) == [1, 1]


async def test_an_incomplete_version_is_not_loaded_and_the_reason_says_so(
    core: tuple[InferenceCore, FakeLoader], tmp_path: Path
) -> None:
    c, _ = core
    path = write_fake_version(tmp_path, 1)
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata["files"]["later.bin"] = {"sha256": "0" * 64, "bytes": 10}  # still being copied
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    assert not c.manager.refresh()
    with pytest.raises(Unavailable) as info:
        c.resolve()
    assert "version 1 is incomplete" in info.value.message
    write_fake_version(tmp_path, 2)  # a newer complete version serves
    assert c.manager.refresh()
    assert c.resolve().version == 2


async def test_a_newer_version_serves_the_next_call(
    core: tuple[InferenceCore, FakeLoader], tmp_path: Path
) -> None:
    c, _ = core
    write_fake_version(tmp_path, 1)
    c.manager.refresh()
    assert list((await c.infer(np.zeros((1, 28, 28), np.uint8), None)).versions) == [1]
    write_fake_version(tmp_path, 2)
    assert c.manager.refresh()
    assert list((await c.infer(np.zeros((1, 28, 28), np.uint8), None)).versions) == [2]
    with pytest.raises(NotFound) as info:
        c.resolve(version=1)
    assert info.value.message.endswith("loaded: version 2")
