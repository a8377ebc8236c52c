"""Model-quality monitoring: what each model version is asked and what it answers, against the
reference profile its training wrote (``profile.json``), in Prometheus.

Eight signals per image, computed for a whole batch at once (a handful of numpy calls, no
Python loop over images):

* six cheap input statistics: ``mean_intensity`` (mean pixel, 0-1), ``ink_share`` (share of
  pixels over half intensity), ``center_row`` / ``center_col`` (centre of mass, pixels) and
  ``spread_row`` / ``spread_col`` (the ink's standard deviation along each axis: a rotation
  swaps them, though MNIST's centring keeps the centre of mass where it was);
* the answer: ``digit`` (the predicted class) and ``confidence`` (its probability).

Each signal is binned: the input statistics at the deciles of the training run's test set (so
every bin held about a tenth of the reference images), the confidence at fixed edges, the
digit one bin per class. Per version the server exports the cumulative counts (predicted
digits, a confidence histogram, one histogram per statistic) and, over a sliding window
(``--drift-window-seconds``), the population stability index of each signal against the
reference, their maximum as the drift score, and the share of low-confidence answers.

Why PSI: it is a sum over the same bins the histograms show, so an operator can see which bins
moved; it is cheap (the window's bin counts against ten reference shares); it has a
well-known reading (below 0.1 stable, above 0.25 shifted); and unlike a KS test it applies to
the categorical digit distribution as well. Under no drift its expected value is about
(bins - 1) / window images (0.009 for 1,000 images), so the 0.25 threshold sits far above the
noise of clean traffic (README, "Model monitoring", has the measured false-alarm rate) while
inverted, rotated, blank or noise images score 1-20.

The profile is part of a version (listed with its checksum in the metadata like every file);
a version exported before monitoring existed has none and serves without these metrics (the
load log says so, and ``mnist_model_monitored`` is 0 for it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import logging.handlers
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from mnist_client.contract import NUM_CLASSES

log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
PROFILE_FORMAT = 1
STATISTICS = ("mean_intensity", "ink_share", "center_row", "center_col", "spread_row", "spread_col")
SIGNALS = (*STATISTICS, "confidence", "digit")
CONFIDENCE_EDGES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
DIGIT_EDGES = tuple(d + 0.5 for d in range(9))  # one bin per class
LOW_CONFIDENCE = 0.5  # an answer at or below this probability is a low-confidence one
DRIFT_THRESHOLD = 0.25  # the alert's threshold (deploy/prometheus/alerts.yml), stated here
MIN_WINDOW_IMAGES = 200  # fewer images in the window: no drift score (too noisy to read)
WINDOW_SLOTS = 6  # the sliding window is this many slots of window/6 seconds each
_SMOOTHING = 0.5  # added to every live bin count: an empty bin is not a log of zero
_FLOOR = 1e-4  # smallest reference share (a reference bin with no image)

_PIXELS = 28 * 28
_AXIS = np.arange(28, dtype=np.float64)


def image_statistics(images: np.ndarray) -> np.ndarray:
    """The six input statistics (``STATISTICS``) of uint8 images ``[N, 28, 28]``: ``[N, 6]``.

    Sums along each axis first (integer reductions), then the moments of those 28 sums: no
    matrix product, whose BLAS threads would spin on the cores the server needs.
    """
    x = images.reshape(len(images), 28, 28)
    rows = x.sum(axis=2, dtype=np.uint32).astype(np.float64)  # ink per row
    cols = x.sum(axis=1, dtype=np.uint32).astype(np.float64)
    total = rows.sum(axis=1)
    mass = np.maximum(total, 1.0)[:, None]  # a blank image: centre 0, spread 0
    center = np.column_stack([(rows * _AXIS).sum(axis=1), (cols * _AXIS).sum(axis=1)]) / mass
    second = np.column_stack([(rows * _AXIS**2).sum(axis=1), (cols * _AXIS**2).sum(axis=1)])
    spread = np.sqrt(np.maximum(second / mass - center**2, 0.0))
    ink = (x >> 7).reshape(len(x), _PIXELS).sum(axis=1, dtype=np.uint16) / _PIXELS  # > 127
    return np.column_stack([total / (_PIXELS * 255.0), ink, center, spread])


def signals(images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Every signal (``SIGNALS``) of a batch: ``[N, 8]``."""
    return np.column_stack(
        [image_statistics(images), probabilities.max(axis=1), probabilities.argmax(axis=1)]
    )


