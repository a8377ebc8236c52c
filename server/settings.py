"""Server settings: one frozen object, from command-line flags with environment-variable defaults.

Every flag ``--some-name`` has the environment variable ``MNIST_SOME_NAME``; a flag given on
the command line wins over the variable, the variable over the built-in default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from server.runtimes import RUNTIMES
from server.versions import VersionPolicy

ENV_PREFIX = "MNIST_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _help(text: str) -> dict[str, str]:
    """A settings field's metadata: what it means (its ``--help`` and README text)."""
    return {"help": text}


def on_off(text: str) -> bool:
    """An on/off setting's value: on, true, yes, 1 or off, false, no, 0 (any case)."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"{text!r} is not on or off")


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told. Field names match the flags (``--max-batch-size``);
    each field's help text stands beside it (``--help`` and the README's table come from it),
    and on/off settings are booleans."""

    model_dir: Path = field(
        metadata=_help("folder of integer model versions (MODEL_DIR/1, MODEL_DIR/2, ...)")
    )
    workers: int = field(
        default=1,
        metadata=_help(
            "server processes sharing the gRPC port, each with its own batcher and model (auto = "
            "one per core); metrics of all of them on the one metrics port"
        ),
    )
    host: str = field(default="0.0.0.0", metadata=_help("address the gRPC port binds to"))
    port: int = field(default=8500, metadata=_help("gRPC port (0 = pick a free one)"))
    metrics_host: str = field(
        default="127.0.0.1",
        metadata=_help("address the metrics port (/metrics, /readyz) binds to; 0.0.0.0 = all"),
    )
    metrics_port: int = field(
        default=9100, metadata=_help("Prometheus metrics port (0 = pick a free one)")
    )
    metrics_tls_cert: Path | None = field(
        default=None, metadata=_help("PEM certificate for the metrics port (enables HTTPS there)")
    )
    metrics_tls_key: Path | None = field(
        default=None, metadata=_help("PEM private key for the metrics port")
    )
    metrics_token_file: Path | None = field(
        default=None,
        metadata=_help("file holding a bearer token that scrapes of /metrics must present"),
    )
    ready_file: Path | None = field(
        default=None,
        metadata=_help(
            "write {pid, ports, serving} here as JSON once the ports are bound, and again whenever"
            " health changes"
        ),
    )
    model_version: int | None = field(
        default=None,
        metadata=_help(
            "serve exactly this version and do not follow new ones (the same as --version-policy"
            " specific:V)"
        ),
    )
    version_policy: str = field(
        default="latest:1",
        metadata=_help(
            "which versions are loaded at once, each with its own batcher: latest:N (the N "
            "newest), all, or specific:V1,V2; unpinned calls get the 'stable' label's version "
            "(MODEL_DIR/labels.json), else the newest loaded"
        ),
    )
    model_name: str = field(
        default="mnist",
        metadata=_help(
            "the model calls get when they name none, and the name of the one model in the "
            "MODEL_DIR/<version>/ layout (MODEL_DIR/<name>/<version>/ names each model)"
        ),
    )
    model_control: bool = field(
        default=False,
        metadata=_help(
            "on: the repository calls may load, unload and relabel models at run time (Triton "
            "RepositoryModelLoad/Unload, TF Serving HandleReloadConfigRequest, mnist.v1 "
            "ConfigureModel; they write the model folder, and need the token with "
            "--auth-token-file); off: only the model folder changes what serves"
        ),
    )
    model_threads: int = field(
        default=0, metadata=_help("threads per model call (0 = one per core)")
    )
    runtime: str = field(
        default="auto",
        metadata=_help(
            "litert (model.tflite on XNNPACK, CPU, no TensorFlow), keras (model.keras on JAX: GPU "
            "or CPU), tensorflow (the SavedModel), or auto (litert on a CPU; on a GPU tensorflow "
            "if installed, else keras)"
        ),
    )
    max_batch_size: int = field(
        default=256, metadata=_help("most images in one model call (1 = no batching)")
    )
    batch_timeout_ms: float = field(
        default=0.0,
        metadata=_help("extra wait to fill a batch once the model is free (0 = never wait)"),
    )
    max_queue_images: int = field(
        default=8192,
        metadata=_help("images allowed to wait; beyond this new requests get RESOURCE_EXHAUSTED"),
    )
    max_images_per_request: int = field(
        default=4096, metadata=_help("most images in one BatchPredict")
    )
    max_message_bytes: int = field(
        default=8 * 1024 * 1024, metadata=_help("largest request or response message")
    )
    max_concurrent_streams: int = field(
        default=1024, metadata=_help("most concurrent RPCs per HTTP/2 connection")
    )
    max_concurrent_rpcs: int = field(
        default=256,
        metadata=_help(
            "most unary RPCs in flight over all connections, counted once their request message "
            "has arrived; beyond this new calls get RESOURCE_EXHAUSTED at once"
        ),
    )
    max_pending_calls: int = field(
        default=0,
        metadata=_help(
            "most calls waiting inside gRPC for the event loop to take them up (0 = gRPC's "
            "default); beyond this gRPC itself drops new calls, at no cost to the server, and "
            "their callers see CANCELLED (see Limits)"
        ),
    )
    read_timeout_seconds: float = field(
        default=10.0,
        metadata=_help(
            "a call whose request message (a stream's first message) has not arrived after this "
            "long is ended with DEADLINE_EXCEEDED; until its message arrives a call holds no place"
            " among the calls in flight"
        ),
    )
    max_open_streams: int = field(
        default=128,
        metadata=_help(
            "most streams open at once (PredictStream, KServe ModelStreamInfer), a budget apart "
            "from --max-concurrent-rpcs; beyond this new streams get RESOURCE_EXHAUSTED"
        ),
    )
    stream_idle_seconds: float = field(
        default=60.0,
        metadata=_help(
            "a stream with nothing in flight that sends nothing for this long is ended with "
            "DEADLINE_EXCEEDED"
        ),
    )
    max_stream_images: int = field(
        default=256,
        metadata=_help(
            "most images in flight per stream (PredictStream, KServe ModelStreamInfer: read, not "
            "yet answered); at this the server stops reading the stream until answers go out"
        ),
    )
    server_timing: bool = field(
        default=True,
        metadata=_help(
            "on (or true, yes, 1): every prediction answers with a server-timing trailer (queue, "
            "compute and total ms, batch size, version); off (false, no, 0): none"
        ),
    )
    tracing: str = field(
        default="off",
        metadata=_help(
            "otlp: OpenTelemetry spans per call (with queue and compute children) to the OTLP "
            "exporter set by OTEL_EXPORTER_OTLP_* (needs the tracing extra); off: none"
        ),
    )
    model_monitoring: bool = field(
        default=True,
        metadata=_help(
            "on: model-quality metrics per version (predicted digits, confidence, input "
            "statistics, drift score against the version's profile.json); off: none"
        ),
    )
    drift_window_seconds: float = field(
        default=60.0,
        metadata=_help("sliding window of the drift score and the low-confidence share"),
    )
    payload_log_dir: Path | None = field(
        default=None,
        metadata=_help(
            "write a sample of requests (image hash, statistics, prediction, confidence, "
            "model, version, time) as rotating JSON lines here; unset: no payload log"
        ),
    )
    payload_log_percent: float = field(
        default=1.0, metadata=_help("share of images the payload log samples, in percent")
    )
    payload_log_images: bool = field(
        default=False,
        metadata=_help("on: the payload log also keeps each sampled image (base64)"),
    )
    payload_log_max_mb: float = field(
        default=100.0, metadata=_help("most disk the payload log uses (5 rotating files)")
    )
    max_inflight_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_help(
            "most request bytes held by calls in flight (what a request expands to, where that is "
            "more); beyond this new calls get RESOURCE_EXHAUSTED"
        ),
    )
    poll_seconds: float = field(
        default=2.0, metadata=_help("how often the model folder is checked for new versions")
    )
    grace_seconds: float = field(
        default=20.0, metadata=_help("on SIGTERM, time allowed to finish accepted requests")
    )
    pre_stop_seconds: float = field(
        default=0.0,
        metadata=_help("on SIGTERM, time to keep serving after health turns NOT_SERVING"),
    )
    tls_cert: Path | None = field(
        default=None, metadata=_help("PEM server certificate (enables TLS)")
    )
    tls_key: Path | None = field(default=None, metadata=_help("PEM server private key"))
    tls_client_ca: Path | None = field(
        default=None,
        metadata=_help("PEM CA bundle; clients must present a certificate it signed (mTLS)"),
    )
    auth_token_file: Path | None = field(
        default=None, metadata=_help("file holding a bearer token that every call must present")
    )
    log_level: str = field(default="INFO", metadata=_help("DEBUG, INFO, WARNING or ERROR"))

    def __post_init__(self) -> None:
        problems = []
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{_flag(name)} must be 0-65535 (0 = pick a free one)")
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.workers < 1:
            problems.append("--workers must be >= 1 (or auto)")
        if self.model_threads < 0:
            problems.append("--model-threads must be >= 0")
        if self.runtime not in RUNTIMES:
            problems.append(f"--runtime must be one of {', '.join(RUNTIMES)}")
        if self.max_batch_size < 1:
            problems.append("--max-batch-size must be >= 1")
        if self.batch_timeout_ms < 0:
            problems.append("--batch-timeout-ms must be >= 0")
        if self.max_images_per_request < 1:
            problems.append("--max-images-per-request must be >= 1")
        if self.max_queue_images < self.max_images_per_request:
            problems.append("--max-queue-images must be >= --max-images-per-request")
        if self.max_message_bytes < self.max_images_per_request * 790:  # 787 B an image, framing
            problems.append("--max-message-bytes is too small for --max-images-per-request")
        if self.drift_window_seconds < 6 or not 0 < self.payload_log_percent <= 100:
            problems.append("--drift-window-seconds must be >= 6, --payload-log-percent 0-100")
        if self.payload_log_max_mb <= 0:
            problems.append("--payload-log-max-mb must be > 0")
        if self.tracing not in ("off", "otlp"):
            problems.append("--tracing must be off or otlp")
        if self.max_concurrent_rpcs < 1 or self.max_stream_images < 1:
            problems.append("--max-concurrent-rpcs and --max-stream-images must be >= 1")
        if self.max_pending_calls < 0 or self.max_open_streams < 1:
            problems.append("--max-pending-calls must be >= 0, --max-open-streams >= 1")
        if self.read_timeout_seconds <= 0 or self.stream_idle_seconds <= 0:
            problems.append("--read-timeout-seconds and --stream-idle-seconds must be > 0")
        if self.max_inflight_bytes < self.max_message_bytes:
            problems.append("--max-inflight-bytes must be >= --max-message-bytes")
        if (self.metrics_tls_cert is None) != (self.metrics_tls_key is None):
            problems.append("--metrics-tls-cert and --metrics-tls-key go together")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("--tls-client-ca needs --tls-cert and --tls-key")
        try:
            VersionPolicy.parse(self.version_policy)
        except ValueError as err:
            problems.append(f"--version-policy: {err}")
        if self.model_version is not None and self.version_policy != "latest:1":
            problems.append("--model-version and --version-policy: give one of them")
        if self.poll_seconds <= 0 or self.grace_seconds < 0 or self.pre_stop_seconds < 0:
            problems.append("--poll-seconds must be > 0, --grace/--pre-stop-seconds >= 0")
        if problems:
            raise ValueError("; ".join(problems))


