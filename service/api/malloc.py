"""Give image memory back to the OS as soon as it is freed (Linux, glibc).

By default glibc serves large blocks with mmap only until the first one is freed, then
raises its threshold and keeps later blocks in per-thread arenas, which are rarely given
back: after a burst of uploads decoded on many threads, the API stays gigabytes large.
A fixed mmap threshold (large blocks are always mapped, and unmapped on free) and few
arenas keep it near its working set. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
MMAP_THRESHOLD_BYTES = 1 << 20
ARENAS = 2


def return_memory_promptly() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        return bool(ok and libc.mallopt(M_ARENA_MAX, ARENAS) == 1)
    except (OSError, AttributeError) as exc:  # musl (Alpine) has no mallopt
        log.info("malloc tuning unavailable: %s", exc)
        return False
