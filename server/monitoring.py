"""Model-quality monitoring: what each model version is asked and what it answers, against the
reference profile its training wrote (``profile.json``), in Prometheus.

Eight signals per image, computed for thousands of answers at once on a thread of their own
(a dozen numpy calls, no Python loop over images; ``VersionMonitor`` says how):

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
from collections.abc import Callable, Iterator
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
        # (one call per class row: count_nonzero along an axis is four times slower)
        digits = np.fromiter(map(np.count_nonzero, by_class == confidence), np.int64, len(by_class))
        if digits.sum() == n and not np.isnan(confidence).any():  # one top class each
            confidence_sum = float(confidence.sum())
        else:  # a tie, or a NaN: argmax's reading, answer by answer
            digits = np.bincount(by_class.argmax(axis=0), minlength=len(by_class))
            confidence = np.nan_to_num(confidence, nan=0.0)  # its lowest bin
            confidence_sum = float(confidence.sum())
        edges = _below(self._edges[len(STATISTICS)], confidence.dtype)
        above = np.fromiter(
            map(np.count_nonzero, confidence > edges[:, None]), np.int64, len(edges)
        )
        counts = np.zeros((2, self.width), np.int64)
        counts[0, : len(edges) + 1] = -np.diff([n, *above, 0])  # le: at an edge is below it
        counts[1, : len(digits)] = digits
        return counts, [confidence_sum, float(digits @ np.arange(len(digits)))]


def _below(edges: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``edges`` in ``dtype``, each rounded down: a value of that dtype is then above one
    exactly when it is above the float64 edge (float32 comparisons, float64's buckets)."""
    if dtype == edges.dtype:
        return edges
    rounded = edges.astype(dtype)
    return np.where(rounded > edges, np.nextafter(rounded, dtype.type(-np.inf)), rounded)


