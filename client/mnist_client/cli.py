"""``python -m mnist_client``: predict files, show model info, check health, load-test."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from mnist_client.client import DEFAULT_TIMEOUT_S, DigitClient, Prediction
from mnist_client.images import ImageError, to_image_bytes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mnist-client", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="localhost:8500", help="server host:port")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    common.add_argument("--ca-cert", type=Path, help="PEM CA to verify the server (TLS)")
    common.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    common.add_argument("--client-key", type=Path, help="PEM client key (mutual TLS)")
    common.add_argument("--token-file", type=Path, help="file holding a bearer token")
    sub = parser.add_subparsers(dest="command", required=True)
    predict = sub.add_parser("predict", parents=[common], help="classify image files")
    predict.add_argument("files", nargs="+", type=Path, help="PNG/JPEG/... or 784-byte raw files")
    predict.add_argument(
        "--stream", action="store_true",
        help="send the files over one PredictStream; print each answer as it arrives",
    )  # fmt: skip
    sub.add_parser("info", parents=[common], help="show the model being served")
    health = sub.add_parser("health", parents=[common], help="standard gRPC health check")
    health.add_argument("--service", default="", help='service name ("" = whole server)')
    bench = sub.add_parser("bench", parents=[common], help="load-test the server; report")
    bench.add_argument("--concurrency", type=int, default=64, help="callers (or streams)")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds")
    bench.add_argument("--method", default="predict", help="predict, batch or stream")
    bench.add_argument("--batch-size", type=int, default=32, help="images per batch call")
    bench.add_argument("--data", type=Path, help="an IDX images file, or a folder with "
                       "t10k-images/labels (then accuracy is reported too)")  # fmt: skip
    bench.add_argument("--processes", type=int, default=0, help="0 = one per 32 callers")
    bench.add_argument("--json", type=Path, help="also write the figures here")
    bench.add_argument("--fail-on-error", action="store_true", help="exit 1 on any error")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    def read(p: Path | None) -> bytes | None:
        return p.read_bytes() if p else None

    return {
        "timeout": args.timeout,
        "root_certificates": read(args.ca_cert),
        "certificate_chain": read(args.client_cert),
        "private_key": read(args.client_key),
        "token": args.token_file.read_text().strip() if args.token_file else None,
    }


def _client(args: argparse.Namespace) -> DigitClient:
    return DigitClient(args.target, **_client_options(args))


def _line(name: str, pred: Prediction) -> str:
    return f"{name}: {pred.digit} (p={pred.confidence:.4f}, model v{pred.model_version})"


def _predict(
    client: DigitClient, files: Sequence[Path], stream: bool, timeout: float | None = None
) -> int:
    images, names, failed = [], [], 0
    for path in files:
        try:
            images.append(to_image_bytes(path))
            names.append(str(path))
        except ImageError as err:
            print(f"{path}: error: {err}", file=sys.stderr)
            failed += 1
    if images and stream:
        for result in client.predict_stream(images, timeout=timeout):
            if result.prediction is not None:
                print(_line(names[result.id], result.prediction), flush=True)
            else:
                assert result.error is not None
                print(f"{names[result.id]}: error: {result.error.code.name}: "
                      f"{result.error.message}", file=sys.stderr)  # fmt: skip
                failed += 1
    elif images:
        batch = client.batch_predict(images)
        for name, pred in zip(names, (batch[i] for i in range(len(batch))), strict=False):
            print(_line(name, pred))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mnist-client`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from mnist_client import bench

        return bench.main(args, _client_options(args))
    try:
        with _client(args) as client:
            if args.command == "predict":
                return _predict(client, args.files, args.stream, args.timeout)
            if args.command == "info":
                info = client.model_info()
                print(json.dumps(vars(info), indent=2, default=str))
                return 0
            status = client.health(args.service)
            print(status)
            return 0 if status == "SERVING" else 1
    except grpc.RpcError as err:
        print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