# What each setting means, from the fields: the --help text, and the README's table (a test
# keeps them equal).
HELP = {f.name: str(f.metadata["help"]) for f in fields(Settings)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    """The environment variable for a settings field, e.g. ``MNIST_MAX_BATCH_SIZE``."""
    return ENV_PREFIX + name.upper()


def _workers(text: str) -> int:
    """``--workers``: a count, or ``auto`` for one per core."""
    if text == "auto":
        return os.cpu_count() or 1
    return int(text)


def _converter(name: str, annotation: str) -> Any:
    if name == "workers":
        return _workers
    if annotation == "bool":
        return on_off
    if "Path" in annotation:
        return Path
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    return str


class _Parser(argparse.ArgumentParser):
    """argparse, saying a mistake in one line (and where help is) instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The argument parser, with defaults taken from ``environ``."""
    parser = _Parser(
        prog="python -m server",
        description="Serve a versioned MNIST SavedModel over gRPC (mnist.v1.DigitClassifier).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(Settings):
        convert = _converter(f.name, str(f.type))
        env = env_var(f.name)
        default = f.default if f.name != "model_dir" else None
        if env in environ:
            try:
                default = convert(environ[env])
            except ValueError:
                kind = "int" if f.name == "workers" else convert.__name__
                parser.error(f"{env}={environ[env]!r} is not a valid {kind}")
        required = f.name == "model_dir" and default is None
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=convert,
            default=default,
            required=required,
            help=f"{HELP[f.name]} [env {env}]",
        )
    return parser


def read_token(path: Path | None) -> bytes | None:
    """The bearer token in the file ``path`` names (None: no token is required).

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is empty (an empty token would let anyone in).
    """
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path}: token file is empty")
    return token.encode()


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from ``argv`` (default: sys.argv) and ``environ`` (default: os.environ)."""
    parser = build_parser(os.environ if environ is None else environ)
    args = parser.parse_args(argv)
    try:
        return Settings(**vars(args))
    except ValueError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits
