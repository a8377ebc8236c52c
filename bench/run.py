"""The benchmark run: every target under every load, interleaved, repeated; medians; ratios.

Targets run as separate processes on 127.0.0.1 and are all up for the whole run; every repeat
cycles through every target and load, and the figures reported are medians over repeats, so
drift on a shared machine hits all targets alike.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.h2load import SERVICE, STREAM_MESSAGES, Load, h2load, make_payloads
from bench.targets import (
    Running,
    cpu_seconds,
    rss_mb,
    scrape,
    settle,
    start,
    stop,
    targets,
)

# the server's default runtime on a CPU first: the BatchPredict ratio is taken against it
IN_PROCESS_RUNTIMES = ("litert", "tensorflow")


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
    cpu_us_per_request: float
    # the share of the server's CPU that model monitoring's counting thread took
    monitoring_cpu_share: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def run_one(running: Running, load: Load, payloads: dict[str, Path], seconds: float,
            warmup: float, repeat: int, workdir: Path) -> Sample:  # fmt: skip
    """One h2load run against one target, with the server's CPU and counters around it."""
    before = scrape(running.metrics_port) if running.metrics_port else None
    cpu0, t0 = cpu_seconds(*running.pids()), time.perf_counter()
    n, secs, lat = h2load(running.port, load, payloads[load.payload], seconds, warmup, workdir)
    cpu_s = cpu_seconds(*running.pids()) - cpu0
    cpu = cpu_s / (time.perf_counter() - t0)
    settle(running)  # the next run starts on a quiet machine
    errors, mean_batch, monitoring_share = 0, None, None
    if before is not None and running.metrics_port:
        after = scrape(running.metrics_port)  # (its scrape counts what monitoring still holds)
        errors = int(after["err"] - before["err"])
        batches = after["batches"] - before["batches"]
        if batches:
            mean_batch = (after["batched_images"] - before["batched_images"]) / batches
        if after["monitoring_cpu"] and cpu_s > 0:
            monitoring_share = (after["monitoring_cpu"] - before["monitoring_cpu"]) / cpu_s
    pct = np.percentile(lat, [50, 90, 99]) if len(lat) else np.zeros(3)
    rps = n / secs if secs else 0.0
    return Sample(
        running.target.name, load.name, repeat, load.concurrency, n, secs, rps,
        rps * load.images_per_request, float(pct[0]), float(pct[1]), float(pct[2]),
        errors, mean_batch, cpu, cpu / rps * 1e6 if rps else float("nan"), monitoring_share,
    )  # fmt: skip