@dataclass(frozen=True)
class Profile:
    """A version's reference: per signal its inner bin edges and the reference share of each
    bin (one more than the edges)."""

    edges: dict[str, tuple[float, ...]]
    shares: dict[str, tuple[float, ...]]
    images: int

    @classmethod
    def build(cls, images: np.ndarray, probabilities: np.ndarray) -> Profile:
        """The reference of ``images`` and the model's ``probabilities`` for them (training:
        the held-out test set)."""
        statistics = image_statistics(images)
        edges: dict[str, tuple[float, ...]] = {}
        for j, name in enumerate(STATISTICS):
            deciles = np.quantile(statistics[:, j], np.linspace(0.1, 0.9, 9))
            edges[name] = tuple(float(e) for e in np.unique(np.round(deciles, 6)))
        edges["confidence"], edges["digit"] = CONFIDENCE_EDGES, DIGIT_EDGES
        binning = Binning(edges)
        answers, _ = binning.answer_counts(np.ascontiguousarray(probabilities.T))
        binned = np.concatenate([binning.statistic_counts(statistics), answers])
        shares = {
            name: tuple(round(float(c) / len(images), 6) for c in counts)
            for name, counts in zip(SIGNALS, binned, strict=True)
        }
        return cls(edges, {k: shares[k][: len(edges[k]) + 1] for k in SIGNALS}, len(images))

    def to_json(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "images": self.images,
                "signals": {k: {"edges": list(self.edges[k]), "shares": list(self.shares[k])}
                            for k in SIGNALS}}  # fmt: skip

    @classmethod
    def read(cls, path: Path) -> Profile:
        """A version folder's profile. Raises ValueError when it is not one this server
        reads."""
        data = json.loads((path / PROFILE_FILE).read_text())
        if data.get("format") != PROFILE_FORMAT or set(data["signals"]) != set(SIGNALS):
            raise ValueError(f"{PROFILE_FILE}: not a format-{PROFILE_FORMAT} profile")
        edges = {k: tuple(map(float, v["edges"])) for k, v in data["signals"].items()}
        shares = {k: tuple(map(float, v["shares"])) for k, v in data["signals"].items()}
        if any(len(shares[k]) != len(edges[k]) + 1 for k in SIGNALS):
            raise ValueError(f"{PROFILE_FILE}: a signal's shares do not match its edges")
        if edges["digit"] != DIGIT_EDGES:
            raise ValueError(f"{PROFILE_FILE}: the digit signal is not one bin per class")
        return cls(edges, shares, int(data["images"]))


