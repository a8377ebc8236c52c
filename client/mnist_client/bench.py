"""``python -m mnist_client bench``: load-test a deployment of this service, as a user would.

    python -m mnist_client bench --target HOST:PORT --concurrency 64 --duration 10 \\
        [--method predict|batch|stream] [--batch-size N] [--data IDX-or-folder] [--json FILE]

It runs ``--concurrency`` callers for ``--duration`` seconds, spread over several processes
when one Python process could not keep up (``--processes``, default one per 32 callers, at
most one per core), then prints requests/s and images/s, client latency percentiles, errors by
status code, and the server's own account from the ``server-timing`` answers: queue, compute
and total percentiles and the mean batch size. Network-plus-client time is each answer's
client latency minus its server total. With labelled data (an IDX folder) it also prints
accuracy. ``--fail-on-error`` exits 1 on any error, for CI.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import queue
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mnist_client import idx
from mnist_client.client import AsyncDigitClient, DigitClient
from mnist_client.contract import IMAGE_SHAPE
from mnist_client.timing import Timing

METHODS = ("predict", "batch", "stream")
CALLERS_PER_PROCESS = 32
STREAM_WINDOW = 64  # images a stream has in flight: more would only queue up (latency)


@dataclass(frozen=True)
class Plan:
    """What one load-testing process does."""

    target: str
    callers: int
    method: str
    batch_size: int
    duration: float
    client: dict[str, Any]  # AsyncDigitClient's keyword arguments (TLS, token)


@dataclass
class Tally:
    """What one process saw; merged across processes at the end."""

    requests: int = 0
    images: int = 0
    elapsed_s: float = 0.0  # from the start to the last answer
    correct: int = 0
    labelled: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)  # per answer (request or image)
    queue_ms: list[float] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    network_ms: list[float] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)

    def answer(self, latency_s: float, timing: Timing | None) -> None:
        self.latency_ms.append(latency_s * 1e3)
        if timing is not None:
            self.queue_ms.append(timing.queue_ms)
            self.compute_ms.append(timing.compute_ms)
            self.total_ms.append(timing.total_ms)
            self.network_ms.append(latency_s * 1e3 - timing.total_ms)
            self.batch.append(timing.batch_size)

    def merge(self, other: Tally) -> None:
        for name in ("requests", "images", "correct", "labelled"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.errors.update(other.errors)
        for name in ("latency_ms", "queue_ms", "compute_ms", "total_ms", "network_ms", "batch"):
            getattr(self, name).extend(getattr(other, name))


def load_images(source: Path | None, n: int = 10_000) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (and labels, when there are) from an IDX file or a folder of them; else a
    seeded set of random images."""
    if source is None:
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8), None
    if source.is_dir():
        images = idx.read_idx(idx.find(source, idx.TEST_IMAGES), idx.IMAGES_NDIM)
        try:
            labels = idx.read_idx(idx.find(source, idx.TEST_LABELS), idx.LABELS_NDIM)
        except idx.IdxError:
            labels = None
        return images[:n], (labels[:n] if labels is not None else None)
    return idx.read_idx(source, idx.IMAGES_NDIM)[:n], None


async def _caller(client: AsyncDigitClient, plan: Plan, k: int, images: np.ndarray,
                  labels: np.ndarray | None, tally: Tally, stop_at: float,
                  progress: Any) -> None:  # fmt: skip
    i = k * 997 % len(images)
    while time.monotonic() < stop_at:
        n = plan.batch_size if plan.method == "batch" else 1
        rows = np.arange(i, i + n) % len(images)
        i = (i + n) % len(images)
        started = time.perf_counter()
        try:
            if plan.method == "batch":
                batch = await client.batch_predict(images[rows])
                digits, timing = batch.digits, batch.timing
            else:
                prediction = await client.predict(images[rows[0]])
                digits, timing = np.array([prediction.digit]), prediction.timing
        except grpc.aio.AioRpcError as err:
            tally.errors[err.code().name] += 1
            continue
        tally.answer(time.perf_counter() - started, timing)
        tally.requests += 1
        tally.images += n
        with progress.get_lock():
            progress.value += n
        if labels is not None:
            tally.labelled += n
            tally.correct += int((digits == labels[rows]).sum())


