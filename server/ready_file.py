"""The ready file (``--ready-file``): a server's state as JSON, for tools and tests.

Written when the ports are bound, again whenever health changes, and a last time after the
drain (``"stopped": true`` and the answered calls by status code). Replaced atomically, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
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


def wait_for_ready_file(
    path: Path, proc: subprocess.Popen[Any], timeout: float, serving: bool = True
) -> dict[str, Any]:
    """What the server started as ``proc`` wrote to ``path`` once it listens (with ``serving``:
    once it serves). Raises RuntimeError if it exits first, or (killing it) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = read_ready_file(path)
        if ready is not None and (ready.get("serving") or not serving):
            return ready
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"did not start in {timeout}s")
