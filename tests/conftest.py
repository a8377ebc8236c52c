"""Shared fixtures: the real MNIST files, a really trained small model, a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mnist_client import AsyncDigitClient
from server.ready_file import read_ready_file, wait_for_ready_file

if TYPE_CHECKING:  # the server's own modules stay out of the SDK-only test venv
    from server.app import ModelServer

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras picks its backend once per process: training in this process needs TensorFlow's, and
# the Keras runtime (JAX) is only tried in server processes of its own.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# The Python that runs `-m training` and `-m server`: CI points it at .venv/ (the lock) while the
# SDK's tests run from a venv of the newest versions the SDK allows (deploy/ci/sdk_newest.sh).
SERVER_PYTHON = os.environ.get("MNIST_TEST_SERVER_PYTHON") or sys.executable


FAST_TESTS = ROOT / "tests" / "fast"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """``pytest -m fast`` collects only ``tests/fast``: other test modules import TensorFlow
    (or train a model) as they are collected, which the fast tier must not."""
    if (
        config.option.markexpr == "fast"
        and collection_path.suffix == ".py"
        and collection_path.name != "conftest.py"
        and FAST_TESTS not in collection_path.parents
    ):
        return True
    return None


def _data_dir() -> Path:
    env = os.environ.get("MNIST_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder of real MNIST IDX files (``MNIST_DATA_DIR`` or ``../shared/data/mnist``)."""
    path = _data_dir()
    if (
        not (path / "t10k-images-idx3-ubyte.gz").exists()
        and not (path / "t10k-images-idx3-ubyte").exists()
    ):
        pytest.fail(f"MNIST IDX files not found in {path}; set MNIST_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 2,000 real test images and labels."""
    from training.data import load_idx_dir

    data = load_idx_dir(mnist_dir)
    return data.x_test[:2000], data.y_test[:2000]


def run_training(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m training ARGS`` as a user runs it."""
    return subprocess.run(
        [SERVER_PYTHON, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A model folder holding version 1: the tutorial MLP really trained on 6,000 images."""
    model_dir = tmp_path_factory.mktemp("models")
    result = run_training(
        "--arch", "mlp", "--data-dir", str(mnist_dir), "--model-dir", str(model_dir),
        "--limit", "6000", "--epochs", "2", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "1" / "saved_model.pb").is_file()
    return model_dir


@dataclass
class ServerProcess:
    """A ``python -m server`` child process and where it listens."""

    proc: subprocess.Popen[str]
    target: str
    metrics_url: str
    log_path: Path
    ready_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample on the metrics page; a missing sample fails the test (a
        renamed metric must not make an assertion about it pass vacuously)."""
        value = self.metric_or_none(name, **labels)
        if value is None:
            raise AssertionError(f"no sample {name}{labels} on the metrics page")
        return value

    def metric_or_none(self, name: str, **labels: str) -> float | None:
        """The value of one sample on the metrics page, or None when it is not there."""
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    def ready(self) -> dict[str, object]:
        """What the server last wrote to its ready file."""
        return read_ready_file(self.ready_path) or {}

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


IN_CI = os.environ.get("CI") == "true"


def missing(what: str, install: str) -> NoReturn:
    """A tool a test needs is not here: a failure in CI (``.ci/run`` installs it), else a
    skip that says how to install it."""
    if IN_CI:
        pytest.fail(f"{what} is not installed ({install})")
    pytest.skip(f"{what} not installed ({install})")


def need(tool: str, install: str | None = None) -> str:
    """The path of ``tool`` on PATH, or :func:`missing`."""
    return shutil.which(tool) or missing(tool, install or f"apt-get install {tool}")


PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"


def perf_analyzer() -> str:
    """Triton's perf_analyzer as ``scripts/perf_analyzer.sh`` installs it (``.ci/run`` does),
    or :func:`missing`: also when it is there but cannot start (libb64 not installed)."""
    install = "scripts/perf_analyzer.sh and apt-get install libb64-0d"
    if not PERF_ANALYZER.exists():
        missing("perf_analyzer", install)
    check = subprocess.run(
        [str(PERF_ANALYZER), "--version"], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0:
        missing(f"a working perf_analyzer ({check.stderr.strip()[-200:]})", install)
    return str(PERF_ANALYZER)


def free_ports(n: int) -> list[int]:
    """``n`` loopback ports free at the moment (bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


async def until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Await ``predicate`` holding, polling every 10 ms without blocking the event loop (an
    in-process server runs on it); fails the test after ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def start_server(
    model_dir: Path, log_path: Path, *args: str, timeout: float = 90, serving: bool = True,
    env: dict[str, str] | None = None,
) -> ServerProcess:  # fmt: skip
    """Start the real server on free loopback ports; wait until it listens (and, with
    ``serving``, until it serves), as its ready file says."""
    ready_path = log_path.with_suffix(".ready.json")
    ready_path.unlink(missing_ok=True)
    log_file = open(log_path, "w")  # noqa: SIM115 - owned by the process for its lifetime
    proc = subprocess.Popen(
        [
            SERVER_PYTHON, "-m", "server", "--model-dir", str(model_dir),
            "--host", "127.0.0.1", "--port", "0",
            "--metrics-host", "127.0.0.1", "--metrics-port", "0",
            "--poll-seconds", "0.5", "--ready-file", str(ready_path), *args,
        ],
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        ready = wait_for_ready_file(ready_path, proc, timeout, serving)
    except RuntimeError as err:
        raise RuntimeError(f"server {err}:\n{log_path.read_text()}") from None
    return ServerProcess(
        proc, f"127.0.0.1:{ready['grpc_port']}",
        f"http://127.0.0.1:{ready['metrics_port']}/metrics", log_path, ready_path,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One real server for a test module, serving the trained model, default batching."""
    srv = start_server(trained_model_dir, tmp_path_factory.mktemp("srv") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


class Traffic:
    """Steady Predict traffic from a background thread; records every outcome."""

    def __init__(
        self,
        target: str,
        images: np.ndarray,
        concurrency: int = 4,
        keep_calling: bool = False,
        **client: Any,
    ) -> None:
        self.target, self.images, self.concurrency = target, images, concurrency
        self.keep_calling = keep_calling  # on after UNAVAILABLE, as a client without an LB
        self.client = client  # more arguments for the SDK client
        self.versions: list[int] = []
        # each worker's answers in its order (a worker's next call is admitted after its last
        # answer; across workers, answers of two versions' batchers may interleave)
        self.by_worker: list[list[int]] = [[] for _ in range(concurrency)]
        self.codes: Counter[str] = Counter()
        self.details: Counter[str] = Counter()
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _worker(self, client: AsyncDigitClient, k: int) -> None:
        i = k
        while not self._stop.is_set():
            self.sent += 1
            try:
                p = await client.predict(self.images[i % len(self.images)], timeout=10)
                self.versions.append(p.model_version)
                self.by_worker[k].append(p.model_version)
                self.codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                self.codes[err.code().name] += 1
                self.details[f"{err.code().name}: {err.details()}"] += 1
                if err.code() == grpc.StatusCode.UNAVAILABLE and not self.keep_calling:
                    return  # the server is gone or going: stop like a client behind an LB
            i += self.concurrency

    async def _main(self) -> None:
        async with AsyncDigitClient(self.target, **self.client) as client:
            await asyncio.gather(*(self._worker(client, k) for k in range(self.concurrency)))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


# --- the real server in the test's process, its model behind a gate the test opens


class GatedRuntime:
    """Wraps a loaded runtime: records every call's images; holds calls while closed."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.name, self.device, self.source = inner.name, inner.device, inner.source
        self.calls: list[np.ndarray] = []
        self.entered = threading.Semaphore(0)
        self.open = threading.Event()
        self.open.set()

    def predict(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(images.copy())
        self.entered.release()
        assert self.open.wait(30), "the test never opened the gate"
        return self.inner.predict(images)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Hold the next calls; forget the calls so far."""
        self.open.clear()
        self.calls.clear()
        self.entered = threading.Semaphore(0)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.acquire, True, 30), "model was not called"

    @property
    def batch_sizes(self) -> list[int]:
        return [len(c) for c in self.calls]


async def _start(model_dir: Path, *args: str) -> tuple[ModelServer, GatedRuntime]:
    from server.app import ModelServer
    from server.settings import parse_settings

    settings = parse_settings(
        ["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "0", *args],
        environ={},
    )  # fmt: skip
    server = ModelServer(settings)
    await server.start()
    await until(lambda: server.health.serving)
    model = server.manager.current
    assert model is not None
    gate = GatedRuntime(model.runtime)
    model.runtime = gate  # type: ignore[assignment]
    return server, gate


StartGated = Callable[..., Awaitable[tuple["ModelServer", GatedRuntime]]]


@pytest.fixture
async def start_gated(trained_model_dir: Path) -> AsyncIterator[StartGated]:
    """Starts gated servers (``start_gated(*flags, model_dir=...)``); at the end of the test
    opens every gate and stops every server."""
    started: list[tuple[ModelServer, GatedRuntime]] = []

    async def start(
        *args: str, model_dir: Path = trained_model_dir
    ) -> tuple[ModelServer, GatedRuntime]:
        started.append(await _start(model_dir, *args))
        return started[-1]

    yield start
    for server, gate in started:
        gate.open.set()
        await server.stop()


@pytest.fixture
async def gated(start_gated: StartGated) -> tuple[ModelServer, GatedRuntime]:
    return await start_gated()


def prometheus_query(port: int, expr: str) -> list[dict[str, Any]]:
    """The result of one instant query to the Prometheus on ``port``."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]  # type: ignore[no-any-return]


@contextlib.contextmanager
def run_prometheus(folder: Path, server: ServerProcess, rules: Path | None = None) -> Iterator[int]:
    """Debian's Prometheus scraping ``server`` (job ``mnist-server``) and evaluating
    ``rules`` every second; yields its port once it has scraped the server."""
    binary = need("prometheus")
    target = server.metrics_url.split("//")[1].split("/")[0]
    rule_files = f"rule_files: ['{rules}']\n" if rules else ""
    (folder / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n" + rule_files
        + "scrape_configs:\n  - job_name: mnist-server\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )  # fmt: skip
    (port,) = free_ports(1)
    with open(folder / "prometheus.log", "w") as log:
        proc = subprocess.Popen(
            [binary, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not _scraped(port):
                if time.monotonic() > deadline:
                    pytest.fail(
                        "Prometheus never scraped the server:\n"
                        + (folder / "prometheus.log").read_text()
                    )
                time.sleep(0.5)
            yield port
        finally:
            proc.terminate()
            proc.wait(30)


def _scraped(port: int) -> bool:
    try:
        return bool(prometheus_query(port, 'up{job="mnist-server"} == 1'))
    except OSError:  # not listening yet
        return False
