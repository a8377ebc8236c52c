"""Model-quality monitoring: the statistics, the profile, the drift score and its alert (a real
server and a real Prometheus evaluating the shipped alert rules), and the payload log."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mnist_client import DigitClient
from server.monitoring import (
    CONFIDENCE_EDGES,
    DRIFT_THRESHOLD,
    MIN_WINDOW_IMAGES,
    PROFILE_FILE,
    SIGNALS,
    STATISTICS,
    WINDOW_SLOTS,
    Counting,
    Kept,
    ModelMonitoring,
    PayloadLog,
    Profile,
    VersionMonitor,
    image_statistics,
    psi,
)
from tests.conftest import ROOT, ServerProcess, prometheus_query, run_prometheus, start_server


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test images (the reference) and the first 20,000 training images (clean traffic)."""
    from training.data import load_idx_dir

    data = load_idx_dir(mnist_dir)
    return data.x_test, data.x_train[:20000]


def _probabilities(images: np.ndarray) -> np.ndarray:
    """A stand-in model (no TensorFlow): confident, and a function of the image, so that
    changed images change the answers too."""
    rows = images.reshape(len(images), -1).astype(np.float32)
    logits = rows[:, ::78][:, :10] / 16.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_image_statistics_of_known_images() -> None:
    blank = np.zeros((28, 28), np.uint8)
    dot = blank.copy()
    dot[5, 20] = 255
    bar = blank.copy()
    bar[4:24, 13] = 200  # a vertical stroke: spread along the rows only
    stats = image_statistics(np.stack([blank, dot, bar]))
    assert stats.shape == (3, len(STATISTICS))
    np.testing.assert_allclose(stats[0], 0.0)
    np.testing.assert_allclose(stats[1], [255 / (784 * 255), 1 / 784, 5, 20, 0, 0], atol=1e-6)
    mean, ink, row, col, spread_row, spread_col = stats[2]
    assert ink == pytest.approx(20 / 784) and mean == pytest.approx(20 * 200 / (784 * 255))
    assert row == pytest.approx(13.5) and col == pytest.approx(13.0)
    assert spread_row == pytest.approx(np.arange(4, 24).std(), rel=1e-4) and spread_col < 1e-3


def test_answers_are_binned_as_argmax_and_le_buckets_read_them() -> None:
    """The answers' bins, computed along the class rows, against the plain reading: argmax's
    digit (a tie goes to the first class; a NaN row, to its NaN) and the confidence's
    Prometheus bucket (``le``: a value at an edge is in the bucket below it, compared at the
    edge's float64 precision; a NaN confidence counts as 0)."""
    rng = np.random.default_rng(7)
    probabilities = rng.dirichlet(np.full(10, 0.3), 3000).astype(np.float32)
    probabilities[:8] = np.float32(0.1)  # ten-way ties
    probabilities[8] = np.float32(0.01)
    probabilities[8, [2, 7]] = np.float32(0.9)  # a two-way tie above the rest
    probabilities[9, 4] = np.nan
    for row, edge in enumerate(CONFIDENCE_EDGES):  # tops at an edge, and just over it
        probabilities[10 + 2 * row] = [edge, *[0.0] * 9]
        probabilities[11 + 2 * row] = [np.nextafter(np.float32(edge), np.float32(1)), *[0.0] * 9]
    monitor = VersionMonitor("m", 1, Profile.build(np.zeros((10, 28, 28), np.uint8),
                                                   np.eye(10, dtype=np.float32)), 60)  # fmt: skip
    for parts in (1, 7):  # one buffer, and batches of several sizes
        monitor.totals[:] = 0
        for part in np.array_split(probabilities, parts):
            monitor.observe(np.zeros((len(part), 28, 28), np.uint8), part)
        totals, _ = monitor.snapshot()
        digits = probabilities.argmax(axis=1)
        tops = probabilities[np.arange(len(probabilities)), digits].astype(np.float64)
        confidence_bins = np.searchsorted(CONFIDENCE_EDGES, tops)  # NaN: the last bucket
        confidence_bins[np.isnan(tops)] = 0
        np.testing.assert_array_equal(totals[-1, :10], np.bincount(digits, minlength=10))
        np.testing.assert_array_equal(totals[-2, :11], np.bincount(confidence_bins, minlength=11))
        assert totals[-1, 4] >= 1 and totals[-1, 0] >= 8 and totals[-1, 2] >= 1


