"""Hostile load, measured: what one outside tester did to the server, repeatable.

    python -m bench.hostile --model-dir models [--seconds 20]

Each scenario gets a fresh server (default settings) on 127.0.0.1 and prints its figures
against the targets:

* ``bodies``: three 8 MiB hostile bodies at once (unknown varints, unknown fixed32, 4M empty
  images), five times, while a health check runs every 100 ms: time to each refusal, the
  slowest health check, RSS growth during and after.
* ``lockout``: one client holds 300 Predicts that never send a body and 300 PredictStreams
  that never send a message (opened again as the server ends them); another client's
  Predict latency (8 callers) before and during, and health meanwhile.
* ``overload``: Predict at concurrency 1,000 (h2load), after a run at 64: refusals, the
  server-side p99 of refusals and of accepted calls (from the server's histogram), RSS;
  ``overload-pending`` the same with ``--max-pending-calls 128``, ``overload-workers`` with
  ``--workers 2``.
* ``flood``: 1,024-image BatchPredicts at concurrency 64: RSS during and after.
* ``sigterm``: SIGTERM under steady load: time until the process has exited.
* ``deadlines``: 300 calls at once with 1, 10 and 100 ms deadlines under load, from a Python
  client that records every status it sees, against the server's own counters. A call whose
  deadline passes before the client has sent it never reaches any server: with 300 calls
  started at once, the client alone takes longer than 1 ms to send them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
from prometheus_client.samples import Sample

from bench.h2load import SERVICE, Load, h2load, make_payloads
from bench.targets import Running, Target, metric_samples, our_server, rss_mb, start, stop
from mnist_client import AsyncDigitClient, DigitClient
from mnist_client.pb import digit_classifier_pb2 as pb

EIGHT_MIB = 8 * 1024 * 1024
HOSTILE = {
    "unknown varints": ("Predict", b"\x10\x01" * (EIGHT_MIB // 2 - 8)),
    "unknown fixed32": ("Predict", b"\x15\x00\x00\x00\x00" * (EIGHT_MIB // 5 - 8)),
    "4M empty images": ("BatchPredict", b"\x0a\x00" * (EIGHT_MIB // 2 - 8)),
}


def _metrics(running: Running) -> list[Sample]:
    assert running.metrics_port is not None
    return metric_samples(running.metrics_port)


def _codes(samples: list[Sample], method: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for sample in samples:
        if sample.name == "mnist_requests_total" and sample.labels["method"] == method:
            counts[sample.labels["code"]] += int(sample.value)
    return counts


def _quantile(before: list[Sample], after: list[Sample], method: str, code: str, q: float) -> float:
    """Server-side latency quantile of ``method`` calls answered ``code`` between two scrapes."""

    def buckets(samples: list[Sample]) -> dict[float, float]:
        return {
            float(s.labels["le"]): s.value
            for s in samples
            if s.name == "mnist_rpc_duration_seconds_bucket"
            and s.labels["method"] == method and s.labels["code"] == code
        }  # fmt: skip

    b0, b1 = buckets(before), buckets(after)
    counts = sorted((le, b1[le] - b0.get(le, 0.0)) for le in b1)
    total = counts[-1][1] if counts else 0
    if not total:
        return float("nan")
    for le, cumulative in counts:
        if cumulative >= q * total:
            return le
    return float("inf")


def _rss_sampler(pid: int) -> tuple[Callable[[], list[float]], threading.Event]:
    samples: list[float] = []
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            samples.append(rss_mb(pid))
            time.sleep(0.05)

    threading.Thread(target=run, daemon=True).start()
    return (lambda: samples), done


def _start(model_dir: Path, workdir: Path, name: str, *extra: str) -> Running:
    return start(Target(name, our_server(model_dir, *extra), True), workdir)


def _warm(target: str, images: np.ndarray, n: int = 2000) -> None:
    with DigitClient(target) as client:
        for i in range(0, n, 100):
            client.batch_predict(images[:100])
            client.predict(images[i % len(images)])


def scenario_bodies(model_dir: Path, images: np.ndarray, workdir: Path) -> dict[str, Any]:
    running = _start(model_dir, workdir, "bodies")
    target = f"127.0.0.1:{running.port}"
    try:
        _warm(target, images)
        base = rss_mb(running.proc.pid)
        health_ms: list[float] = []
        stop_probe = threading.Event()

        def probe() -> None:
            with DigitClient(target, timeout=1.0) as client:
                while not stop_probe.is_set():
                    t0 = time.perf_counter()
                    status = client.health()
                    health_ms.append((time.perf_counter() - t0) * 1000)
                    assert status == "SERVING", status
                    time.sleep(0.1)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        samples, sampling = _rss_sampler(running.proc.pid)
        refusals: dict[str, list[float]] = {name: [] for name in HOSTILE}
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(target, options=options) as channel:
            for _ in range(5):
                threads = []
                for name, (method, body) in HOSTILE.items():

                    def send(name: str = name, method: str = method, body: bytes = body) -> None:
                        call = channel.unary_unary(f"{SERVICE}/{method}")  # type: ignore[call-arg]
                        t0 = time.perf_counter()
                        try:
                            call(body, timeout=30)
                            raise AssertionError(f"{name} was accepted")
                        except grpc.RpcError as err:
                            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                        refusals[name].append((time.perf_counter() - t0) * 1000)

                    threads.append(threading.Thread(target=send))
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                time.sleep(0.3)
        time.sleep(2)
        after = rss_mb(running.proc.pid)
        sampling.set()
        stop_probe.set()
        prober.join(5)
        return {
            "refusal_ms_max": {k: round(max(v), 1) for k, v in refusals.items()},
            "health_checks": len(health_ms),
            "health_ms_max": round(max(health_ms), 1),
            "rss_base_mb": round(base, 1),
            "rss_peak_growth_mb": round(max(samples()) - base, 1),
            "rss_after_growth_mb": round(after - base, 1),
        }
    finally:
        stop(running)


def scenario_overload(
    model_dir: Path, images: np.ndarray, workdir: Path, seconds: float, *flags: str
) -> dict[str, Any]:
    running = _start(model_dir, workdir, "overload", *flags)
    payloads = make_payloads(workdir, images)
    path = f"{SERVICE}/Predict"
    try:
        _warm(f"127.0.0.1:{running.port}", images)
        base = rss_mb(running.proc.pid)
        m0 = _metrics(running)
        h2load(
            running.port, Load("c64", path, "predict", 64, 1), payloads["predict"], 5, 1, workdir
        )
        m1 = _metrics(running)
        samples, sampling = _rss_sampler(running.proc.pid)
        n, secs, lat = h2load(
            running.port, Load("c1000", path, "predict", 1000, 1), payloads["predict"], seconds,
            1, workdir,
        )  # fmt: skip
        sampling.set()
        m2 = _metrics(running)
        codes = _codes(m2, "Predict") - _codes(m1, "Predict")
        return {
            "c1000_calls_per_s": round(n / secs),
            "c1000_codes": dict(codes),
            "refused_p99_ms": _quantile(m1, m2, "Predict", "RESOURCE_EXHAUSTED", 0.99) * 1000,
            "accepted_p99_ms_c1000": _quantile(m1, m2, "Predict", "OK", 0.99) * 1000,
            "accepted_p99_ms_c64": _quantile(m0, m1, "Predict", "OK", 0.99) * 1000,
            "client_p99_ms_c1000": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "rss_base_mb": round(base, 1),
            "rss_peak_growth_mb": round(max(samples()) - base, 1),
        }
    finally:
        stop(running)


def _victim_latencies(
    target: str, images: np.ndarray, seconds: float
) -> tuple[Counter[str], np.ndarray]:
    """Predicts from 8 callers on their own connection for ``seconds``: codes, latencies (ms)."""
    codes: Counter[str] = Counter()
    latencies: list[float] = []

    async def main() -> None:
        async with AsyncDigitClient(target) as client:
            end = time.monotonic() + seconds

            async def caller(k: int) -> None:
                i = k
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    try:
                        await client.predict(images[i % len(images)], timeout=10)
                        codes["OK"] += 1
                        latencies.append((time.perf_counter() - t0) * 1000)
                    except grpc.aio.AioRpcError as err:
                        codes[err.code().name] += 1
                    i += 8

            await asyncio.gather(*(caller(k) for k in range(8)))

    asyncio.run(main())
    return codes, np.asarray(latencies)


def scenario_lockout(model_dir: Path, images: np.ndarray, workdir: Path) -> dict[str, Any]:
    """One client holds 300 Predicts that never send a body and 300 streams that never send a
    message (re-opened as the server ends them); another client's Predicts, before and during."""
    running = _start(model_dir, workdir, "lockout")
    target = f"127.0.0.1:{running.port}"
    try:
        _warm(target, images)
        normal_codes, normal = _victim_latencies(target, images, 10)
        opened: Counter[str] = Counter()
        ended: Counter[str] = Counter()
        stop_hostile = threading.Event()

        async def hostile() -> None:
            gate = asyncio.Event()

            async def nothing() -> Any:
                await gate.wait()
                if False:
                    yield b""

            channel = grpc.aio.insecure_channel(target)  # one client, one connection

            async def hold(kind: str) -> None:
                while not stop_hostile.is_set():
                    if kind == "bodyless":
                        method = f"{SERVICE}/Predict"
                        call: Any = channel.stream_unary(method)(nothing())  # type: ignore[call-arg]
                    else:
                        method = f"{SERVICE}/PredictStream"
                        call = channel.stream_stream(method)(nothing())  # type: ignore[call-arg]
                    opened[kind] += 1
                    try:
                        if kind == "bodyless":
                            await call
                        else:
                            async for _ in call:
                                pass
                    except grpc.aio.AioRpcError as err:
                        ended[f"{kind} {err.code().name}"] += 1
                        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            await asyncio.sleep(0.5)  # held calls, not a flood of new ones
                    if stop_hostile.is_set():
                        call.cancel()

            tasks = [hold("bodyless") for _ in range(300)] + [hold("streams") for _ in range(300)]
            runner = asyncio.gather(*tasks)
            while not stop_hostile.is_set():
                await asyncio.sleep(0.1)
            gate.set()
            runner.cancel()
            with contextlib.suppress(BaseException):
                await runner
            await channel.close(None)

        attacker = threading.Thread(target=lambda: asyncio.run(hostile()), daemon=True)
        attacker.start()
        time.sleep(2)  # all 600 held
        with DigitClient(target) as client:
            health = client.health()
        attacked_codes, attacked = _victim_latencies(target, images, 15)
        stop_hostile.set()
        attacker.join(30)
        p99_normal = float(np.percentile(normal, 99))
        p99_attacked = float(np.percentile(attacked, 99)) if len(attacked) else float("inf")
        return {
            "victim_codes_normal": dict(normal_codes),
            "victim_codes_attacked": dict(attacked_codes),
            "victim_p99_ms_normal": round(p99_normal, 2),
            "victim_p99_ms_attacked": round(p99_attacked, 2),
            "p99_ratio": round(p99_attacked / p99_normal, 2),
            "health_while_held": health,
            "hostile_calls_opened": dict(opened),
            "hostile_calls_ended": dict(ended),
        }
    finally:
        stop(running)


