"""A fleet of replicas: three real servers behind the real HAProxy (deploy/haproxy), and the
SDK's own round_robin balancing; rolling restarts under load lose no call."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import (
    ROOT,
    ServerProcess,
    Traffic,
    free_ports,
    need,
    start_server,
    wait_for,
)

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


class Fleet:
    """Three replicas on fixed ports, so that a restarted one comes back where it was."""

    def __init__(self, model_dir: Path, folder: Path) -> None:
        self.model_dir, self.folder = model_dir, folder
        ports = free_ports(6)
        self.grpc_ports, self.metrics_ports = ports[:3], ports[3:]
        self.replicas: list[ServerProcess] = [self._start(i) for i in range(3)]
        self.answered: list[Counter[str]] = [Counter() for _ in range(3)]

    def _start(self, i: int) -> ServerProcess:
        return start_server(
            self.model_dir, self.folder / f"replica{i}-{time.monotonic_ns()}.log",
            "--port", str(self.grpc_ports[i]), "--metrics-port", str(self.metrics_ports[i]),
            "--pre-stop-seconds", "1", "--grace-seconds", "10",
        )  # fmt: skip

    def stop(self, i: int) -> None:
        """SIGTERM, wait for the drain, keep what the replica answered."""
        replica = self.replicas[i]
        assert replica.stop() == 0, replica.log()[-2000:]
        self.answered[i].update(replica.ready()["answered"])  # type: ignore[arg-type]

    def restart(self, i: int) -> None:
        self.stop(i)
        self.replicas[i] = self._start(i)

    def answered_now(self, i: int) -> float:
        """OK Predicts replica ``i`` has answered since it (re)started; its counter's sample
        appears with its first OK call."""
        ok = self.replicas[i].metric_or_none("mnist_requests_total", method="Predict", code="OK")
        return ok or 0

    def stop_all(self) -> None:
        for i, replica in enumerate(self.replicas):
            if replica.proc.poll() is None:
                self.stop(i)

    def shares(self) -> list[float]:
        ok = [c["OK"] for c in self.answered]
        return [n / sum(ok) for n in ok]


@pytest.fixture
def fleet(trained_model_dir: Path, tmp_path: Path) -> Fleet:
    fleet = Fleet(trained_model_dir, tmp_path)
    yield fleet  # type: ignore[misc]
    fleet.stop_all()


def _haproxy(fleet: Fleet, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = need("haproxy")
    (port,) = free_ports(1)
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{port}"}
    for i in range(3):
        env[f"REPLICA{i + 1}"] = f"127.0.0.1:{fleet.grpc_ports[i]}"
        env[f"REPLICA{i + 1}_CHECK_PORT"] = str(fleet.metrics_ports[i])
    log = open(folder / "haproxy.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(1)  # a few health checks: every replica is up
            return proc, f"127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None, (folder / "haproxy.log").read_text()
            time.sleep(0.1)
    raise AssertionError("haproxy did not listen")


def _rolling_restart(fleet: Fleet) -> None:
    for i in range(3):
        fleet.restart(i)
        # the balancer sees it SERVING again and sends it its share
        assert wait_for(lambda i=i: fleet.answered_now(i) >= 100), f"replica {i} got no calls"


def test_rolling_restart_behind_haproxy_loses_no_call(
    fleet: Fleet, tmp_path: Path, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    proxy, target = _haproxy(fleet, tmp_path)
    try:
        with Traffic(target, mnist_test[0][:200], concurrency=8) as traffic:
            assert wait_for(lambda: traffic.codes["OK"] > 200)
            _rolling_restart(fleet)
            assert wait_for(lambda: traffic.codes["OK"] > 1000)
        fleet.stop_all()
    finally:
        proxy.terminate()
        proxy.wait(10)
    print(f"\ncalls: {dict(traffic.codes)}, shares per replica: {fleet.shares()}")
    assert set(traffic.codes) == {"OK"}, traffic.details
    assert traffic.codes["OK"] > 1000
    assert all(0.2 <= share <= 0.5 for share in fleet.shares()), fleet.shares()
    assert sum(c["OK"] for c in fleet.answered) == traffic.codes["OK"]


def test_sdk_round_robin_spreads_calls_and_survives_a_replica_going_away(
    fleet: Fleet, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in fleet.grpc_ports)
    # reconnect to a restarted replica within a second, not gRPC's default 1 s, 1.6 s, ...
    fast_reconnect = [("grpc.initial_reconnect_backoff_ms", 100),
                      ("grpc.max_reconnect_backoff_ms", 500)]  # fmt: skip
    with Traffic(target, mnist_test[0][:200], concurrency=8, load_balancing="round_robin",
                 options=fast_reconnect) as t:  # fmt: skip
        time.sleep(2)
        fleet.restart(1)  # drains and comes back: the channel skips it meanwhile
        assert wait_for(lambda: fleet.answered_now(1) >= 100), "the restarted one got no calls"
        fleet.stop(2)  # and one that goes away for good
        time.sleep(2)
    fleet.stop_all()
    print(f"\ncalls: {dict(t.codes)}, shares per replica: {fleet.shares()}")
    assert set(t.codes) == {"OK"}, t.details
    assert all(share >= 0.15 for share in fleet.shares()), fleet.shares()
    assert sum(c["OK"] for c in fleet.answered) == t.codes["OK"]
