"""The ready file (``--ready-file``): a server's state as JSON, for tools and tests.

Written when the ports are bound, again whenever health changes, and a last time after the
drain (``"stopped": true`` and the answered calls by status code). Replaced atomically, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_ready_file(path: Path, content: dict[str, Any]) -> None:
    """Replace ``path`` with ``content`` as JSON, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_ready_file(path: Path) -> dict[str, Any] | None:
    """The JSON a server wrote to ``path``, or None before it wrote one."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data