def scenario_flood(
    model_dir: Path, images: np.ndarray, workdir: Path, seconds: float
) -> dict[str, Any]:
    running = _start(model_dir, workdir, "flood")
    payloads = make_payloads(workdir, images)
    try:
        _warm(f"127.0.0.1:{running.port}", images)
        base = rss_mb(running.proc.pid)
        samples, sampling = _rss_sampler(running.proc.pid)
        m0 = _metrics(running)
        h2load(running.port, Load("flood", f"{SERVICE}/BatchPredict", "batch1024", 64, 1024),
               payloads["batch1024"], seconds, 1, workdir)  # fmt: skip
        m1 = _metrics(running)
        time.sleep(2)
        sampling.set()
        return {
            "codes": dict(_codes(m1, "BatchPredict") - _codes(m0, "BatchPredict")),
            "rss_base_mb": round(base, 1),
            "rss_peak_growth_mb": round(max(samples()) - base, 1),
            "rss_after_growth_mb": round(rss_mb(running.proc.pid) - base, 1),
        }
    finally:
        stop(running)


def scenario_sigterm(model_dir: Path, images: np.ndarray, workdir: Path) -> dict[str, Any]:
    running = _start(model_dir, workdir, "sigterm", "--grace-seconds", "20")
    payloads = make_payloads(workdir, images)
    load = Load("c64", f"{SERVICE}/Predict", "predict", 64, 1)
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            _, _, lat = h2load(running.port, load, payloads["predict"], 8, 1, workdir)
            result["p99_ms_before"] = float(np.percentile(lat, 99)) if len(lat) else None
        except RuntimeError:
            pass  # h2load reports the closed connections

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    time.sleep(3)
    t0 = time.perf_counter()
    running.proc.send_signal(signal.SIGTERM)
    code = running.proc.wait(60)
    result["exit_seconds"] = round(time.perf_counter() - t0, 2)
    result["exit_code"] = code
    thread.join(30)
    return result


