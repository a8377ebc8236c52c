"""The fast tier's fakes: a runtime anyone can predict, fake version folders, a real
server in this process whose versions load on the fake runtime.

A version folder here is a small file and a ``metadata.json`` listing it, complete by the same
rules as a real version (``server.versions.read_metadata`` and ``check_complete`` run on it);
the runtime that "loads" it is :class:`FakeRuntime`, handed to the server through its version
loader. Everything else is the real server: ``server.app.ModelServer`` on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client.contract import METADATA_FILE, NUM_CLASSES
from server.app import ModelServer
from server.settings import Settings, parse_settings
from server.versions import (
    LoadedModel,
    VersionIncomplete,
    check_complete,
    file_checksums,
    read_metadata,
)

FAKE_FILE = "fake.bin"  # the "weights" of a fake version
SURE = 0.91  # the fake model's probability for its digit; the other nine share the rest


class FakeRuntime:
    """A runtime (``server.runtimes.base.Runtime``) whose answer anyone can work out: each
    image's digit is its first pixel modulo 10, with probability :data:`SURE`.

    ``gate`` holds model calls while it is clear (for a test that needs a call held); every
    call's batch size is recorded.
    """

    name = "fake"
    device = "cpu"
    source = FAKE_FILE

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[N, 10]``: :data:`SURE` on ``images[:, 0, 0] % 10``."""
        self.batch_sizes.append(len(images))
        assert self.gate.wait(30), "the test never opened the gate"
        probs = np.full((len(images), NUM_CLASSES), (1 - SURE) / (NUM_CLASSES - 1), np.float32)
        probs[np.arange(len(images)), images[:, 0, 0] % NUM_CLASSES] = SURE
        return probs


def fake_digit(digit: int) -> np.ndarray:
    """A 28x28 uint8 image the fake model reads as ``digit``."""
    image = np.zeros((28, 28), np.uint8)
    image[0, 0] = digit
    return image


def write_fake_version(model_dir: Path, version: int, architecture: str = "fake") -> Path:
    """A complete fake version folder: its file, then (last, as training does) the metadata
    that lists it with its size and SHA-256."""
    path = model_dir / str(version)
    path.mkdir(parents=True)
    (path / FAKE_FILE).write_bytes(f"fake weights of version {version}".encode())
    metadata = {"architecture": architecture, "test_accuracy": 0.5, "files": file_checksums(path)}
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    return path


class FakeLoader:
    """A version loader (``server.manager.VersionLoader``) that reads and checks a version's
    metadata and files as the real one does, then serves it with a :class:`FakeRuntime`.
    ``runtimes`` keeps each loaded version's runtime, by version (of any model: the last
    loaded), ``models`` by model folder name and version."""

    def __init__(self) -> None:
        self.runtimes: dict[int, FakeRuntime] = {}
        self.models: dict[tuple[str, int], FakeRuntime] = {}

    def __call__(
        self, model_dir: Path, version: int, runtime: str, threads: int, max_batch: int
    ) -> LoadedModel:
        path = model_dir / str(version)
        try:
            metadata = read_metadata(path)
            check_complete(path, metadata)
        except VersionIncomplete as err:
            raise VersionIncomplete(f"version {version} is incomplete: {err}") from err
        fake = self.runtimes[version] = self.models[(model_dir.name, version)] = FakeRuntime()
        return LoadedModel(version, path, fake, metadata)


def fake_settings(model_dir: Path, *args: str) -> Settings:
    """Settings of a loopback server on free ports for ``model_dir``, and ``args``."""
    return parse_settings(
        ["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
         "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--poll-seconds", "0.05", *args],
        environ={},
    )  # fmt: skip


class FakeServer:
    """A real :class:`ModelServer` in this process whose versions load on fake runtimes."""

    def __init__(self, server: ModelServer, loader: FakeLoader) -> None:
        self.server = server
        self.loader = loader

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def runtime(self, version: int = 1) -> FakeRuntime:
        return self.loader.runtimes[version]

    def count(self, name: str, **labels: str) -> float:
        """A sample of the server's own metrics registry (0 when it is not there yet)."""
        value = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


StartFake = Callable[..., Awaitable[FakeServer]]


async def until(predicate: Callable[[], Any], limit: int = 3000) -> None:
    """Await ``predicate`` holding, looking every 10 ms (``limit`` looks) without blocking the
    event loop the in-process server runs on; fails the test if it never holds."""
    for _ in range(limit):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def start_fake_server(
    model_dir: Path, *args: str, versions: tuple[int, ...] = (1,), serving: bool = True
) -> FakeServer:
    """A started :class:`FakeServer` on ``model_dir`` with fake ``versions`` written there;
    with ``serving``, once health says SERVING."""
    for version in versions:
        write_fake_version(model_dir, version)
    loader = FakeLoader()
    server = ModelServer(fake_settings(model_dir, *args), loader=loader)
    await server.start()
    if serving:
        await until(lambda: server.health.serving)
    return FakeServer(server, loader)


def write_fake_models(model_dir: Path, models: dict[str, tuple[int, ...]]) -> None:
    """Triton's repository layout: fake ``versions`` of each model under
    ``MODEL_DIR/<name>/<version>/`` (``{"mlp": (1, 2), "cnn": (1,)}``)."""
    for name, versions in models.items():
        for version in versions:
            write_fake_version(model_dir / name, version)
