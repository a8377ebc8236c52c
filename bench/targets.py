"""The servers the benchmark measures, started as separate processes on 127.0.0.1.

Each target writes a ready file (JSON with its ports, and ``serving``) that is read here;
no log line is parsed. Our server also reports, through its metrics page, the counters the
benchmark checks answers with (h2load counts HTTP 200 even for gRPC errors).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.ready_file import wait_for_ready_file

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    name: str
    command: list[str]  # without --ready-file, which start() adds
    ours: bool  # our server (has metrics and BatchPredict)
    loads: tuple[str, ...] = ()  # run only the loads whose names start so (empty: every load)
    source: Path | None = None  # another checkout whose server this runs (--baseline)


@dataclass
class Running:
    target: Target
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log: Path
    start_to_serving_s: float
    model_load_s: float | None
    worker_pids: list[int]  # with --workers: the processes that serve (CPU is theirs too)

    def pids(self) -> list[int]:
        return [self.proc.pid, *self.worker_pids]


def our_server(model_dir: Path, *extra: str) -> list[str]:
    """The command line of our server on free loopback ports."""
    return [
        sys.executable, "-m", "server", "--model-dir", str(model_dir), "--host", "127.0.0.1",
        "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0", *extra,
    ]  # fmt: skip


def targets(
    model_dir: Path, sweep: bool, with_tensorflow: bool, baseline: Path | None = None
) -> list[Target]:
    """Every target: the bare-gRPC ceilings, naive modes and our server (``sweep``: variants;
    ``baseline``: the server of another checkout too, on the same model)."""
    py = sys.executable
    out = [
        Target("echo-sync", [py, "-m", "bench.echo_server", "--flavour", "sync"], False),
        Target("echo-aio", [py, "-m", "bench.echo_server", "--flavour", "aio"], False),
        # one call per request on our default runtime: what batching alone buys
        Target("naive-litert", our_server(model_dir, "--max-batch-size", "1"), True),
        Target("batched", our_server(model_dir), True),
        Target("workers2", our_server(model_dir, "--workers", "2"), True),
        # what the server-timing trailer costs: the same server without it
        Target(
            "timing-off", our_server(model_dir, "--server-timing", "off"), True, loads=("predict-",)
        ),
        # what model-quality monitoring costs: the same server without it
        Target(
            "monitoring-off",
            our_server(model_dir, "--model-monitoring", "off"),
            True,
            loads=("predict-", "batch1024-"),
        ),
    ]
    if with_tensorflow:  # the tutorial server: one SavedModel call per request
        out.insert(2, Target(
            "naive", our_server(model_dir, "--max-batch-size", "1", "--runtime", "tensorflow"),
            True,
        ))  # fmt: skip
    if baseline is not None:
        out.append(Target("baseline", our_server(model_dir.resolve()), True,
                          loads=("predict-", "batch1024-"), source=baseline.resolve()))  # fmt: skip
    if sweep:
        out += [
            Target("batched-b32", our_server(model_dir, "--max-batch-size", "32"), True),
            Target("batched-t2ms", our_server(model_dir, "--batch-timeout-ms", "2"), True),
        ]
    return out


def start(target: Target, workdir: Path, timeout: float = 120) -> Running:
    """Start ``target`` and wait until it serves."""
    log = workdir / f"{target.name}.log"
    ready_file = workdir / f"{target.name}.ready.json"
    ready_file.unlink(missing_ok=True)
    started = time.perf_counter()
    env = None
    if target.source is not None:  # that checkout's packages before this one's
        paths = [str(target.source), str(target.source / "client")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*target.command, "--ready-file", str(ready_file)], stdout=out,
            stderr=subprocess.STDOUT, env=env, cwd=target.source,
        )  # fmt: skip
    try:
        ready = wait_for_ready_file(ready_file, proc, timeout)
    except RuntimeError as err:
        raise RuntimeError(f"{target.name} {err}:\n{log.read_text()[-2000:]}") from None
    return Running(
        target, proc, int(ready["grpc_port"]), ready.get("metrics_port"), log,
        time.perf_counter() - started, ready.get("model_load_seconds"),
        list(ready.get("workers", [])),
    )  # fmt: skip


def stop(running: Running) -> None:
    if running.proc.poll() is None:
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(30)
        except subprocess.TimeoutExpired:
            running.proc.kill()


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time of processes (all their threads), from /proc."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return total


def rss_mb(*pids: int) -> float:
    """Resident memory of processes, in MB, from /proc."""
    total = 0.0
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(status.split("VmRSS:")[1].split()[0]) / 1024
    return total


def metric_samples(port: int) -> list[Sample]:
    """Every sample on our server's metrics page, read by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape(port: int) -> dict[str, float]:
    """The few counters the benchmark needs from our server's metrics page."""
    out = {"ok": 0.0, "err": 0.0, "cancelled": 0.0, "batches": 0.0, "batched_images": 0.0,
           "busy": 0.0, "monitoring_cpu": 0.0}  # fmt: skip
    for sample in metric_samples(port):
        if sample.name == "mnist_requests_total":
            # h2load cancels the requests in flight when its time is up: not server errors
            code = sample.labels["code"]
            key = "ok" if code == "OK" else "cancelled" if code == "CANCELLED" else "err"
            out[key] += sample.value
        elif sample.name == "mnist_batch_size_images_count":
            out["batches"] = sample.value
        elif sample.name == "mnist_batch_size_images_sum":
            out["batched_images"] = sample.value
        elif sample.name in ("mnist_queue_images", "mnist_inflight_requests"):
            out["busy"] += sample.value
        elif sample.name == "mnist_monitoring_cpu_seconds_total":
            out["monitoring_cpu"] = sample.value
    return out


def settle(running: Running, timeout: float = 60.0) -> None:
    """Wait until the server has nothing queued or in flight (h2load's cancelled leftovers)."""
    if not running.metrics_port:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and scrape(running.metrics_port)["busy"]:
        time.sleep(0.2)