def scenario_deadlines(model_dir: Path, images: np.ndarray, workdir: Path) -> dict[str, Any]:
    running = _start(model_dir, workdir, "deadlines")
    payloads = make_payloads(workdir, images)
    target = f"127.0.0.1:{running.port}"
    try:
        _warm(target, images)
        background_load = Load("c64", f"{SERVICE}/Predict", "predict", 64, 1)
        background = threading.Thread(
            target=h2load,
            args=(running.port, background_load, payloads["predict"], 12, 0, workdir),
            daemon=True,
        )  # all OK: its calls do not count among the failures compared below
        background.start()
        time.sleep(2)
        by_deadline: dict[str, Any] = {}

        async def calls(deadline: float) -> Counter[str]:
            seen: Counter[str] = Counter()
            async with grpc.aio.insecure_channel(target) as channel:
                predict = channel.unary_unary(f"{SERVICE}/Predict")  # type: ignore[call-arg]
                body = pb.PredictRequest(image=images[0].tobytes()).SerializeToString()
                await predict(body)  # connected: the calls below are not slowed by a handshake

                async def one() -> None:
                    try:
                        await predict(body, timeout=deadline)
                        seen["OK"] += 1
                    except grpc.aio.AioRpcError as err:
                        seen[err.code().name] += 1

                await asyncio.gather(*(one() for _ in range(300)))
            return seen

        for deadline in (0.001, 0.01, 0.1):
            before = _codes(_metrics(running), "Predict")
            seen = asyncio.run(calls(deadline))
            time.sleep(1)
            server = _codes(_metrics(running), "Predict") - before
            # the background load's calls are all OK (h2load): compare the failures only
            failed = sum(v for k, v in seen.items() if k != "OK")
            counted = sum(v for k, v in server.items() if k != "OK")
            by_deadline[f"{deadline * 1000:g}ms"] = (
                f"client saw {dict(seen)}; server counted failures {counted}; "
                f"unseen {failed - counted}"
            )
        background.join(30)
        return by_deadline
    finally:
        stop(running)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--data-dir", type=Path, help="MNIST IDX folder for real request images")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the overload run")
    p.add_argument("--only", help="comma-separated scenarios to run")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench.__main__ import _images

    images = _images(args.data_dir)
    workdir = Path(tempfile.mkdtemp(prefix="mnist-hostile-"))
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "bodies": lambda: scenario_bodies(args.model_dir, images, workdir),
        "lockout": lambda: scenario_lockout(args.model_dir, images, workdir),
        "overload": lambda: scenario_overload(args.model_dir, images, workdir, args.seconds),
        "overload-pending": lambda: scenario_overload(
            args.model_dir, images, workdir, args.seconds, "--max-pending-calls", "128"
        ),
        "overload-workers": lambda: scenario_overload(
            args.model_dir, images, workdir, args.seconds, "--workers", "2"
        ),
        "flood": lambda: scenario_flood(args.model_dir, images, workdir, 15.0),
        "sigterm": lambda: scenario_sigterm(args.model_dir, images, workdir),
        "deadlines": lambda: scenario_deadlines(args.model_dir, images, workdir),
    }
    chosen = args.only.split(",") if args.only else list(scenarios)
    for name in chosen:
        print(f"== {name}", flush=True)
        for key, value in scenarios[name]().items():
            print(f"  {key:26s} {value}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