class Binning:
    """Bins the signals of a batch (Prometheus ``le`` semantics: a value equal to an edge
    falls in the bin below it)."""

    def __init__(self, edges: dict[str, tuple[float, ...]]) -> None:
        self._edges = [np.asarray(edges[k], np.float64) for k in SIGNALS]
        self.sizes = [len(e) + 1 for e in self._edges]
        self.width = max(self.sizes)

    def statistic_counts(self, statistics: np.ndarray) -> np.ndarray:
        """Bin counts ``[6, width]`` of input ``statistics`` ``[M, 6]`` (unused tail bins of
        a statistic with fewer edges stay 0)."""
        counts = np.zeros((len(STATISTICS), self.width), np.int64)
        for j, column in enumerate(statistics.T):
            bins = np.searchsorted(self._edges[j], column)  # side="left": le
            counts[j, : self.sizes[j]] = np.bincount(bins, minlength=self.sizes[j])
        return counts

    def answer_counts(self, by_class: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """Bin counts ``[2, width]`` (confidence, digit) of the answers whose probabilities
        are ``by_class`` ``[10, N]`` (one row per class), and the sums of their confidences
        and digits. The digit is argmax's (a tie goes to the first class); a NaN confidence
        counts as 0."""
        n = by_class.shape[1]
        # along the 10 rows, not along each answer's 10 columns: numpy reduces a short inner
        # axis one answer at a time, several times slower than argmax over [N, 10]
        confidence = np.maximum.reduce(by_class, axis=0)
        is_top = by_class == confidence
        if np.count_nonzero(is_top) == n and not np.isnan(confidence).any():  # one top each
            digits = np.fromiter(map(np.count_nonzero, is_top), np.int64, len(by_class))
            confidence_sum = float(confidence.sum())
        else:  # a tie, or a NaN: argmax's reading, answer by answer
            digits = np.bincount(by_class.argmax(axis=0), minlength=len(by_class))
            confidence_sum = float(np.nansum(confidence))  # NaN: confidence 0, its lowest bin
        exact = confidence.astype(np.float64)  # the edges' own precision, as searchsorted's
        above = [np.count_nonzero(exact > edge) for edge in self._edges[len(STATISTICS)]]
        counts = np.zeros((2, self.width), np.int64)
        counts[0, : len(above) + 1] = -np.diff([n, *above, 0])  # le: at an edge is below it
        counts[1, : len(digits)] = digits
        return counts, [confidence_sum, float(digits @ np.arange(len(digits)))]


def psi(counts: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of live bin ``counts`` against ``reference`` shares."""
    live = (counts + _SMOOTHING) / (counts.sum() + _SMOOTHING * len(counts))
    ref = np.maximum(reference, _FLOOR)
    ref = ref / ref.sum()
    return float(np.sum((live - ref) * np.log(live / ref)))


class VersionMonitor:
    """The signals of one loaded version: cumulative counts and a sliding window.

    :meth:`observe` runs on the batcher thread once per batch and only copies: every answer's
    probabilities, laid out by class (``[10, N]``: the digits and confidences are then
    reductions along ten long rows), and up to ``SAMPLE_PER_BATCH`` of the batch's images,
    into buffers. The numpy work runs once a buffer is full (the answers and the images each
    at their own), when the window moves on, and at scrape time (:meth:`snapshot`,
    :meth:`window`), over thousands of answers at once: about 25 ns per answer plus 2 us per
    sampled image, instead of the ~40 us a batch of any size would cost computed alone. A
    lock keeps the buffers and counts whole between the batcher and the metrics thread.
    """

    PROBABILITY_ROWS = 4096  # answers buffered before they are counted
    IMAGE_ROWS = 1024  # sampled images buffered before their statistics are computed
    SAMPLE_PER_BATCH = 4  # images of a batch whose input statistics are computed

    def __init__(
        self, model: str, version: int, profile: Profile, window_seconds: float,
        payload_log: PayloadLog | None = None,
    ) -> None:  # fmt: skip
        self.model = model
        self.version = str(version)
        self.labels = (model, self.version)  # its series' model and version labels
        self.profile = profile
        self.binning = Binning(profile.edges)
        n, width = len(SIGNALS), self.binning.width
        self.totals = np.zeros((n, width), np.int64)
        self.sums = np.zeros(n)
        self._slot_seconds = window_seconds / WINDOW_SLOTS
        self._window = np.zeros((WINDOW_SLOTS, n, width), np.int64)
        self._slot_ids = np.full(WINDOW_SLOTS, -1, np.int64)
        self._slot = -1  # the slot the buffered rows belong to
        self._reference = [np.asarray(profile.shares[k]) for k in SIGNALS]
        self.low_bins = CONFIDENCE_EDGES.index(LOW_CONFIDENCE) + 1
        self._by_class = np.empty((NUM_CLASSES, self.PROBABILITY_ROWS), np.float32)
        self._images = np.empty((self.IMAGE_ROWS, 28, 28), np.uint8)
        self._answers = 0  # rows buffered
        self._sampled = 0
        self.lock = threading.Lock()
        self.payload_log = payload_log

    def observe(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        """Count one batch (uint8 images ``[N, 28, 28]``, their probabilities ``[N, 10]``)."""
        n = len(images)
        sample = images[:: max(1, n // self.SAMPLE_PER_BATCH)][: self.SAMPLE_PER_BATCH]
        slot = int(time.monotonic() / self._slot_seconds)
        with self.lock:
            if slot != self._slot:
                self._flush()
                self._slot = slot
            if self._answers + n > self.PROBABILITY_ROWS:
                self._count_answers()
            if n > self.PROBABILITY_ROWS:  # larger than the buffer: counted at once
                self._count_answers(np.ascontiguousarray(probabilities.T))
            else:
                self._by_class[:, self._answers : self._answers + n] = probabilities.T
                self._answers += n
            if self._sampled + len(sample) > self.IMAGE_ROWS:
                self._count_images()
            self._images[self._sampled : self._sampled + len(sample)] = sample
            self._sampled += len(sample)
        if self.payload_log is not None:
            self.payload_log.sample(self.model, self.version, images, probabilities)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The cumulative bin counts and sums, with what is buffered counted first (the
        metrics thread, at scrape time)."""
        with self.lock:
            self._flush()
            return self.totals.copy(), self.sums.copy()

    def _flush(self) -> None:
        """Count what is buffered. Under the lock."""
        if self._answers:
            self._count_answers()
        if self._sampled:
            self._count_images()

    def _count_answers(self, by_class: np.ndarray | None = None) -> None:
        """Bin each answer's digit and confidence: of probabilities ``by_class`` ``[10, N]``,
        by default the buffered ones (then emptied). Under the lock."""
        if by_class is None:
            by_class, self._answers = self._by_class[:, : self._answers], 0
        counts, sums = self.binning.answer_counts(by_class)
        self._add(slice(len(STATISTICS), None), counts, sums)

    def _count_images(self) -> None:
        """Bin the buffered sampled images' input statistics, then empty the buffer. Under
        the lock."""
        statistics = image_statistics(self._images[: self._sampled])
        self._sampled = 0
        counts = self.binning.statistic_counts(statistics)
        self._add(slice(None, len(STATISTICS)), counts, statistics.sum(axis=0))

    def _add(self, signals: slice, counts: np.ndarray, sums: Any) -> None:
        """Add some ``signals``' bin counts and sums to the totals and to the window slot of
        the buffered rows. Under the lock."""
        self.totals[signals] += counts
        self.sums[signals] += sums
        at = self._slot % WINDOW_SLOTS
        if self._slot_ids[at] != self._slot:
            self._window[at] = 0
            self._slot_ids[at] = self._slot
        self._window[at, signals] += counts

    def window(self) -> np.ndarray:
        """Bin counts over the sliding window."""
        now = int(time.monotonic() / self._slot_seconds)
        with self.lock:
            self._flush()
            live = self._slot_ids > now - WINDOW_SLOTS
            return self._window[live].sum(axis=0)

    def drift(self) -> tuple[dict[str, float], float, int]:
        """PSI per signal over the window, the low-confidence share, the window's answers
        (no PSI while the window holds fewer than ``MIN_WINDOW_IMAGES`` answers or sampled
        images)."""
        counts = self.window()
        answers = int(counts[SIGNALS.index("digit")].sum())
        sampled = int(counts[0].sum())
        confidence = counts[SIGNALS.index("confidence")]
        low = float(confidence[: self.low_bins].sum() / answers) if answers else 0.0
        if min(answers, sampled) < MIN_WINDOW_IMAGES:
            return {}, low, answers
        scores = {
            name: psi(counts[j, : self.binning.sizes[j]], self._reference[j])
            for j, name in enumerate(SIGNALS)
        }
        return scores, low, answers


class ModelMonitoring:
    """The server's model-quality monitoring: a :class:`VersionMonitor` for each loaded
    version that has a profile, and the Prometheus collector of all of them (registered in
    the server's registry once)."""

    def __init__(self, window_seconds: float, payload_log: PayloadLog | None = None) -> None:
        self.window_seconds = window_seconds
        self.payload_log = payload_log
        self.versions: dict[tuple[str, str], VersionMonitor] = {}  # by (model, version)
        self.unmonitored: set[tuple[str, str]] = set()

    def start(self, model: str, version: int, profile: Profile | None) -> VersionMonitor | None:
        """A version of ``model`` is loaded: its monitor, or None when it has no profile."""
        if profile is None:
            log.warning(
                "version %d of model '%s' has no %s (exported before model monitoring): it "
                "serves without model-quality metrics",
                version, model, PROFILE_FILE,
            )  # fmt: skip
            self.unmonitored.add((model, str(version)))
            return None
        monitor = VersionMonitor(model, version, profile, self.window_seconds, self.payload_log)
        self.versions[monitor.labels] = monitor
        return monitor

    def stop(self, model: str, version: int) -> None:
        """A version no longer serves: its series go with it."""
        self.versions.pop((model, str(version)), None)
        self.unmonitored.discard((model, str(version)))

    def close(self) -> None:
        if self.payload_log is not None:
            self.payload_log.close()

    def describe(self) -> list[Metric]:
        return []  # families appear with the first loaded version

    def collect(self) -> Iterator[Metric]:
        monitored = GaugeMetricFamily(
            "mnist_model_monitored",
            "1 when the version has a reference profile (model-quality metrics), else 0.",
            labels=["model", "version"],
        )
        for labels in sorted(self.unmonitored):
            monitored.add_metric(list(labels), 0)
        monitors = sorted(self.versions.values(), key=lambda m: (m.model, int(m.version)))
        for monitor in monitors:
            monitored.add_metric(list(monitor.labels), 1)
        yield monitored
        if self.payload_log is not None:
            records = CounterMetricFamily(
                "mnist_payload_log_records",
                "Sampled requests for the payload log: written, or dropped (writer behind).",
                labels=["result"],
            )
            records.add_metric(["written"], self.payload_log.written)
            records.add_metric(["dropped"], self.payload_log.dropped)
            yield records
        if not monitors:
            return
        yield from self._cumulative(monitors)
        yield from self._windowed(monitors)

    @staticmethod
    def _cumulative(monitors: list[VersionMonitor]) -> Iterator[Metric]:
        digits = CounterMetricFamily(
            "mnist_predictions",
            "Answers given, by predicted digit.",
            labels=["model", "version", "digit"],
        )
        reference = GaugeMetricFamily(
            "mnist_reference_digit_share",
            "Share of each predicted digit on the reference (the training run's test set).",
            labels=["model", "version", "digit"],
        )
        histograms = {
            name: HistogramMetricFamily(
                f"mnist_{'prediction' if name == 'confidence' else 'input'}_{name}",
                _HISTOGRAM_HELP[name],
                labels=["model", "version"],
            )
            for name in (*STATISTICS, "confidence")
        }
        for m in monitors:
            totals, sums = m.snapshot()
            digit = SIGNALS.index("digit")
            for d in range(10):
                digits.add_metric([*m.labels, str(d)], float(totals[digit, d]))
                reference.add_metric([*m.labels, str(d)], m.profile.shares["digit"][d])
            for name, family in histograms.items():
                j = SIGNALS.index(name)
                cumulative = np.cumsum(totals[j, : m.binning.sizes[j]])
                les = [*map(_le, m.profile.edges[name]), "+Inf"]
                buckets = [(le, float(c)) for le, c in zip(les, cumulative, strict=True)]
                family.add_metric(list(m.labels), buckets, float(sums[j]))
        yield digits
        yield reference
        yield from histograms.values()

    @staticmethod
    def _windowed(monitors: list[VersionMonitor]) -> Iterator[Metric]:
        per_signal = GaugeMetricFamily(
            "mnist_drift_psi",
            "Population stability index of each signal over the drift window against the "
            "reference (absent while the window holds too few images).",
            labels=["model", "version", "signal"],
        )
        score = GaugeMetricFamily(
            "mnist_drift_score",
            f"The largest mnist_drift_psi of the version; above {DRIFT_THRESHOLD}: drift.",
            labels=["model", "version"],
        )
        low = GaugeMetricFamily(
            "mnist_low_confidence_share",
            f"Share of answers over the drift window with confidence <= {LOW_CONFIDENCE}.",
            labels=["model", "version"],
        )
        low_reference = GaugeMetricFamily(
            "mnist_reference_low_confidence_share",
            f"The same share on the reference (confidence <= {LOW_CONFIDENCE}).",
            labels=["model", "version"],
        )
        window = GaugeMetricFamily(
            "mnist_drift_window_images", "Images in the drift window.", labels=["model", "version"]
        )
        for m in monitors:
            scores, low_share, images = m.drift()
            for name, value in scores.items():
                per_signal.add_metric([*m.labels, name], value)
            if scores:
                score.add_metric(list(m.labels), max(scores.values()))
            low.add_metric(list(m.labels), low_share)
            low_reference.add_metric(
                list(m.labels), sum(m.profile.shares["confidence"][: m.low_bins])
            )
            window.add_metric(list(m.labels), images)
        yield from (per_signal, score, low, low_reference, window)


_HISTOGRAM_HELP = {
    "mean_intensity": "Mean pixel intensity (0-1) of the images received.",
    "ink_share": "Share of an image's pixels over half intensity.",
    "center_row": "Row of an image's centre of mass (pixels from the top).",
    "center_col": "Column of an image's centre of mass (pixels from the left).",
    "spread_row": "Standard deviation of an image's ink along the rows (pixels).",
    "spread_col": "Standard deviation of an image's ink along the columns (pixels).",
    "confidence": "Probability of the predicted digit (top-1 confidence).",
}


def _le(edge: float) -> str:
    return repr(float(edge))


class PayloadLog:
    """Sampled request logging to rotating JSON-lines files, off the request path.

    The batcher thread picks ``percent`` % of the images at random and queues one record
    each; a thread of ``logging``'s ``QueueListener`` writes them to ``dir/payloads.jsonl``,
    rotated at ``max_bytes / 5`` with 4 older files kept (``RotatingFileHandler``). When the
    writer falls behind, records are dropped and counted (``dropped``), never waited for.
    """

    QUEUE_RECORDS = 10_000

    def __init__(
        self, folder: Path, percent: float, raw_images: bool = False,
        max_bytes: int = 100 * 1024 * 1024, seed: int | None = None,
    ) -> None:  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        self.share = percent / 100.0
        self.raw_images = raw_images
        self.dropped = 0
        self.written = 0
        self._rng = np.random.default_rng(seed)
        self._queue: queue.Queue[logging.LogRecord] = queue.Queue(self.QUEUE_RECORDS)
        handler = logging.handlers.RotatingFileHandler(
            folder / "payloads.jsonl", maxBytes=max(1, max_bytes // 5), backupCount=4
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()

    def sample(
        self, model: str, version: str, images: np.ndarray, probabilities: np.ndarray
    ) -> None:
        """Queue a record for each sampled image of a batch (batcher thread; never blocks)."""
        chosen = np.flatnonzero(self._rng.random(len(images)) < self.share)
        if not len(chosen):
            return
        now = time.time()
        values = signals(images[chosen], probabilities[chosen])
        for row, i in enumerate(chosen):
            record: dict[str, Any] = {
                "time": round(now, 6),
                "model": model,
                "version": int(version),
                "image_sha256": hashlib.sha256(images[i].tobytes()).hexdigest(),
                "digit": int(values[row, -1]),
                "confidence": round(float(values[row, -2]), 6),
                "statistics": {
                    name: round(float(values[row, j]), 6) for j, name in enumerate(STATISTICS)
                },
            }
            if self.raw_images:
                record["image"] = base64.b64encode(images[i].tobytes()).decode()
            line = json.dumps(record)
            entry = logging.LogRecord("payload", logging.INFO, "", 0, line, None, None)
            try:
                self._queue.put_nowait(entry)
                self.written += 1
            except queue.Full:
                self.dropped += 1

    def close(self) -> None:
        """Write what is queued, then stop the writer thread."""
        self._listener.stop()
