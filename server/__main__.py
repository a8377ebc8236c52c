"""``python -m server --model-dir DIR``: serve the highest model version in DIR."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, set up logging, and serve until SIGTERM."""
    from server.settings import parse_settings

    settings = parse_settings(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # only read if a runtime imports TF
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.model_dir.exists() and not settings.model_dir.is_dir():
        # it may be missing or empty (versions can arrive later), but not a file
        raise SystemExit(f"{settings.model_dir}: --model-dir is not a directory")
    if settings.workers > 1:
        from server.workers import Supervisor

        return Supervisor(settings).serve()
    from server.app import run

    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
