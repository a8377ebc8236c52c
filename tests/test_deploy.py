"""Deployment files: every dashboard query returns data from a real Prometheus scraping a real
server under load; alert rules and the compose file are valid."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mnist_client import DigitClient
from mnist_client.pb import digit_classifier_pb2 as pb
from tests.conftest import ROOT, ServerProcess, need, prometheus_query, run_prometheus

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mnist.json"


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Debian's Prometheus scraping the test server every second."""
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), server) as port:
        yield port


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_covers_what_operatorsneed() -> None:
    exprs = " ".join(e for _, e in _dashboard_queries())
    for metric in (
        "mnist_requests_total", "mnist_rpc_duration_seconds_bucket", "mnist_batch_queue_seconds",
        "mnist_model_compute_seconds", "mnist_batch_size_images_bucket", "mnist_queue_images",
        "mnist_model_version", "mnist_inflight_requests", "mnist_predictions_total",
        "mnist_reference_digit_share", "mnist_prediction_confidence_bucket", "mnist_drift_psi",
        "mnist_drift_score", "mnist_low_confidence_share", "mnist_reference_low_confidence_share",
        "mnist_version_requests_total", "mnist_monitoring_cpu_seconds_total",
        "process_cpu_seconds_total",
    ):  # fmt: skip
        assert metric in exprs, metric
    titles = [title for title, _ in _dashboard_queries()]
    assert any("queue and compute p99" in t for t in titles)
    assert any("waited more than 1 ms" in t for t in titles)
    assert any("RESOURCE_EXHAUSTED" in t and "DEADLINE_EXCEEDED" in t for t in titles)
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, method) (rate(mnist_rpc_duration" in exprs


def test_every_dashboard_query_returns_data(
    server: ServerProcess, prometheus: int, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    x = mnist_test[0]
    stop = threading.Event()

    def load() -> None:
        with DigitClient(server.target) as client:
            i = 0
            while not stop.is_set():
                client.predict(x[i % len(x)])
                client.batch_predict(x[i % 500 : i % 500 + 64])
                client.model_info()
                if i % 10 == 0:  # some rejected calls, so the error panels have data
                    with contextlib.suppress(grpc.RpcError):
                        client._stub.Predict(pb.PredictRequest(image=b"short"))
                i += 1
                time.sleep(0.01)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        time.sleep(6)  # several scrapes under load
        empty = []
        for title, expr in _dashboard_queries():
            result = prometheus_query(prometheus, expr.replace("$__rate_interval", "30s"))
            if not result:
                empty.append(f"{title}: {expr}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
    finally:
        stop.set()
        thread.join(10)


def test_alert_rules_are_valid() -> None:
    promtool = need("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 rules found" in result.stdout


def test_fleet_files_are_valid() -> None:
    compose = need("docker-compose")
    fleet = str(ROOT / "docker-compose.fleet.yml")
    services = subprocess.run(
        [compose, "-f", fleet, "config", "--services"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert services.returncode == 0, services.stderr
    assert sorted(services.stdout.split()) == [
        "grafana", "lb", "prometheus", "server1", "server2", "server3", "trainer",
    ]  # fmt: skip
    haproxy = need("haproxy")
    env = {**os.environ, "LB_BIND": ":8500"}
    for i in (1, 2, 3):
        env[f"REPLICA{i}"], env[f"REPLICA{i}_CHECK_PORT"] = f"server{i}:8500", "9100"
    check = subprocess.run(
        [haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    # (the names resolve inside the compose network only: resolved again at run time)
    assert check.returncode == 0 and "Configuration file is valid" in check.stdout, check.stderr


def test_compose_file_is_valid() -> None:
    compose = need("docker-compose")
    result = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = subprocess.run(
        [compose, "-f", str(ROOT / "docker-compose.yml"), "config", "--services"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    ).stdout.split()  # fmt: skip
    assert sorted(services) == ["grafana", "prometheus", "server", "trainer"]
