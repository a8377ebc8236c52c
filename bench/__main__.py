"""``python -m bench``: measure the server against its ceilings; print, save JSON and a plot.

python -m bench --model-dir models --data-dir ../shared/data/mnist
python -m bench --smoke ...        # seconds-long run that only proves the bench works
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _images(data_dir: Path | None) -> np.ndarray:
    """1,024 real test digits when the data is at hand, else seeded random bytes."""
    from mnist_client.bench import load_images

    return load_images(data_dir, 1024)[0]


def _print_table(result: dict[str, Any], ratios: dict[str, float]) -> None:
    rows = result["table"]
    head = (f"{'target':13s} {'load':14s} {'req/s':>9s} {'images/s':>10s} {'p50 ms':>8s} "
            f"{'p90 ms':>8s} {'p99 ms':>8s} {'errors':>6s} {'batch':>6s} {'cpu':>5s} "
            f"{'cpu us/req':>10s}")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        batch = "" if math.isnan(r["mean_batch"]) else f"{r['mean_batch']:.1f}"
        print(f"{r['target']:13s} {r['load']:14s} {r['rps']:9.0f} {r['images_per_s']:10.0f} "
              f"{r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f} {r['errors']:6d} "
              f"{batch:>6s} {r['server_cpu_cores']:5.2f} "
              f"{r['cpu_us_per_request']:10.0f}")  # fmt: skip
    print()
    for runtime, in_proc in result["in_process_images_per_s"].items():
        print(
            f"in-process {runtime:10s} images/s: "
            + ", ".join(f"batch {k}: {v:,.0f}" for k, v in in_proc.items())
        )
    print()
    for name, figures in result["servers"].items():
        if figures.get("model_load_s") is not None:
            print(f"{name:13s} RSS {figures['rss_mb']:.0f} MB after the run; process start to "
                  f"SERVING {figures['start_to_serving_s']:.2f} s, of which model load "
                  f"{figures['model_load_s']:.2f} s")  # fmt: skip
    print("\nratios (medians, measured side by side):")
    for name, value in ratios.items():
        print(f"  {name:34s} {value:6.2f}")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_target: dict[str, list[dict[str, float]]] = {}
    for r in result["table"]:
        if str(r["load"]).startswith("predict-c"):
            by_target.setdefault(r["target"], []).append(r)
    for target, rows in by_target.items():
        rows.sort(key=lambda r: r["concurrency"])
        conc = [r["concurrency"] for r in rows]
        ax_rps.plot(conc, [r["rps"] for r in rows], marker="o", label=target)
        ax_p99.plot(conc, [r["p99_ms"] for r in rows], marker="o", label=target)
    for ax, label in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests (Predict)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_p99.set_yscale("log")
    fig.suptitle(f"mnist.v1.DigitClassifier/Predict, {result['created_at']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench`` and ``mnist-bench``."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--data-dir", type=Path, help="MNIST IDX folder for real request images")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians)")
    p.add_argument("--concurrency", default="1,16,64,256", help="Predict concurrencies")
    p.add_argument("--sweep", action="store_true", help="also batching-setting variants")
    p.add_argument("--smoke", action="store_true", help="1 s runs, 1 repeat, c=1,16")
    p.add_argument("--baseline", type=Path, help="another checkout (git worktree add DIR REV): "
                   "its server too, side by side on the same model")  # fmt: skip
    p.add_argument("--targets", default="", help="only these targets (comma-separated names)")
    p.add_argument("--loads", default="", help="only these loads (comma-separated, e.g. "
                   "batch1024-c4), no in-process timing: many short A/B repeats")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="JSON and PNG go here")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench.run import ratios, run_benchmark
    from server.versions import list_versions

    if not list_versions(args.model_dir):
        p.error(f"{args.model_dir}: no model version; train one (python -m training) first")
    if args.smoke:
        args.seconds, args.warmup, args.repeats, args.concurrency = 1.0, 0.5, 1, "1,16"
    result = run_benchmark(
        args.model_dir,
        _images(args.data_dir),
        concurrencies=[int(c) for c in args.concurrency.split(",")],
        seconds=args.seconds,
        warmup=args.warmup,
        repeats=args.repeats,
        sweep=args.sweep,
        only=frozenset(filter(None, args.targets.split(","))),
        only_loads=frozenset(filter(None, args.loads.split(","))),
        baseline=args.baseline,
    )
    result["ratios"] = r = ratios(result)
    _print_table(result, r)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2))
    _plot(result, args.out / f"bench-{stamp}.png")
    print(f"\nwrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
