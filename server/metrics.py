"""Prometheus metrics of the server, in a registry the server owns (no global registry).

Latency buckets run from 100 us to 10 s so that sub-millisecond model calls and multi-second
overload queues both resolve; batch-size buckets are powers of two up to 4096 images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

if TYPE_CHECKING:
    from server.model import LoadedModel

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096


class ServerMetrics:
    """Every metric the server exports. Each server (and each test) makes its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
            "Time of one model call (one batch), by device.",
            ["device"],
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
        self.queue_images = Gauge(
            "mnist_queue_images", "Images waiting for a model call.", registry=r
        )
        self.inflight = Gauge(
            "mnist_inflight_requests", "RPCs being handled now.", ["method"], registry=r
        )
        self.model = Info(
            "mnist_model",
            "The model version being served, where and on which runtime it runs.",
            registry=r,
        )
        self.model_version = Gauge(
            "mnist_model_version", "The model version being served.", registry=r
        )
        self.model_loads = Counter(
            "mnist_model_loads_total",
            "Model version loads, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.serving = Gauge(
            "mnist_serving", "1 while the server reports SERVING, 0 otherwise.", registry=r
        )
        for result in ("ok", "failed"):
            self.model_loads.labels(result)
        self._rpc_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def observe_rpc(self, method: str, code: str, images: int, seconds: float) -> None:
        """Record one finished RPC."""
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

    def requests_by_code(self) -> dict[str, int]:
        """Total RPCs answered so far per status code, over all methods."""
        totals: dict[str, int] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    code = sample.labels["code"]
                    totals[code] = totals.get(code, 0) + int(sample.value)
        return totals

    def inflight_total(self) -> int:
        """RPCs being handled now, over all methods."""
        return int(sum(s.value for m in self.inflight.collect() for s in m.samples))

    def set_model(self, model: LoadedModel) -> None:
        """Record which version is served, after a load or a swap."""
        self.model.info({
            "version": str(model.version), "architecture": model.architecture,
            "device": model.device, "runtime": model.runtime,
        })  # fmt: skip
        self.model_version.set(model.version)
