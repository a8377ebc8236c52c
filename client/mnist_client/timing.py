"""Where a prediction's time went on the server: the ``server-timing`` trailer.

Every prediction call's trailing metadata carries one ``server-timing`` entry in the W3C
Server-Timing syntax (https://www.w3.org/TR/server-timing/), e.g.::

    queue;dur=0.081, compute;dur=0.412, total;dur=0.620, batch;desc="32", version;desc="3"

``queue``: milliseconds from the request reaching the batcher to its first model call;
``compute``: milliseconds of the model call(s) that computed it; ``total``: milliseconds from
the server receiving the call to handing back the answer; ``batch``: images in the model call
that carried it; ``version``: the model version. Streams carry the same per image in their
answers (``PredictStreamResponse.timing``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

HEADER = "server-timing"


@dataclass(frozen=True)
class Timing:
    """The server's account of one answer; network and client time = your latency - total."""

    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int
    model_version: int = 0


def format_server_timing(
    queue_s: float, compute_s: float, total_s: float, batch_size: int, version: int
) -> str:
    """The ``server-timing`` value for these figures (seconds in, milliseconds out)."""
    return (
        f"queue;dur={queue_s * 1e3:.3f}, compute;dur={compute_s * 1e3:.3f}, "
        f'total;dur={total_s * 1e3:.3f}, batch;desc="{batch_size}", version;desc="{version}"'
    )


def parse_server_timing(value: str) -> Timing | None:
    """A ``server-timing`` value as a :class:`Timing` (None when it lacks the figures)."""
    durations: dict[str, float] = {}
    descriptions: dict[str, str] = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, raw = param.partition("=")
            if key == "dur":
                with contextlib.suppress(ValueError):  # a malformed one is left out
                    durations[name] = float(raw)
            elif key == "desc":
                descriptions[name] = raw.strip('"')
    try:
        return Timing(
            durations["queue"], durations["compute"], durations["total"],
            int(descriptions.get("batch", 0)), int(descriptions.get("version", 0)),
        )  # fmt: skip
    except (KeyError, ValueError):
        return None


def from_metadata(metadata: object) -> Timing | None:
    """The timing in a call's trailing metadata (pairs of key and value), if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == HEADER:
            return parse_server_timing(value if isinstance(value, str) else value.decode())
    return None
