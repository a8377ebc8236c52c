"""The benchmark runs end to end (a seconds-long smoke; it asserts no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, need


def test_bench_smoke_produces_table_json_and_plot(
    trained_model_dir: Path, mnist_dir: Path, tmp_path: Path
) -> None:
    need("h2load", "apt-get install nghttp2-client")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--model-dir", str(trained_model_dir),
         "--data-dir", str(mnist_dir), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ratios (medians, measured side by side)" in result.stdout
    (json_path,) = tmp_path.glob("bench-*.json")
    assert json_path.with_suffix(".png").stat().st_size > 1000
    data = json.loads(json_path.read_text())
    rows = {(r["target"], r["load"]) for r in data["table"]}
    for target in ("echo-sync", "echo-aio", "naive", "naive-litert", "batched", "workers2"):
        assert (target, "predict-c1") in rows and (target, "predict-c16") in rows
    for load in ("batch1024-c4", "stream100-c16", "kserve-c16", "tfserving-c16"):
        assert ("batched", load) in rows, load
    assert ("batched", "batch1024-c4") in rows
    assert {("monitoring-off", "predict-c16"), ("monitoring-off", "batch1024-c4")} <= rows
    for row in data["table"]:
        assert row["errors"] == 0, row
        # (naive mode may finish no 1,024-image request within a 1-second smoke run)
        assert row["rps"] > 0 or row["target"].startswith("naive"), row
    in_process = data["in_process_images_per_s"]
    assert set(in_process) == {"litert", "tensorflow"}
    for figures in in_process.values():
        assert set(figures) == {"1", "32", "256", "1024"} and min(figures.values()) > 0
    assert set(data["ratios"]) == {
        "predict_c16_vs_echo_aio", "cpu_per_request_c16_vs_echo_aio", "p50_c1_vs_echo_aio",
        "batched_vs_naive_litert_c16", "batched_vs_naive_c16", "batch1024_vs_in_process_b1024",
        "stream_images_per_s", "stream_images_vs_echo_aio_unary_c16",
        "stream_cpu_per_image_vs_echo_aio_unary_c16", "workers2_vs_workers1_c16",
        "monitoring_rps_c16_vs_off", "monitoring_batch1024_images_vs_off",
        "monitoring_cpu_per_request_c16_vs_off", "monitoring_cpu_per_request_batch1024_vs_off",
        "monitoring_counting_cpu_share_c16", "monitoring_counting_cpu_share_batch1024",
        "vs_baseline_rps_c16", "vs_baseline_batch1024_images", "vs_baseline_cpu_per_request_c16",
        "server_timing_cpu_cost_c16", "kserve_cpu_per_request_vs_native_c16",
        "tfserving_cpu_per_request_vs_native_c16",
    }  # fmt: skip
    for figures in data["servers"].values():
        assert figures["rss_mb"] > 0 and figures["start_to_serving_s"] > 0


def test_bench_ab_repeats_of_one_load_pair_each_repeat(
    trained_model_dir: Path, mnist_dir: Path, tmp_path: Path
) -> None:
    """``--targets`` and ``--loads``: only those, no in-process timing, and the on/off ratio
    from the pairs of each repeat."""
    need("h2load", "apt-get install nghttp2-client")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--seconds", "1", "--warmup", "0.5", "--repeats", "3",
         "--concurrency", "16", "--model-dir",
         str(trained_model_dir), "--data-dir", str(mnist_dir), "--out", str(tmp_path),
         "--targets", "batched,monitoring-off", "--loads", "predict-c16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_path,) = tmp_path.glob("bench-*.json")
    data = json.loads(json_path.read_text())
    assert {(s["target"], s["load"]) for s in data["samples"]} == {
        ("batched", "predict-c16"),
        ("monitoring-off", "predict-c16"),
    }
    assert len(data["samples"]) == 6 and data["in_process_images_per_s"] == {}
    # each repeat started at another target
    firsts = [s["target"] for s in data["samples"][::2]]
    assert firsts == ["batched", "monitoring-off", "batched"]
    pairs = sorted(
        a["rps"] / b["rps"]
        for a in data["samples"] if a["target"] == "batched"
        for b in data["samples"] if b["target"] == "monitoring-off" and b["repeat"] == a["repeat"]
    )  # fmt: skip
    assert data["ratios"]["monitoring_rps_c16_vs_off"] == pairs[1]  # their median
    # the counting thread's share of the server's CPU: measured with monitoring, absent without
    shares = {s["target"]: s["monitoring_cpu_share"] for s in data["samples"]}
    assert 0 < shares["batched"] < 0.5 and shares["monitoring-off"] is None
