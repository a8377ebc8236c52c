"""Several server processes on one port (--workers): the kernel spreads connections, metrics
add up on the supervisor's port, a dead worker comes back, SIGTERM drains them all."""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from mnist_client import DigitClient
from tests.conftest import ServerProcess, start_server, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@pytest.fixture(scope="module")
def workers(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    srv = start_server(
        trained_model_dir, tmp_path_factory.mktemp("workers") / "server.log", "--workers", "2"
    )
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def _connections(target: str, n: int) -> list[DigitClient]:
    # one TCP connection each (gRPC would otherwise share one between channels to a target)
    return [DigitClient(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


def test_calls_reach_both_workers_and_their_counters_add_up(
    workers: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test
    pids: list[int] = workers.ready()["workers"]  # type: ignore[assignment]
    assert len(pids) == 2 and workers.ready()["serving"] is True
    before_ok = workers.metric_or_none("mnist_requests_total", method="Predict", code="OK") or 0
    cpu_before = [_cpu_seconds(pid) for pid in pids]
    clients = _connections(workers.target, 32)  # 32 connections: both workers get some

    def send(client: DigitClient) -> int:
        for i in range(60):
            client.predict(x[i])
        return 60

    with ThreadPoolExecutor(8) as pool:
        sent = sum(pool.map(send, clients))
    for client in clients:
        client.close()
    used = [_cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    assert min(used) > 0.2 * sum(used), f"CPU seconds per worker: {used}"
    summed = workers.metric("mnist_requests_total", method="Predict", code="OK") - before_ok
    assert summed == sent  # every call counted once, on the supervisor's port


def _health_on_a_new_connection(target: str) -> str:
    """Health over a new connection, as a balancer's probe. A connection the kernel had queued
    for the killed worker's listening socket is reset with it (UNAVAILABLE): the probe, like
    any gRPC client, connects again, and lands on a listening worker."""
    for _ in range(3):
        with _connections(target, 1)[0] as client:
            try:
                return client.health()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise
    return "UNAVAILABLE three times"


def test_a_dead_worker_is_restarted_and_the_replica_stays_serving(
    workers: ServerProcess, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = mnist_test
    ready_url = workers.metrics_url.replace("/metrics", "/readyz")
    pids: list[int] = workers.ready()["workers"]  # type: ignore[assignment]
    os.kill(pids[0], signal.SIGKILL)
    probes: list[tuple[int, str]] = []

    def restarted() -> bool:
        # while worker 0 is dead and reloading, the replica answers as its live worker does:
        # /readyz 200, and health SERVING on a new connection (which reaches a worker that
        # listens: only a loaded one does)
        with urllib.request.urlopen(ready_url, timeout=5) as resp:
            status = int(resp.status)
        probes.append((status, _health_on_a_new_connection(workers.target)))
        return workers.ready()["workers"] not in (pids, [pids[1]])

    assert wait_for(restarted, timeout=60)
    assert len(probes) >= 3 and set(probes) == {(200, "SERVING")}, probes
    new = workers.ready()["workers"]
    assert pids[0] not in new and pids[1] in new  # type: ignore[operator]
    assert wait_for(lambda: workers.ready()["serving"] is True, timeout=60)
    with DigitClient(workers.target) as client:  # retries UNAVAILABLE (a broken connection)
        assert client.batch_predict(x[:10]).digits.shape == (10,)
        assert client.health() == "SERVING"
    assert "worker 0 (pid" in workers.log() and "died" in workers.log()


def test_sigterm_drains_every_worker(
    trained_model_dir: Path, tmp_path: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    srv = start_server(trained_model_dir, tmp_path / "server.log", "--workers", "2")
    pids: list[int] = srv.ready()["workers"]  # type: ignore[assignment]
    with DigitClient(srv.target) as client:
        assert len(client.batch_predict(mnist_test[0][:50])) == 50
    assert srv.stop(timeout=60) == 0
    assert srv.ready()["stopped"] is True
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the supervisor"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "cannot start"),
        (["--metrics-token-file", "empty-token"], "token file is empty"),
    ],
)
def test_settings_that_cannot_work_stop_the_supervisor_instead_of_restarting_forever(
    trained_model_dir: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    import subprocess
    import sys

    (tmp_path / "empty-token").write_text("\n")
    proc = subprocess.run(
        [sys.executable, "-m", "server", "--model-dir", str(trained_model_dir), "--workers", "2",
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
