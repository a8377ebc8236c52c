"""``python -m mnist_client``: predict files, show model info, check health, list and manage
the server's models, load-test."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from mnist_client.client import DEFAULT_TIMEOUT_S, DigitClient, ModelStatus, Prediction
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
    _models_parser(sub, common)
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


def _models_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``models list|load|unload|label|policy``: the server's model repository (ListModels,
    ConfigureModel; all but ``list`` need a server started with --model-control)."""
    models = sub.add_parser("models", help="list, load, unload and relabel the served models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", parents=[common],
                    help="every model and version: state, labels, the default")  # fmt: skip
    load = msub.add_parser("load", parents=[common], help="load a model")
    load.add_argument("name", help="the model's name")
    load.add_argument("--policy", help="version policy, e.g. latest:2, all, specific:1,3 "
                      "(default: the server's --version-policy)")  # fmt: skip
    unload = msub.add_parser("unload", parents=[common], help="unload every version of a model")
    unload.add_argument("name", help="the model's name")
    label = msub.add_parser(
        "label", parents=[common],
        help="set or remove labels (the others are kept); a rollback is: label mnist stable=2",
    )  # fmt: skip
    label.add_argument("name", help="the model's name")
    label.add_argument("assign", nargs="*", metavar="LABEL=VERSION", help="point LABEL at VERSION")
    label.add_argument("--remove", action="append", default=[], metavar="LABEL",
                       help="remove LABEL (repeat for more)")  # fmt: skip
    policy = msub.add_parser("policy", parents=[common], help="set a model's version policy")
    policy.add_argument("name", help="the model's name")
    policy.add_argument("policy", help='latest:N, all, specific:V1,V2,..., none, or "" '
                        "(back to the server's --version-policy)")  # fmt: skip


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


MODEL_COLUMNS = ("MODEL", "POLICY", "VERSION", "STATE", "LABELS", "DEFAULT", "REASON")


def model_rows(models: Sequence[ModelStatus]) -> list[tuple[str, ...]]:
    """One row per version of each model (one with "-" for a model without versions):
    :data:`MODEL_COLUMNS`, the default version marked ``*``."""
    rows: list[tuple[str, ...]] = []
    for m in models:
        for v in m.versions:
            labels = ",".join(m.labels_of(v.version)) or "-"
            mark = "*" if v.version == m.default_version else ""
            rows.append((m.name, m.version_policy, str(v.version), v.state, labels, mark,
                         v.reason))  # fmt: skip
        if not m.versions:
            rows.append((m.name, m.version_policy, "-", "-", "-", "", "no version on disk"))
    return rows


def _print_models(models: Sequence[ModelStatus]) -> None:
    rows = [MODEL_COLUMNS, *model_rows(models)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(MODEL_COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _relabel(
    current: dict[str, int], assign: Sequence[str], remove: Sequence[str]
) -> dict[str, int]:
    """``current`` with ``LABEL=VERSION`` assignments applied and ``remove`` taken out.

    Raises:
        ValueError: an assignment that is not LABEL=VERSION, or no change asked for.
    """
    if not assign and not remove:
        raise ValueError("give LABEL=VERSION and/or --remove LABEL")
    labels = {k: v for k, v in current.items() if k not in remove}
    for item in assign:
        name, sep, version = item.partition("=")
        try:
            if not name or not sep:
                raise ValueError
            labels[name] = int(version)
        except ValueError:
            raise ValueError(f"{item!r} is not LABEL=VERSION (e.g. stable=2)") from None
    return labels


def _models(client: DigitClient, args: argparse.Namespace) -> int:
    command = args.models_command
    if command == "list":
        _print_models(client.list_models())
        return 0
    if command == "load":
        status = client.load_model(args.name, args.policy)
    elif command == "unload":
        status = client.unload_model(args.name)
    elif command == "policy":
        status = client.set_version_policy(args.name, args.policy or None)
    else:
        current = {m.name: m for m in client.list_models()}
        if args.name not in current:
            print(f"error: no model '{args.name}'; the server has: "
                  f"{', '.join(current) or 'none'}", file=sys.stderr)  # fmt: skip
            return 2
        try:
            labels = _relabel(current[args.name].labels, args.assign, args.remove)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        status = client.set_labels(args.name, labels)
    _print_models([status])
    return 0


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
            if args.command == "models":
                return _models(client, args)
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
