"""The benchmark: our server against the bare-gRPC ceiling and a naive server, side by side.

Targets run as separate processes on 127.0.0.1 and are all up for the whole run; every repeat
cycles through every target and load (interleaved), and the figures reported are medians over
repeats, so drift on a shared machine hits all targets alike. Load comes from ``h2load``
(nghttp2's HTTP/2 load generator, written in C) in its own process, replaying one gRPC-framed
request. h2load counts HTTP 200 even for gRPC errors, so success is checked on the server's own
counters (``mnist_requests_total{code="OK"}``) for our server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client.pb import digit_classifier_pb2 as pb

PREDICT_PATH = "/mnist.v1.DigitClassifier/Predict"
BATCH_PATH = "/mnist.v1.DigitClassifier/BatchPredict"
_OUR_LISTEN = re.compile(r"on 127\.0\.0\.1:(\d+) .*metrics on 127\.0\.0\.1:(\d+)")
_ECHO_LISTEN = re.compile(r"listening on (\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# the server's default runtime on a CPU first: the BatchPredict ratio is taken against it
IN_PROCESS_RUNTIMES = ("litert", "tensorflow")


@dataclass(frozen=True)
class Target:
    name: str
    command: list[str]
    ours: bool  # our server (has metrics and BatchPredict)


@dataclass(frozen=True)
class Load:
    name: str
    path: str
    payload: str  # key into the payload files
    concurrency: int
    images_per_request: int


@dataclass
class Running:
    target: Target
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int | None
    log: Path


@dataclass
class Sample:
    target: str
    load: str
    repeat: int
    concurrency: int
    requests: int
    seconds: float
    rps: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    mean_batch: float | None
    server_cpu_cores: float
    extra: dict[str, float] = field(default_factory=dict)


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0 (uncompressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def make_payloads(folder: Path, images: np.ndarray) -> dict[str, Path]:
    """Request bodies h2load replays: one Predict image and one 1,024-image BatchPredict."""
    bodies = {
        "predict": pb.PredictRequest(image=images[0].tobytes()),
        "batch1024": pb.BatchPredictRequest(images=[im.tobytes() for im in images[:1024]]),
    }
    paths = {}
    for name, message in bodies.items():
        paths[name] = folder / f"{name}.grpc"
        paths[name].write_bytes(grpc_frame(message.SerializeToString()))
    return paths


def start(target: Target, workdir: Path, timeout: float = 120) -> Running:
    log = workdir / f"{target.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(target.command, stdout=out, stderr=subprocess.STDOUT)
    pattern = _OUR_LISTEN if target.ours else _ECHO_LISTEN
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(log.read_text(errors="replace"))
        if match:
            metrics = int(match[2]) if target.ours else None
            return Running(target, proc, int(match[1]), metrics, log)
        if proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{target.name} did not start in {timeout}s")


def stop(running: Running) -> None:
    if running.proc.poll() is None:
        running.proc.send_signal(signal.SIGTERM)
        try:
            running.proc.wait(30)
        except subprocess.TimeoutExpired:
            running.proc.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def scrape(port: int) -> dict[str, float]:
    """The few counters the benchmark needs from our server's metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {"ok": 0.0, "err": 0.0, "cancelled": 0.0, "batches": 0.0, "batched_images": 0.0,
           "busy": 0.0}  # fmt: skip
    for line in text.splitlines():
        if line.startswith("mnist_requests_total{"):
            # h2load cancels the requests in flight when its time is up: not server errors
            key = "ok" if 'code="OK"' in line else "cancelled" if "CANCELLED" in line else "err"
            out[key] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mnist_batch_size_images_count "):
            out["batches"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("mnist_batch_size_images_sum "):
            out["batched_images"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("mnist_queue_images ", "mnist_inflight_requests{")):
            out["busy"] += float(line.rsplit(" ", 1)[1])
    return out


def h2load(
    port: int, load: Load, payload: Path, seconds: float, warmup: float, workdir: Path
) -> tuple[int, float, np.ndarray]:
    """Run h2load; returns (requests done, measured seconds, latencies in ms)."""
    connections = min(load.concurrency, 8)
    streams = max(1, load.concurrency // connections)
    log = workdir / "h2load.tsv"
    log.unlink(missing_ok=True)
    cmd = [
        "h2load", "-t", "1", "-c", str(connections), "-m", str(streams),
        "-D", f"{int(seconds * 1000)}ms", "--warm-up-time", f"{int(warmup * 1000)}ms",
        "-d", str(payload), "-H", "content-type: application/grpc", "-H", "te: trailers",
        "--log-file", str(log), f"http://127.0.0.1:{port}{load.path}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + warmup + 60)
    if result.returncode != 0:
        raise RuntimeError(f"h2load failed: {result.stderr or result.stdout}")
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", result.stdout)
    finished = re.search(r"finished in ([\d.]+)(m?s)", result.stdout)
    n = int(done[1]) if done else 0
    secs = (
        float(finished[1]) / (1000 if finished and finished[2] == "ms" else 1)
        if finished
        else seconds
    )
    rows = np.loadtxt(log, dtype=np.int64, ndmin=2) if log.stat().st_size else np.zeros((0, 3))
    latencies = rows[:, 2] / 1000.0 if len(rows) else np.zeros(0)
    return n, secs, latencies


def settle(running: Running, timeout: float = 60.0) -> None:
    """Wait until the server has nothing queued or in flight (h2load's cancelled leftovers)."""
    if not running.metrics_port:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and scrape(running.metrics_port)["busy"]:
        time.sleep(0.2)


def run_one(running: Running, load: Load, payloads: dict[str, Path], seconds: float,
            warmup: float, repeat: int, workdir: Path) -> Sample:  # fmt: skip
    before = scrape(running.metrics_port) if running.metrics_port else None
    cpu0, t0 = cpu_seconds(running.proc.pid), time.perf_counter()
    n, secs, lat = h2load(running.port, load, payloads[load.payload], seconds, warmup, workdir)
    cpu = (cpu_seconds(running.proc.pid) - cpu0) / (time.perf_counter() - t0)
    settle(running)  # the next run starts on a quiet machine
    errors, mean_batch = 0, None
    if before is not None and running.metrics_port:
        after = scrape(running.metrics_port)
        errors = int(after["err"] - before["err"])
        batches = after["batches"] - before["batches"]
        if batches:
            mean_batch = (after["batched_images"] - before["batched_images"]) / batches
    pct = np.percentile(lat, [50, 90, 99]) if len(lat) else np.zeros(3)
    rps = n / secs if secs else 0.0
    return Sample(
        running.target.name, load.name, repeat, load.concurrency, n, secs, rps,
        rps * load.images_per_request, float(pct[0]), float(pct[1]), float(pct[2]),
        errors, mean_batch, cpu,
    )  # fmt: skip


def inprocess(model_dir: Path, seconds: float, runtime: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.inprocess", "--model-dir", str(model_dir),
         "--seconds", str(seconds), "--runtime", runtime],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"in-process benchmark failed: {out.stderr[-2000:]}")
    return {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def targets(model_dir: Path, sweep: bool) -> list[Target]:
    py = sys.executable
    ours = [py, "-m", "server", "--model-dir", str(model_dir), "--host", "127.0.0.1",
            "--port", "0", "--metrics-host", "127.0.0.1", "--metrics-port", "0",
            "--max-queue-images", "65536"]  # fmt: skip
    out = [
        Target("echo-sync", [py, "-m", "bench.echo_server", "--flavour", "sync"], False),
        Target("echo-aio", [py, "-m", "bench.echo_server", "--flavour", "aio"], False),
        # the tutorial server: one SavedModel call per request
        Target("naive", [*ours, "--max-batch-size", "1", "--runtime", "tensorflow"], True),
        # one call per request on our default runtime: what batching alone buys
        Target("naive-litert", [*ours, "--max-batch-size", "1"], True),
        Target("batched", ours, True),
    ]
    if sweep:
        out += [
            Target("batched-b32", [*ours, "--max-batch-size", "32"], True),
            Target("batched-t2ms", [*ours, "--batch-timeout-ms", "2"], True),
        ]
    return out


def loads(concurrencies: list[int]) -> list[Load]:
    out = [Load(f"predict-c{c}", PREDICT_PATH, "predict", c, 1) for c in concurrencies]
    out.append(Load("batch1024-c4", BATCH_PATH, "batch1024", 4, 1024))
    return out


def median_table(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per (target, load): medians over repeats."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.target, s.load), []).append(s)
    rows = []
    for (target, load), group in groups.items():

        def med(attr: str, g: list[Sample] = group) -> float:
            values = [getattr(s, attr) for s in g if getattr(s, attr) is not None]
            return float(statistics.median(values)) if values else float("nan")

        rows.append({
            "target": target, "load": load, "concurrency": group[0].concurrency,
            "repeats": len(group), "rps": med("rps"), "images_per_s": med("images_per_s"),
            "p50_ms": med("p50_ms"), "p90_ms": med("p90_ms"), "p99_ms": med("p99_ms"),
            "errors": sum(s.errors for s in group), "mean_batch": med("mean_batch"),
            "server_cpu_cores": med("server_cpu_cores"),
        })  # fmt: skip
    return rows


def run_benchmark(
    model_dir: Path,
    images: np.ndarray,
    *,
    concurrencies: list[int],
    seconds: float,
    warmup: float,
    repeats: int,
    sweep: bool,
    include_echo: bool = True,
) -> dict[str, Any]:
    """Start every target, run every load against each, interleaved, ``repeats`` times."""
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    workdir = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    payloads = make_payloads(workdir, images)
    chosen = [t for t in targets(model_dir, sweep) if include_echo or t.ours]
    running = [start(t, workdir) for t in chosen]
    samples: list[Sample] = []
    ceiling: dict[str, list[dict[str, float]]] = {runtime: [] for runtime in IN_PROCESS_RUNTIMES}
    try:
        for repeat in range(repeats):
            for r in running:
                for load in loads(concurrencies):
                    if load.path == BATCH_PATH and not r.target.ours:
                        continue
                    s = run_one(r, load, payloads, seconds, warmup, repeat, workdir)
                    samples.append(s)
                    print(f"  [{repeat + 1}/{repeats}] {s.target:13s} {s.load:14s} "
                          f"{s.rps:9.0f} req/s  p50 {s.p50_ms:7.2f} ms  p99 {s.p99_ms:7.2f} ms"
                          f"  errors {s.errors}", flush=True)  # fmt: skip
            for runtime, figures in ceiling.items():
                figures.append(inprocess(model_dir, seconds, runtime))
                print(
                    f"  [{repeat + 1}/{repeats}] in-process {runtime} images/s: "
                    + ", ".join(f"b{k}={v:,.0f}" for k, v in figures[-1].items()),
                    flush=True,
                )
    finally:
        for r in running:
            stop(r)
        shutil.rmtree(workdir, ignore_errors=True)
    in_process = {
        runtime: {k: statistics.median(c[k] for c in figures) for k in figures[0]}
        for runtime, figures in ceiling.items()
    }
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "settings": {"seconds": seconds, "warmup": warmup, "repeats": repeats,
                     "concurrencies": concurrencies, "model_dir": str(model_dir)},
        "samples": [asdict(s) for s in samples],
        "table": median_table(samples),
        "in_process_images_per_s": in_process,
    }  # fmt: skip


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The figures the issue asks for, from the median table."""
    table = {(r["target"], r["load"]): r for r in result["table"]}
    in_proc: dict[str, float] = result["in_process_images_per_s"][IN_PROCESS_RUNTIMES[0]]

    def get(target: str, load: str, key: str) -> float:
        row = table.get((target, load))
        return float(row[key]) if row else float("nan")

    top = max((c for (_, load), r in table.items() if load.startswith("predict-c")
               for c in [int(load[9:])]), default=64)  # fmt: skip
    c = 64 if ("batched", "predict-c64") in table else top
    echo_best = max(
        get("echo-sync", f"predict-c{c}", "rps"), get("echo-aio", f"predict-c{c}", "rps")
    )
    out = {
        f"batched_vs_best_echo_c{c}": get("batched", f"predict-c{c}", "rps") / echo_best,
        f"batched_vs_naive_c{c}": get("batched", f"predict-c{c}", "rps")
        / get("naive", f"predict-c{c}", "rps"),
        f"batched_vs_naive_litert_c{c}": get("batched", f"predict-c{c}", "rps")
        / get("naive-litert", f"predict-c{c}", "rps"),
        "p50_c1_batched_over_naive": get("batched", "predict-c1", "p50_ms")
        / get("naive", "predict-c1", "p50_ms"),
        "p50_c1_batched_over_naive_litert": get("batched", "predict-c1", "p50_ms")
        / get("naive-litert", "predict-c1", "p50_ms"),
        "batch1024_vs_in_process_b1024": get("batched", "batch1024-c4", "images_per_s")
        / in_proc.get("1024", float("nan")),
    }
    return out