def inprocess(model_dir: Path, seconds: float, runtime: str) -> dict[str, float]:
    """images/s of the model called directly, in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.inprocess", "--model-dir", str(model_dir),
         "--seconds", str(seconds), "--runtime", runtime],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"in-process benchmark failed: {out.stderr[-2000:]}")
    return {k: float(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def loads(concurrencies: list[int]) -> list[Load]:
    out = [Load(f"predict-c{c}", f"{SERVICE}/Predict", "predict", c, 1) for c in concurrencies]
    out.append(Load("batch1024-c4", f"{SERVICE}/BatchPredict", "batch1024", 4, 1024))
    out.append(Load(f"stream{STREAM_MESSAGES}-c16", f"{SERVICE}/PredictStream",
                    f"stream{STREAM_MESSAGES}", 16, STREAM_MESSAGES))  # fmt: skip
    # the same one-image prediction through the other protocols: what translation costs
    top = 64 if 64 in concurrencies else max(concurrencies)
    out.append(Load(f"kserve-c{top}", "/inference.GRPCInferenceService/ModelInfer", "kserve",
                    top, 1, only=("batched",)))  # fmt: skip
    out.append(Load(f"tfserving-c{top}", "/tensorflow.serving.PredictionService/Predict",
                    "tfserving", top, 1, only=("batched",)))  # fmt: skip
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
            "cpu_us_per_request": med("cpu_us_per_request"),
            "monitoring_cpu_share": med("monitoring_cpu_share"),
        })  # fmt: skip
    return rows


def _tensorflow_installed() -> bool:
    from server.runtimes import tensorflow

    return tensorflow.available()


def run_benchmark(
    model_dir: Path,
    images: np.ndarray,
    *,
    concurrencies: list[int],
    seconds: float,
    warmup: float,
    repeats: int,
    sweep: bool,
    only: frozenset[str] = frozenset(),
    only_loads: frozenset[str] = frozenset(),
    baseline: Path | None = None,
) -> dict[str, Any]:
    """Start every target (``only``: these), run every load (``only_loads``: these, and no
    in-process timing) against each, interleaved, ``repeats`` times."""
    if shutil.which("h2load") is None:
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    with_tf = _tensorflow_installed()
    workdir = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    payloads = make_payloads(workdir, images)
    chosen = [t for t in targets(model_dir, sweep, with_tf, baseline) if not only or t.name in only]
    running = [start(t, workdir) for t in chosen]
    samples: list[Sample] = []
    runtimes = [r for r in IN_PROCESS_RUNTIMES if r != "tensorflow" or with_tf]
    if only_loads:
        runtimes = []
    ceiling: dict[str, list[dict[str, float]]] = {runtime: [] for runtime in runtimes}
    servers: dict[str, dict[str, float | None]] = {}
    try:
        for repeat in range(repeats):
            # each repeat starts at another target: none always runs first (a warmer or
            # quieter machine) or last
            shift = repeat % len(running) if running else 0
            for r in running[shift:] + running[:shift]:
                for load in loads(concurrencies):
                    if load.path != f"{SERVICE}/Predict" and not r.target.ours:
                        continue  # the echo servers answer mnist.v1 Predict only
                    if load.only and r.target.name not in load.only:
                        continue
                    if only_loads and load.name not in only_loads:
                        continue
                    if r.target.loads and not load.name.startswith(r.target.loads):
                        continue
                    s = run_one(r, load, payloads, seconds, warmup, repeat, workdir)
                    samples.append(s)
                    print(f"  [{repeat + 1}/{repeats}] {s.target:13s} {s.load:14s} "
                          f"{s.rps:9.0f} req/s  p50 {s.p50_ms:7.2f} ms  p99 {s.p99_ms:7.2f} ms"
                          f"  cpu {s.cpu_us_per_request:6.0f} us/req  errors {s.errors}",
                          flush=True)  # fmt: skip
            for runtime, figures in ceiling.items():
                figures.append(inprocess(model_dir, seconds, runtime))
                print(
                    f"  [{repeat + 1}/{repeats}] in-process {runtime} images/s: "
                    + ", ".join(f"b{k}={v:,.0f}" for k, v in figures[-1].items()),
                    flush=True,
                )
        for r in running:
            servers[r.target.name] = {
                "rss_mb": rss_mb(*r.pids()),
                "start_to_serving_s": r.start_to_serving_s,
                "model_load_s": r.model_load_s,
            }
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
        "servers": servers,
    }  # fmt: skip


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """The figures the issues ask for, from the median table; the A-versus-B comparisons of
    one feature (monitoring on/off, this server/the baseline) as the median of the ratios
    of each repeat's two samples, taken minutes apart at most: the machine's slow drift
    (other work on shared cores) cancels within a pair, where a ratio of two medians keeps
    it."""
    table = {(r["target"], r["load"]): r for r in result["table"]}
    in_proc: dict[str, float] = result["in_process_images_per_s"].get(IN_PROCESS_RUNTIMES[0], {})
    by_repeat = {(x["target"], x["load"], x["repeat"]): x for x in result["samples"]}

    def get(target: str, load: str, key: str) -> float:
        row = table.get((target, load))
        return float(row[key]) if row else float("nan")

    def paired(a: str, b: str, load: str, key: str) -> float:
        """Median over repeats of a's figure / b's, each pair from the same repeat."""
        pairs = [
            float(x[key]) / float(y[key])
            for (target, name, repeat), x in by_repeat.items()
            if target == a and name == load
            for y in [by_repeat.get((b, load, repeat))]
            if y is not None and float(y[key]) > 0
        ]
        return statistics.median(pairs) if pairs else float("nan")

    top = max((c for (_, load), r in table.items() if load.startswith("predict-c")
               for c in [int(load[9:])]), default=64)  # fmt: skip
    c = 64 if ("batched", "predict-c64") in table else top
    load = f"predict-c{c}"
    stream = f"stream{STREAM_MESSAGES}-c16"
    same = "monitoring-off" if ("monitoring-off", load) in table else "batched"
    return {
        f"predict_c{c}_vs_echo_aio": get("batched", load, "rps") / get("echo-aio", load, "rps"),
        f"cpu_per_request_c{c}_vs_echo_aio": get("batched", load, "cpu_us_per_request")
        / get("echo-aio", load, "cpu_us_per_request"),
        "p50_c1_vs_echo_aio": get("batched", "predict-c1", "p50_ms")
        / get("echo-aio", "predict-c1", "p50_ms"),
        f"batched_vs_naive_litert_c{c}": get("batched", load, "rps")
        / get("naive-litert", load, "rps"),
        f"batched_vs_naive_c{c}": get("batched", load, "rps") / get("naive", load, "rps"),
        "batch1024_vs_in_process_b1024": get("batched", "batch1024-c4", "images_per_s")
        / in_proc.get("1024", float("nan")),
        "stream_images_per_s": get("batched", stream, "images_per_s"),
        f"stream_images_vs_echo_aio_unary_c{c}": get("batched", stream, "images_per_s")
        / get("echo-aio", load, "rps"),
        f"stream_cpu_per_image_vs_echo_aio_unary_c{c}": get("batched", stream, "cpu_us_per_request")
        / STREAM_MESSAGES
        / get("echo-aio", load, "cpu_us_per_request"),
        f"workers2_vs_workers1_c{c}": get("workers2", load, "rps") / get("batched", load, "rps"),
        f"server_timing_cpu_cost_c{c}": get("batched", load, "cpu_us_per_request")
        / get("timing-off", load, "cpu_us_per_request")
        - 1,
        f"monitoring_rps_c{c}_vs_off": paired("batched", "monitoring-off", load, "rps"),
        "monitoring_batch1024_images_vs_off": paired(
            "batched", "monitoring-off", "batch1024-c4", "images_per_s"
        ),
        f"monitoring_cpu_per_request_c{c}_vs_off": paired(
            "batched", "monitoring-off", load, "cpu_us_per_request"
        ),
        "monitoring_cpu_per_request_batch1024_vs_off": paired(
            "batched", "monitoring-off", "batch1024-c4", "cpu_us_per_request"
        ),
        # by the server's own accounting: its counting thread's CPU over the whole server's
        f"monitoring_counting_cpu_share_c{c}": get("batched", load, "monitoring_cpu_share"),
        "monitoring_counting_cpu_share_batch1024": get(
            "batched", "batch1024-c4", "monitoring_cpu_share"
        ),
        # against another checkout's server: with monitoring off when that target runs
        # (a baseline from before model monitoring has none)
        f"vs_baseline_rps_c{c}": paired(same, "baseline", load, "rps"),
        "vs_baseline_batch1024_images": paired(same, "baseline", "batch1024-c4", "images_per_s"),
        f"vs_baseline_cpu_per_request_c{c}": paired(same, "baseline", load, "cpu_us_per_request"),
        f"kserve_cpu_per_request_vs_native_c{c}": get(
            "batched", f"kserve-c{c}", "cpu_us_per_request"
        )
        / get("batched", load, "cpu_us_per_request"),
        f"tfserving_cpu_per_request_vs_native_c{c}": get(
            "batched", f"tfserving-c{c}", "cpu_us_per_request"
        )
        / get("batched", load, "cpu_us_per_request"),
    }
