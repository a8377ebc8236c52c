"""What a worker process and its supervisor (``server.workers``) share, apart from either.

A server (``server.app``) needs these to run as a worker; the supervisor needs them to start
and watch workers. They live here so that neither module imports the other for them: the
supervisor only imports ``server.app`` in the spawned worker's own entry point.
"""

from __future__ import annotations

from typing import Any

EXIT_CANNOT_START = 2  # a worker's status when its settings cannot work (no use restarting)
REPORT_SECONDS = 0.25  # how often a worker reports its state and reads its peers'


class WorkerLink:
    """What a worker shares with the supervisor and its peers: one slot per worker."""

    def __init__(self, index: int, slots: Any) -> None:
        self.index = index
        self.slots = slots  # multiprocessing Array of bytes: 1 = that worker serves

    def report(self, serving: bool) -> None:
        """Publish whether this worker serves (read by the supervisor and the peers)."""
        self.slots[self.index] = 1 if serving else 0