async def _streamer(client: AsyncDigitClient, k: int, images: np.ndarray,
                    labels: np.ndarray | None, tally: Tally, stop_at: float,
                    progress: Any) -> None:  # fmt: skip
    """One stream, fed until the time is up with at most :data:`STREAM_WINDOW` images in
    flight; latency is per image, from sending it to its answer."""
    sent: dict[int, float] = {}
    offset = k * 997
    window = asyncio.Semaphore(STREAM_WINDOW)

    async def feed():  # type: ignore[no-untyped-def]
        j = 0
        while time.monotonic() < stop_at:
            await window.acquire()
            sent[j] = time.perf_counter()
            yield images[(offset + j) % len(images)]
            j += 1

    try:
        async for result in client.predict_stream(feed()):
            window.release()
            latency = time.perf_counter() - sent.pop(result.id)
            if result.prediction is None:
                tally.errors[result.error.code.name if result.error else "UNKNOWN"] += 1
                continue
            tally.answer(latency, result.prediction.timing)
            tally.requests += 1
            tally.images += 1
            with progress.get_lock():
                progress.value += 1
            if labels is not None:
                tally.labelled += 1
                row = (offset + result.id) % len(images)
                tally.correct += int(result.prediction.digit == labels[row])
    except grpc.aio.AioRpcError as err:
        tally.errors[err.code().name] += 1


def _run_process(plan: Plan, data: Path | None, start_at: float, progress: Any,
                 results: Any) -> None:  # fmt: skip
    images, labels = load_images(data)
    tally = Tally()

    async def run() -> None:
        async with AsyncDigitClient(plan.target, **plan.client) as client:
            await client.health()  # connected before the clock starts
            while time.time() < start_at:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            stop_at = started + plan.duration
            if plan.method == "stream":
                jobs = [_streamer(client, k, images, labels, tally, stop_at, progress)
                        for k in range(plan.callers)]  # fmt: skip
            else:
                jobs = [_caller(client, plan, k, images, labels, tally, stop_at, progress)
                        for k in range(plan.callers)]  # fmt: skip
            await asyncio.gather(*jobs)
            tally.elapsed_s = time.monotonic() - started

    try:
        asyncio.run(run())
    except Exception as err:  # told to the parent, which stops and says why
        results.put(f"a load process failed: {type(err).__name__}: {err}")
        return
    results.put(tally)


def run(plans: list[Plan], data: Path | None, show_progress: bool = True) -> Tally:
    """Run every plan in a process of its own, all starting together; merge what they saw."""
    context = multiprocessing.get_context("spawn")
    progress = context.Value("q", 0)
    results = context.Queue()
    start_at = time.time() + 2.0 + 0.5 * len(plans)  # every process connected by then
    procs = [context.Process(target=_run_process, args=(p, data, start_at, progress, results))
             for p in plans]  # fmt: skip
    for proc in procs:
        proc.start()
    duration = plans[0].duration
    total = Tally()
    waiting = len(procs)
    try:
        while waiting:
            try:
                got = results.get(timeout=0.25)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    status = dead[0].exitcode
                    raise SystemExit(f"a load process exited with status {status}") from None
                if show_progress and time.time() >= start_at:
                    done = min(1.0, (time.time() - start_at) / duration)
                    bar = "#" * int(done * 30)
                    print(f"\r  [{bar:30s}] {done * 100:3.0f}%  {progress.value:,} images",
                          end="", file=sys.stderr, flush=True)  # fmt: skip
                continue
            if isinstance(got, str):
                raise SystemExit(got)
            total.merge(got)
            waiting -= 1
    finally:
        for proc in procs:
            if proc.is_alive() and waiting:
                proc.terminate()
            proc.join(10)
    if show_progress:
        print(file=sys.stderr)
    return total


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3),
            "p99": round(float(p99), 3), "max": round(float(max(values)), 3)}  # fmt: skip


