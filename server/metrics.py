"""Prometheus metrics of the server, in a registry the server owns (no global registry).

Latency buckets run from 100 us to 10 s so that sub-millisecond model calls and multi-second
overload queues both resolve; batch-size buckets are powers of two up to 4096 images.

With several worker processes (``--workers``), prometheus-client's multiprocess mode is on
(``PROMETHEUS_MULTIPROC_DIR`` is set before it is imported): every worker writes its values to
files there and the supervisor's metrics port sums them. Gauges then say how they combine
across workers (``multiprocess_mode``): queue depth and in-flight calls add up, the model
version shown is the highest, and ``mnist_serving`` is 1 only while every worker serves.

Metrics observe the server; they never steer it: the drain and the health state read their
own counts (``server.calls``, ``server.health``), not these.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

if TYPE_CHECKING:
    from server.versions import LoadedModel

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    """Whether this process writes its metrics for a supervisor to sum (``--workers`` > 1)."""
    return MULTIPROCESS_ENV in os.environ


@dataclass
class Duration:
    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.seconds += seconds


@dataclass
class BatchStats:
    """The model calls of one batch size: gathering their input, the call, splitting its
    output (each Duration counts the calls)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class InferenceStats:
    """Plain running totals of inference, for protocols that report them per call
    (KServe/Triton ModelStatistics): this process's own figures, not scraped ones.

    The three compute durations count model calls and are added together, on the event loop,
    by :meth:`observe_batch`: Triton's tools (perf_analyzer) refuse statistics whose three
    compute counts differ, and a reader on the event loop never sees them half updated.
    """

    success: Duration = field(default_factory=Duration)  # inference requests answered OK
    fail: Duration = field(default_factory=Duration)  # inference requests that failed
    queue: Duration = field(default_factory=Duration)  # per request, until its first batch
    compute_input: Duration = field(default_factory=Duration)  # gathering a batch's images
    compute: Duration = field(default_factory=Duration)  # per model call
    compute_output: Duration = field(default_factory=Duration)  # splitting its answer
    batches: dict[int, BatchStats] = field(default_factory=dict)  # by batch size
    images: int = 0  # images computed
    last_inference: float = 0.0  # time.time() of the last model call

    def observe_batch(self, images: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One model call of ``images`` images, with its three phases' seconds."""
        by_size = self.batches.get(images)
        if by_size is None:
            by_size = self.batches[images] = BatchStats()
        for total, seconds in (
            (self.compute_input, input_s), (self.compute, infer_s),
            (self.compute_output, output_s), (by_size.compute_input, input_s),
            (by_size.compute_infer, infer_s), (by_size.compute_output, output_s),
        ):  # fmt: skip
            total.add(seconds)
        self.images += images
        self.last_inference = time.time()

    def observe_request(self, ok: bool, seconds: float) -> None:
        """One inference request answered (``ok``) or failed, after ``seconds``."""
        (self.success if ok else self.fail).add(seconds)


class ServerMetrics:
    """Every metric the server exports. Each server (and each test) makes its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_mode()
        self._live: list[tuple[Any, Callable[[], float]]] = []
        r = self.registry
        if not self.multiprocess:  # process_cpu_seconds_total & co. (a worker's are its own)
            ProcessCollector(registry=r)
        self.rpc_duration = Histogram(
            "mnist_rpc_duration_seconds",
            "End-to-end handling time of an RPC, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "mnist_requests_total", "RPCs handled, by method and status code.",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.images = Counter(
            "mnist_images_total", "Images received in RPCs, by method and status code.",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "mnist_batch_queue_seconds",
            "Time a request waited in the batcher queue before its first model call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "mnist_model_compute_seconds",
            "Time of one model call (one batch), by device and model version.",
            ["device", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mnist_batch_size_images",
            "Images per model call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_failures = Counter(
            "mnist_batch_failures_total", "Model calls that raised.", registry=r
        )
        self.expired_images = Counter(
            "mnist_expired_images_total",
            "Images dropped before compute because their deadline passed while queued.",
            registry=r,
        )
        self.queue_images = Gauge(
            "mnist_queue_images", "Images waiting for a model call.",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.inflight = Gauge(
            "mnist_inflight_requests", "RPCs being handled now.", ["method"],
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.model = Gauge(
            "mnist_model_info",
            "1 for each loaded model version, with where and on which runtime it runs.",
            ["model", "version", "architecture", "device", "runtime"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_version = Gauge(
            "mnist_model_version",
            "Each model's default version (what calls that pin no version or label get).",
            ["model"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.model_memory = Gauge(
            "mnist_model_memory_bytes",
            "Estimated memory a loaded version holds (the size of the model file it loaded).",
            ["model", "version"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.version_requests = Counter(
            "mnist_version_requests_total",
            "Requests answered by each model version (any protocol; counted per model call).",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.model_loads = Counter(
            "mnist_model_loads_total",
            "Model version loads, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.serving = Gauge(
            "mnist_serving", "1 while the server reports SERVING, 0 otherwise.",
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        for result in ("ok", "failed"):
            self.model_loads.labels(result)
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self.stats = InferenceStats()

    def observe_rpc(self, method: str, code: str, images: int, seconds: float) -> None:
        """Record one finished RPC (one that carried images counts as an inference)."""
        if images:
            self.stats.observe_request(code == "OK", seconds)
        children = self._rpc_children.get((method, code))
        if children is None:  # labels() costs a lock and a tuple per call: look up once
            children = self._rpc_children[(method, code)] = (
                self.rpc_duration.labels(method, code),
                self.requests.labels(method, code),
                self.images.labels(method, code),
            )
        duration, requests, image_count = children
        duration.observe(seconds)
        requests.inc()
        if images:
            image_count.inc(images)

    def observe_queue(self, seconds: float) -> None:
        """A request's wait before its first model call (batcher thread)."""
        self.queue_seconds.observe(seconds)
        self.stats.queue.add(seconds)

    def observe_compute(self, histogram: Any, seconds: float, images: int) -> None:
        """One model call: ``histogram`` is the compute-time child for its device (its
        :class:`InferenceStats` come from the batcher, :meth:`InferenceStats.observe_batch`)."""
        histogram.observe(seconds)

    def track(self, gauge: Any, read: Callable[[], float]) -> None:
        """Make ``gauge`` show ``read()``: at scrape time in one process, and at every
        :meth:`refresh` with workers (a supervisor cannot call into a worker at scrape)."""
        if self.multiprocess:
            self._live.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh(self) -> None:
        """Write the tracked gauges' current values (multiprocess mode; cheap, call often)."""
        for gauge, read in self._live:
            gauge.set(read())

    def set_models(self, name: str, loaded: list[LoadedModel], default: LoadedModel | None) -> None:
        """Record which versions of model ``name`` are loaded (1 each in
        ``mnist_model_info``) and its default, after a load, an unload or a relabel."""
        for model in loaded:
            self.model.labels(*_model_labels(model)).set(1)
            self.model_memory.labels(model.name, str(model.version)).set(model.memory_bytes)
        if default is not None:
            self.model_version.labels(name).set(default.version)
        elif self.multiprocess:
            self.model_version.labels(name).set(0)
        else:  # every version unloaded: the model has no default
            self.model_version.remove(name)

    def drop_model(self, model: LoadedModel) -> None:
        """A version is unloaded: its series go (0 in a worker's file in multiprocess mode)."""
        labels = _model_labels(model)
        self.model.labels(*labels).set(0)
        self.model_memory.labels(model.name, str(model.version)).set(0)
        if not self.multiprocess:
            self.model.remove(*labels)
            self.model_memory.remove(model.name, str(model.version))
            self.compute_seconds.remove(model.device, model.name, str(model.version))


def _model_labels(model: LoadedModel) -> tuple[str, str, str, str, str]:
    return model.name, str(model.version), model.architecture, model.device, model.runtime_name
