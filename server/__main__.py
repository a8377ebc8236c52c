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
    from server.app import check_model_dir, run

    check_model_dir(settings.model_dir)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