def report(
    tally: Tally, duration: float, processes: int, callers: int, method: str
) -> dict[str, Any]:
    """The figures, as the JSON report has them."""
    elapsed = max(duration, tally.elapsed_s)  # the last calls end after the duration
    out: dict[str, Any] = {
        "method": method,
        "callers": callers,
        "processes": processes,
        "duration_s": round(elapsed, 2),
        "requests_per_s": round(tally.requests / elapsed, 1),
        "images_per_s": round(tally.images / elapsed, 1),
        "answers": tally.requests,
        "errors": dict(tally.errors),
        "client_latency_ms": _percentiles(tally.latency_ms),
        "server_queue_ms": _percentiles(tally.queue_ms),
        "server_compute_ms": _percentiles(tally.compute_ms),
        "server_total_ms": _percentiles(tally.total_ms),
        "network_and_client_ms": _percentiles(tally.network_ms),
        "mean_batch_size": round(float(np.mean(tally.batch)), 2) if tally.batch else None,
    }
    if tally.labelled:
        out["accuracy"] = round(tally.correct / tally.labelled, 4)
    return out


def _print(figures: dict[str, Any]) -> None:
    print(f"{figures['method']}: {figures['callers']} callers in {figures['processes']} "
          f"process(es), {figures['duration_s']:g} s")  # fmt: skip
    print(f"  {figures['requests_per_s']:,.0f} requests/s, {figures['images_per_s']:,.0f} "
          f"images/s, {figures['answers']:,} answers")  # fmt: skip
    for name, label in (("client_latency_ms", "client latency"), ("server_total_ms",
                        "server total"), ("server_queue_ms", "server queue"),
                        ("server_compute_ms", "server compute"),
                        ("network_and_client_ms", "network + client")):  # fmt: skip
        p = figures[name]
        if p:
            print(f"  {label:17s} p50 {p['p50']:8.3f}  p90 {p['p90']:8.3f}  "
                  f"p99 {p['p99']:8.3f}  max {p['max']:8.3f} ms")  # fmt: skip
    if figures["mean_batch_size"] is not None:
        print(f"  mean batch size   {figures['mean_batch_size']}")
    if "accuracy" in figures:
        print(f"  accuracy          {figures['accuracy']:.4f}")
    errors = figures["errors"]
    print("  errors            " + (", ".join(f"{k}={v}" for k, v in errors.items()) or "none"))


def make_plans(target: str, callers: int, method: str, batch_size: int, duration: float,
               client: dict[str, Any], processes: int = 0) -> list[Plan]:  # fmt: skip
    """``callers`` split as evenly as can be over ``processes`` load processes (0: one per
    :data:`CALLERS_PER_PROCESS` callers, at most one per core)."""
    processes = processes or max(
        1, min(os.cpu_count() or 1, math.ceil(callers / CALLERS_PER_PROCESS))
    )
    processes = min(processes, callers)
    shares = [callers // processes + (i < callers % processes) for i in range(processes)]
    return [Plan(target, n, method, batch_size, duration, client) for n in shares]


def main(args: Any, client: dict[str, Any]) -> int:
    """The ``bench`` command of ``python -m mnist_client``; ``args`` from its parser."""
    if args.method not in METHODS:
        raise SystemExit(f"--method must be one of {', '.join(METHODS)}")
    for name in ("concurrency", "duration", "batch_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0")
    try:  # checked here, once, rather than failing in every load process
        load_images(args.data)
    except (OSError, idx.IdxError) as err:
        raise SystemExit(f"--data {args.data}: {err}") from None
    with DigitClient(args.target, **client) as probe:
        try:
            probe.health(timeout=10)
        except grpc.RpcError as err:
            raise SystemExit(f"cannot reach {args.target}: {err.code().name}") from None
    plans = make_plans(args.target, args.concurrency, args.method, args.batch_size,
                       args.duration, client, args.processes)  # fmt: skip
    tally = run(plans, args.data, show_progress=not args.quiet)
    figures = report(tally, args.duration, len(plans), args.concurrency, args.method)
    _print(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if args.fail_on_error and tally.errors else 0