def psi(counts: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of live bin ``counts`` against ``reference`` shares."""
    live = (counts + _SMOOTHING) / (counts.sum() + _SMOOTHING * len(counts))
    ref = np.maximum(reference, _FLOOR)
    ref = ref / ref.sum()
    return float(np.sum((live - ref) * np.log(live / ref)))


@dataclass
class Kept:
    """What a monitor hands over to be counted, all of one window slot."""

    slot: int
    answers: np.ndarray | None  # a buffer of answers' probabilities, [ANSWER_ROWS, 10]
    rows: int  # the answers in it
    samples: list[np.ndarray]  # copies of sampled images, [k, 28, 28] each


class Counting:
    """The thread that counts the monitors' buffers, off the batcher threads.

    A batcher thread only copies a batch's answers and a sampled image or so into its
    monitor's buffers; every 16,384 answers the monitor hands the lot to this thread, so the
    numpy work runs beside the next model call instead of between two. When this thread
    is ``BACKLOG`` hand-overs behind (the CPU is short), the batcher counts its own: slower,
    never dropped.
    """

    BACKLOG = 64

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[VersionMonitor, Kept] | None] = queue.Queue(self.BACKLOG)
        self._closed = False
        self._closing = threading.Lock()  # nothing is queued behind the thread's last item
        self.cpu_seconds = 0.0  # this thread's CPU time counting: what monitoring costs
        self._thread = threading.Thread(target=self._run, name="mnist-monitoring", daemon=True)
        self._thread.start()

    def submit(self, monitor: VersionMonitor, kept: Kept) -> None:
        """Count ``kept`` on this thread, or on the caller's when it is behind or closed."""
        with self._closing:
            if not self._closed:
                try:
                    self._queue.put_nowait((monitor, kept))
                    return
                except queue.Full:
                    pass
        monitor.count(kept)

    def wait(self) -> None:
        """Return once everything handed over so far is counted."""
        self._queue.join()

    def close(self) -> None:
        """Count what is queued, then stop the thread (later hand-overs count on the
        caller's)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            started = time.thread_time()
            try:
                item[0].count(item[1])
            except Exception:  # a bug here must not stop the counting of later batches
                log.exception("model monitoring: counting a buffer failed")
            finally:
                self.cpu_seconds += time.thread_time() - started
                self._queue.task_done()
        self._queue.task_done()


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate`` through bytes: numpy lets go of the GIL once per piece, and a
    busy event loop makes each take back a wait; ``tobytes`` copies holding it."""
    data = b"".join(a.tobytes() for a in arrays)
    return np.frombuffer(data, arrays[0].dtype).reshape(-1, *arrays[0].shape[1:])


class VersionMonitor:
    """The signals of one loaded version: cumulative counts and a sliding window.

    :meth:`observe` runs on the batcher thread once per batch and only copies: the batch's
    probabilities into a buffer (float32, as the models give them), and a sample of its
    images (every image at low rates; at high ones every k-th image of the window slot, k
    set from the slot before so that about ``SAMPLE_PER_WINDOW`` are sampled a window,
    evenly over time; at most ``SAMPLE_PER_BATCH`` of one batch and a slot's share of the
    window's). Once ``ANSWER_ROWS`` answers or ``SAMPLE_ROWS`` images are kept, when the
    window moves on, and at scrape time (:meth:`snapshot`, :meth:`window`), what is kept is
    counted at once, by ``counting``'s thread when there is one (:meth:`count`): about 20 ns
    per answer and 2 us per sampled image on an idle core, several times that beside a busy
    event loop, instead of the ~40 us a batch of any size would cost counted alone.
    """

    ANSWER_ROWS = 16384  # answers kept before they are counted
    SAMPLE_ROWS = 1024  # sampled images kept before they are counted
    SAMPLE_PER_WINDOW = 12_000  # images whose input statistics are computed, about, per window
    SAMPLE_PER_BATCH = 4  # and at most this many of one batch

    def __init__(
        self, model: str, version: int, profile: Profile, window_seconds: float,
        payload_log: PayloadLog | None = None, counting: Counting | None = None,
        clock: Callable[[], float] = time.monotonic,
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
        self._reference = [np.asarray(profile.shares[k]) for k in SIGNALS]
        self.low_bins = CONFIDENCE_EDGES.index(LOW_CONFIDENCE) + 1
        self._slot = -1  # the window slot of what is kept
        self._spare: list[np.ndarray] = []  # answer buffers counted, to fill again
        self._answers = self._answer_buffer()  # the slot's answers not yet counted
        self._answer_rows = 0
        self._samples: list[np.ndarray] = []  # and its sampled images
        self._sample_rows = 0
        self._slot_images = 0  # images observed in the slot
        self._slot_sampled = 0  # and sampled
        self._slot_budget = -(-self.SAMPLE_PER_WINDOW // WINDOW_SLOTS)  # at most, a slot
        self._stride = 1  # every stride-th image of the slot is sampled
        self.lock = threading.Lock()  # what is kept (batcher thread, scrape)
        self._counts_lock = threading.Lock()  # the totals and the window (counting, scrape)
        self.payload_log = payload_log
        self.counting = counting
        self._clock = clock

    def observe(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        """Count one batch (uint8 images ``[N, 28, 28]``, their probabilities ``[N, 10]``).

        Copies only, holding the GIL (a numpy copy this small does not let go of it): the
        answers into a buffer, a sampled image or so."""
        n = len(images)
        slot = int(self._clock() / self._slot_seconds)
        handed: list[Kept] = []
        with self.lock:
            if slot != self._slot:
                handed.append(self._take(samples=True))
                self._stride = self._sample_stride(self._slot_images)
                self._slot, self._slot_images, self._slot_sampled = slot, 0, 0
            first = -self._slot_images % self._stride  # every stride-th image of the slot
            room = min(self.SAMPLE_PER_BATCH, self._slot_budget - self._slot_sampled)
            sample = images[first :: self._stride][: max(room, 0)]
            self._slot_images += n
            if len(sample):  # a copy: a view would keep the whole batch alive
                self._samples.append(sample.copy())
                self._sample_rows += len(sample)
                self._slot_sampled += len(sample)
            done = 0
            while done < n:
                take = min(n - done, self.ANSWER_ROWS - self._answer_rows)
                self._answers[self._answer_rows : self._answer_rows + take] = probabilities[
                    done : done + take
                ]
                self._answer_rows += take
                done += take
                if self._answer_rows == self.ANSWER_ROWS:  # the images wait for more
                    handed.append(self._take(samples=self._sample_rows >= self.SAMPLE_ROWS))
            if self._sample_rows >= self.SAMPLE_ROWS:
                handed.append(self._take(samples=True))
        for kept in handed:
            self._hand_over(kept)
        if self.payload_log is not None:
            self.payload_log.sample(self.model, self.version, images, probabilities)

    def _answer_buffer(self) -> np.ndarray:
        """A counted buffer again, else a new one: a new one is a fresh memory map (the
        server's allocator maps large blocks), whose first writes fault page by page on the
        batcher thread (6 us a batch of 256)."""
        try:
            return self._spare.pop()
        except IndexError:
            return np.empty((self.ANSWER_ROWS, NUM_CLASSES), np.float32)

    def _take(self, samples: bool) -> Kept:
        """The kept answers (and the sampled images, with ``samples``), and keep none. Under
        the lock."""
        answers, rows = (self._answers, self._answer_rows) if self._answer_rows else (None, 0)
        if answers is not None:
            self._answers, self._answer_rows = self._answer_buffer(), 0
        taken: list[np.ndarray] = []
        if samples:
            taken, self._samples, self._sample_rows = self._samples, [], 0
        return Kept(self._slot, answers, rows, taken)

    def _sample_stride(self, last_slot_images: int) -> int:
        """Sample every how-many-th image in a slot: as many as the last slot had, over the
        share of ``SAMPLE_PER_WINDOW`` a slot gets (at least every image)."""
        return max(1, -(-last_slot_images * WINDOW_SLOTS // self.SAMPLE_PER_WINDOW))

    def _hand_over(self, kept: Kept) -> None:
        if kept.answers is None and not kept.samples:
            return
        if self.counting is None:
            self.count(kept)
        else:
            self.counting.submit(self, kept)

    def flush(self) -> None:
        """Count every batch observed so far (at scrape time; waits for the counting
        thread)."""
        with self.lock:
            kept = self._take(samples=True)
        self._hand_over(kept)
        if self.counting is not None:
            self.counting.wait()

    def count(self, kept: Kept) -> None:
        """Bin the kept answers and sampled images' statistics into the totals and the
        window, in a dozen large numpy calls: each lets go of the GIL, and taking it back
        can wait for the event loop's thread (milliseconds when it is busy)."""
        n = len(STATISTICS)
        counts = np.zeros_like(self.totals)
        sums = np.zeros_like(self.sums)
        if kept.answers is not None:
            by_class = np.ascontiguousarray(kept.answers[: kept.rows].T)  # one GIL release
            if len(self._spare) < 2:  # read: the batcher may fill it again
                self._spare.append(kept.answers)
            counts[n:], sums[n:] = self.binning.answer_counts(by_class)
        if kept.samples:
            statistics = image_statistics(_stack(kept.samples))
            counts[:n], sums[:n] = self.binning.statistic_counts(statistics), statistics.sum(0)
        at = kept.slot % WINDOW_SLOTS
        with self._counts_lock:
            self.totals += counts
            self.sums += sums
            if self._slot_ids[at] > kept.slot:  # counted after the window moved past its slot
                return
            if self._slot_ids[at] != kept.slot:
                self._window[at] = 0
                self._slot_ids[at] = kept.slot
            self._window[at] += counts

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The cumulative bin counts and sums of every batch observed so far."""
        self.flush()
        with self._counts_lock:
            return self.totals.copy(), self.sums.copy()

    def window(self) -> np.ndarray:
        """Bin counts over the sliding window."""
        self.flush()
        now = int(self._clock() / self._slot_seconds)
        with self._counts_lock:
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
        self.counting: Counting | None = None  # started with the first monitored version

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
        if self.counting is None:
            self.counting = Counting()
        monitor = VersionMonitor(
            model, version, profile, self.window_seconds, self.payload_log, self.counting
        )
        self.versions[monitor.labels] = monitor
        return monitor

    def stop(self, model: str, version: int) -> None:
        """A version no longer serves: its series go with it."""
        self.versions.pop((model, str(version)), None)
        self.unmonitored.discard((model, str(version)))

    def close(self) -> None:
        if self.counting is not None:
            self.counting.close()
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
        if monitors:
            yield from self._cumulative(monitors)  # (counting what the monitors still hold)
            yield from self._windowed(monitors)
        if self.counting is not None:
            yield CounterMetricFamily(
                "mnist_monitoring_cpu_seconds",
                "CPU time the monitoring's counting thread spent binning answers and images "
                "(compare with process_cpu_seconds_total).",
                value=self.counting.cpu_seconds,
            )

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