def test_the_profile_bins_the_reference_in_tenths_and_reads_back(
    mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    reference, _ = mnist
    profile = Profile.build(reference, _probabilities(reference))
    for name in STATISTICS:  # deciles: every bin about a tenth of the reference
        assert len(profile.shares[name]) == len(profile.edges[name]) + 1
        assert max(abs(share - 0.1) for share in profile.shares[name]) < 0.02, name
    assert profile.edges["confidence"] == CONFIDENCE_EDGES and len(profile.shares["digit"]) == 10
    for name in SIGNALS:
        assert sum(profile.shares[name]) == pytest.approx(1.0, abs=1e-4)
    (tmp_path / PROFILE_FILE).write_text(json.dumps(profile.to_json()))
    assert Profile.read(tmp_path) == profile
    (tmp_path / PROFILE_FILE).write_text(json.dumps({"format": 99, "signals": {}}))
    with pytest.raises(ValueError, match="not a format-1 profile"):
        Profile.read(tmp_path)


def test_the_alert_rules_use_the_servers_thresholds() -> None:
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    assert f"max by (instance, model, version) (mnist_drift_score) > {DRIFT_THRESHOLD}" in rules
    assert f"mnist_drift_window_images >= {MIN_WINDOW_IMAGES}" in rules


def test_psi_is_zero_for_the_reference_and_large_for_a_shift() -> None:
    reference = np.full(10, 0.1)
    assert psi(np.full(10, 1000), reference) == pytest.approx(0.0, abs=1e-6)
    shifted = np.array([0, 0, 0, 0, 0, 0, 0, 0, 500, 500])
    assert psi(shifted, reference) > 3


def _bad_kinds(x: np.ndarray) -> dict[str, np.ndarray]:
    """What a caller might send by mistake, made from clean images ``x``."""
    return {
        "inverted": 255 - x,
        "rotated": np.rot90(x, axes=(1, 2)).copy(),
        "noise": np.random.default_rng(0).integers(0, 256, x.shape, dtype=np.uint8),
        "blank": np.zeros_like(x),
    }


class _Clock:
    """A clock the test moves (the monitor's window slots follow it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _monitor(
    reference: np.ndarray, window_seconds: float = 60, clock: Callable[[], float] = time.monotonic
) -> VersionMonitor:
    profile = Profile.build(reference, _probabilities(reference))
    return VersionMonitor("mnist", 3, profile, window_seconds, clock=clock)


def _feed(monitor: VersionMonitor, images: np.ndarray, batch: int = 4) -> None:
    for i in range(0, len(images), batch):
        part = images[i : i + batch]
        monitor.observe(part, _probabilities(part))


def test_clean_traffic_scores_low_and_each_kind_of_bad_input_scores_high(
    mnist: tuple[np.ndarray, np.ndarray],
) -> None:
    """The threshold against what it must tell apart: clean windows of training images (never
    part of the reference) stay far below it; inverted, rotated, noise and blank images are
    far above."""
    reference, clean = mnist
    rng = np.random.default_rng(0)
    clean_scores = []
    for _ in range(20):
        monitor = _monitor(reference)
        _feed(monitor, clean[rng.choice(len(clean), 1000, replace=False)])
        scores, _, answers = monitor.drift()
        assert answers == 1000
        clean_scores.append(max(scores.values()))
    assert max(clean_scores) < DRIFT_THRESHOLD / 3, clean_scores
    for name, images in _bad_kinds(clean[:1000]).items():
        monitor = _monitor(reference)
        _feed(monitor, images)
        scores, _, _ = monitor.drift()
        assert max(scores.values()) > 4 * DRIFT_THRESHOLD, (name, scores)


def test_the_window_forgets_and_needs_enough_images(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    reference, clean = mnist
    clock = _Clock()
    monitor = _monitor(reference, window_seconds=60, clock=clock)  # 6 slots of 10 s
    _feed(monitor, clean[: MIN_WINDOW_IMAGES - 16])
    scores, _, answers = monitor.drift()
    assert scores == {} and answers == MIN_WINDOW_IMAGES - 16  # too few for a score
    clock.now += 10  # the next slot
    _feed(monitor, 255 - clean[:400])
    assert max(monitor.drift()[0].values()) > 1
    clock.now += 50  # the first slot has left the window, the second not yet
    assert monitor.drift()[2] == 400
    clock.now += 10  # the window has moved past every image
    assert monitor.drift() == ({}, 0.0, 0)
    assert int(monitor.totals[SIGNALS.index("digit")].sum()) == MIN_WINDOW_IMAGES - 16 + 400


def test_the_input_statistics_sample_a_bounded_even_share_at_high_rates() -> None:
    """Every image is counted as an answer; the input statistics (2 us an image) take every
    image at low rates, at most ``SAMPLE_PER_BATCH`` of a batch and a slot's share of
    ``SAMPLE_PER_WINDOW`` (a burst after a quiet slot), and at high rates every k-th image
    of a slot, k set from the slot before so that about that share is sampled, evenly over
    the slot rather than its first images."""
    clock = _Clock()
    blank = np.zeros((256, 28, 28), np.uint8)
    monitor = VersionMonitor("m", 1, Profile.build(blank, _probabilities(blank)), 60,
                             clock=clock)  # fmt: skip
    ink = SIGNALS.index("ink_share")
    digit = SIGNALS.index("digit")

    def sampled_in_window() -> int:
        return int(monitor.window()[ink].sum())

    small = blank[:3]
    for _ in range(10):  # a low rate: every image
        monitor.observe(small, _probabilities(small))
    assert sampled_in_window() == 30
    batches, per_slot = 1000, VersionMonitor.SAMPLE_PER_WINDOW // WINDOW_SLOTS
    probabilities = _probabilities(blank)
    for _ in range(batches):  # still the first slot: 4 of each batch, up to the slot's share
        monitor.observe(blank, probabilities)
    assert sampled_in_window() == per_slot
    clock.now += 60  # a new window; the stride comes from 256,030 images in the last slot
    marked = blank.copy()
    marked[::7, 0, 0] = 255  # ink on every 7th image: an even sample sees a 7th of them
    for _ in range(batches):
        monitor.observe(marked, probabilities)
    stride = -(-(30 + 256 * batches) * WINDOW_SLOTS // VersionMonitor.SAMPLE_PER_WINDOW)
    assert sampled_in_window() == pytest.approx(per_slot, rel=0.05)
    assert sampled_in_window() == len(range(0, 256 * batches, stride))
    inked = monitor.window()[ink, 1:].sum()  # over the lowest edge: the marked ones
    assert inked == pytest.approx(sampled_in_window() / 7, rel=0.2)
    assert int(monitor.totals[digit].sum()) == 30 + 2 * 256 * batches  # every answer


def test_counting_off_the_batcher_thread_drops_nothing_when_behind_or_closed() -> None:
    """The counting thread takes hand-overs in order; a batcher that finds it ``BACKLOG``
    behind counts its own, and after ``close`` every hand-over is counted by its caller."""
    blank = np.zeros((8, 28, 28), np.uint8)
    profile = Profile.build(blank, _probabilities(blank))
    counting = Counting()
    monitor = VersionMonitor("m", 1, profile, 60, counting=counting)
    digit = SIGNALS.index("digit")
    stuck, release = threading.Event(), threading.Event()
    counted_on: list[str] = []
    real_count = monitor.count

    def slow_count(kept: Kept) -> None:
        counted_on.append(threading.current_thread().name)
        if threading.current_thread().name == "mnist-monitoring":
            stuck.set()
            release.wait(10)  # the thread is stuck on its first hand-over
        real_count(kept)

    monitor.count = slow_count  # type: ignore[method-assign]
    rows = VersionMonitor.ANSWER_ROWS
    probabilities = _probabilities(np.resize(blank, (rows, 28, 28)))
    images = np.resize(blank, (rows, 28, 28))
    monitor.observe(images, probabilities)  # taken by the thread, which then is stuck
    assert stuck.wait(10)
    for _ in range(Counting.BACKLOG + 2):  # BACKLOG queued behind it, 2 over
        monitor.observe(images, probabilities)
    assert counted_on.count("MainThread") == 2  # counted by the "batcher" itself
    release.set()
    counting.close()
    monitor.observe(images, probabilities)  # after close: on the caller's thread
    assert counted_on.count("MainThread") == 3
    totals, _ = monitor.snapshot()
    assert int(totals[digit].sum()) == (Counting.BACKLOG + 4) * rows  # none dropped


def test_counted_answer_buffers_are_filled_again() -> None:
    """A new buffer is a fresh memory map whose first writes fault page by page on the
    batcher thread: once counted, a buffer is the next one filled."""
    blank = np.zeros((8, 28, 28), np.uint8)
    monitor = VersionMonitor("m", 1, Profile.build(blank, _probabilities(blank)), 60)
    rows = VersionMonitor.ANSWER_ROWS
    images = np.resize(blank, (rows, 28, 28))
    probabilities = _probabilities(images)
    first = monitor._answers
    monitor.observe(images, probabilities)  # full: handed over, counted, kept for reuse
    second = monitor._answers
    monitor.observe(images, probabilities)
    assert second is not first and monitor._answers is first
    totals, _ = monitor.snapshot()
    assert int(totals[SIGNALS.index("digit")].sum()) == 2 * rows


def test_the_exported_metrics_count_every_answer_by_version(
    mnist: tuple[np.ndarray, np.ndarray],
) -> None:
    reference, clean = mnist
    registry = CollectorRegistry()
    monitoring = ModelMonitoring(window_seconds=60)
    registry.register(monitoring)
    profile = Profile.build(reference, _probabilities(reference))
    monitor = monitoring.start("mnist", 3, profile)
    assert monitor is not None and monitoring.start("mnist", 2, None) is None
    images = clean[:1000]
    for size in (1, 7, 64, 300, 5000):  # every batch size, one larger than the buffer
        part = images[:size] if size <= len(images) else np.resize(images, (size, 28, 28))
        monitor.observe(part, _probabilities(part))
    n = 1 + 7 + 64 + 300 + 5000
    samples = _samples(registry)
    v3 = (("model", "mnist"), ("version", "3"))
    assert samples[("mnist_model_monitored", v3)] == 1
    assert samples[("mnist_model_monitored", (("model", "mnist"), ("version", "2")))] == 0
    digits = {k: v for k, v in samples.items() if k[0] == "mnist_predictions_total"}
    assert sum(digits.values()) == n
    expected = np.bincount(
        np.concatenate([_probabilities(np.resize(images, (s, 28, 28))).argmax(1)
                        for s in (1, 7, 64, 300, 5000)]), minlength=10,
    )  # fmt: skip
    for d in range(10):
        assert digits[("mnist_predictions_total", (("digit", str(d)), *v3))] == expected[d]
    assert samples[("mnist_prediction_confidence_count", v3)] == n
    assert samples[("mnist_prediction_confidence_bucket", (("le", "+Inf"), *v3))] == n
    # input statistics: a sample of each batch (SAMPLE_PER_BATCH images, or all of fewer)
    per_batch = VersionMonitor.SAMPLE_PER_BATCH
    assert samples[("mnist_input_mean_intensity_count", v3)] == 1 + 4 * per_batch
    assert samples[("mnist_drift_window_images", v3)] == n
    assert ("mnist_drift_score", v3) not in samples or samples[("mnist_drift_score", v3)] >= 0
    # counted on the monitoring's own thread, whose CPU time is exported
    assert samples[("mnist_monitoring_cpu_seconds_total", ())] > 0
    monitoring.stop("mnist", 3)
    assert not any(dict(k[1]).get("version") == "3" for k in _samples(registry))
    monitoring.close()


def test_the_payload_log_samples_rotates_and_never_blocks(
    mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    _, clean = mnist
    payloads = PayloadLog(tmp_path / "log", 50, raw_images=True, max_bytes=200_000, seed=1)
    images = clean[:2000]
    for i in range(0, len(images), 100):
        part = images[i : i + 100]
        payloads.sample("mnist", "4", part, _probabilities(part))
    payloads.close()
    files = sorted((tmp_path / "log").iterdir())
    assert 1 < len(files) <= 5  # rotated at max_bytes / 5, 4 older files kept
    assert sum(f.stat().st_size for f in files) <= 200_000 + 5 * 4_000
    lines = (tmp_path / "log" / "payloads.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert set(record) == {"time", "model", "version", "image_sha256", "digit", "confidence",
                           "statistics", "image"}  # fmt: skip
    assert (record["model"], record["version"]) == ("mnist", 4)
    assert set(record["statistics"]) == set(STATISTICS)
    assert 800 < payloads.written < 1200 and payloads.dropped == 0  # about half of 2,000

    full = PayloadLog(tmp_path / "full", 100)
    full._listener.stop()  # a writer that has stopped: the queue fills, nothing waits
    many = np.resize(images, (5000, 28, 28))
    for _ in range(3):
        full.sample("mnist", "4", many, _probabilities(many))
    assert full.written == PayloadLog.QUEUE_RECORDS and full.dropped == 3 * 5000 - full.written


def test_a_version_without_a_profile_serves_and_says_so(
    trained_model_dir: Path, tmp_path: Path, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    """A version exported before monitoring existed: it loads and answers, with no quality
    metrics, and the log and mnist_model_monitored say why."""
    models = tmp_path / "models"
    shutil.copytree(trained_model_dir / "1", models / "1")
    (models / "1" / PROFILE_FILE).unlink()
    meta = json.loads((models / "1" / "metadata.json").read_text())
    del meta["files"][PROFILE_FILE]
    (models / "1" / "metadata.json").write_text(json.dumps(meta))
    server = start_server(models, tmp_path / "server.log")
    try:
        with DigitClient(server.target) as client:
            assert len(client.batch_predict(mnist[1][:50]).digits) == 50
        assert server.metric("mnist_model_monitored", model="mnist", version="1") == 0
        assert (
            server.metric_or_none("mnist_predictions_total", model="mnist", version="1", digit="1")
            is None
        )
        assert (
            "version 1 of model 'mnist' has no profile.json (exported before model monitoring)"
            in (server.log())
        )
    finally:
        assert server.stop() == 0


# --- the drift alert, end to end


@pytest.fixture(scope="module")
def drift_server(
    trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_server(
        trained_model_dir, tmp_path_factory.mktemp("drift") / "server.log",
        "--drift-window-seconds", "6",
    )  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()[-3000:]


def test_the_drift_alert_fires_for_bad_inputs_and_clears_for_clean_ones(
    drift_server: ServerProcess, mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """The shipped alert rules in a real Prometheus (scraping and evaluating every second,
    ``for: 2m`` shortened to 0 s here), over a server with a 6 s drift window."""
    rules = tmp_path / "alerts.yml"
    rules.write_text(
        (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text().replace("for: 2m", "for: 0s")
    )
    _, clean = mnist
    phase = {"images": clean}
    stop = threading.Event()

    def traffic() -> None:
        with DigitClient(drift_server.target) as client:
            i = 0
            while not stop.is_set():
                images = phase["images"]
                start = (i * 16) % (len(images) - 16)
                client.batch_predict(images[start : start + 16])
                i += 1
                time.sleep(0.005)

    def wait(condition: Callable[[], object], what: str, limit: float = 60) -> float:
        started = time.monotonic()
        while not condition():
            assert time.monotonic() - started < limit, f"{what} not within {limit} s"
            time.sleep(0.5)
        return time.monotonic() - started

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        with run_prometheus(tmp_path, drift_server, rules) as port:

            def firing() -> bool:
                query = 'ALERTS{alertname="MnistInputDrift", alertstate="firing"}'
                return bool(prometheus_query(port, query))

            wait(lambda: prometheus_query(port, "mnist_drift_score"), "a drift score")
            for _ in range(8):  # clean traffic: a whole window and more, never above threshold
                (score,) = prometheus_query(port, "mnist_drift_score")
                assert float(score["value"][1]) < DRIFT_THRESHOLD and not firing()
                time.sleep(1)
            times = {}
            for name, images in _bad_kinds(clean[:2000]).items():
                phase["images"] = images
                fired = wait(firing, f"the alert for {name} images")
                phase["images"] = clean
                cleared = wait(lambda: not firing(), f"the alert clearing after {name}")
                times[name] = (round(fired, 1), round(cleared, 1))
            print("seconds to fire and to clear, 6 s window, 1 s scrape/evaluation:", times)
    finally:
        stop.set()
        sender.join(10)
