"""The fast tier (``./test.sh --fast``, ``pytest -m fast``): the inference core
and every protocol in-process on a fake runtime (``fakes.py``): no TensorFlow, no
subprocess, no trained model."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from .fakes import FakeServer, StartFake, start_fake_server


@pytest.fixture
async def start_fake(tmp_path: Path) -> AsyncIterator[StartFake]:
    """Starts fake servers (``await start_fake(*flags, versions=(1,), serving=True)``), each
    on a model folder of its own; opens their gates and stops them at the end of the test."""
    started: list[FakeServer] = []

    async def start(
        *args: str, versions: tuple[int, ...] = (1,), serving: bool = True
    ) -> FakeServer:
        folder = tmp_path / f"models{len(started)}"
        folder.mkdir()
        started.append(await start_fake_server(folder, *args, versions=versions, serving=serving))
        return started[-1]

    yield start
    for fake in started:
        for runtime in fake.loader.runtimes.values():
            runtime.gate.set()
        await fake.server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FakeServer]:
    """One fake server serving version 1 for a whole test module (its tests run on the
    module's event loop: ``pytestmark = pytest.mark.asyncio(loop_scope="module")``)."""
    fake = await start_fake_server(tmp_path_factory.mktemp("models"))
    yield fake
    await fake.server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The fast tier must not import TensorFlow (it is what makes the full suite slow): a
    fast run that did fails, naming the cause."""
    if session.config.option.markexpr == "fast" and "tensorflow" in sys.modules:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nFAILED: the fast tier imported TensorFlow (something on its path imports it)")
