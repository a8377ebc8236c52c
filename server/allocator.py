"""Make glibc's allocator give freed request buffers back to the system.

A request body is one allocation as large as the message (up to ``--max-message-bytes``).
glibc serves allocations above a threshold with their own memory map, returned on free, but
it raises that threshold to the size of each such block freed (up to 32 MiB): after the first
large body, later ones come from the heap and per-thread arenas, which keep them after the
call. A fixed threshold keeps every large buffer mapped. What is left is the heap and the
threads' arenas, fragmented by many small blocks after a burst (gRPC's read slices,
per-image objects), which glibc returns only when asked: a thread looks every
:data:`CHECK_SECONDS` and asks once they hold more than :data:`TRIM_FREE_BYTES` free.

Measured with ``python -m bench.hostile`` (README, "Limits, and hostile load"), RSS 2 s
after the load against before it: three 8 MiB hostile bodies at once, five times, -0.5 MB
(+108 MB without this module and the frame fix in ``server/rpc.py``); a 15 s flood of
1,024-image BatchPredicts, +2 MB (+177 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from typing import Any

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 256 * 1024
# A trim walks the heap holding its lock (10-20 ms after a flood): only when it is worth it.
CHECK_SECONDS = 1.0
TRIM_FREE_BYTES = 8 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]  # fmt: skip


def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - only glibc has both
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return None
    return libc


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold (unless ``MALLOC_MMAP_THRESHOLD_`` chose one already) and
    start a daemon thread that trims the heap when it holds much free memory. Call it before
    requests arrive. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)

    mallinfo2 = getattr(libc, "mallinfo2", None)  # glibc 2.33+; older: trim every time
    if mallinfo2 is not None:
        mallinfo2.restype = _MallInfo2

    def trim() -> None:
        while True:
            time.sleep(CHECK_SECONDS)
            if mallinfo2 is None or mallinfo2().fordblks > TRIM_FREE_BYTES:
                libc.malloc_trim(0)

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
    return True
