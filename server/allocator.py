"""glibc malloc tuning for a server that decodes images in a thread pool.

glibc gives each thread that allocates concurrently its own malloc arena (up to 8 per core) and an arena keeps
what is freed into it for reuse instead of returning it to the system. The decode threads allocate and free
whole decoded images (a 12 MP photo is 36 MB of RGB, and a bad input is often decoded before it is refused), so
each arena grows to its peak and stays there: RSS after a burst of bad or large inputs is about one peak per
arena, not one in all. Two arenas bound that. Measured (tests/server/test_allocator.py, 8 threads each
allocating and freeing ~20 MB images 20 times): RSS +257 MB with glibc's default arenas, +50 MB with two; on
the server (2 cores, 2 decode threads, 700 bad inputs on 8 connections) +28 to +69 MB by default, +6 to +9 MB
with two (`python -m benchmarks.overload --only bad_inputs` gives the figure on a given machine).
The decode threads take an arena lock a few times per image, which costs nothing measurable.

An explicit MALLOC_ARENA_MAX in the environment wins (glibc reads it at start-up; this leaves it alone).

The other source of kept memory is a flood of uploads: each connection's received body is held until it is
answered or refused, and glibc keeps the freed bodies' memory for reuse (its mmap threshold grows with the sizes
it sees). 600 connections refused at once with 145 KB bodies: RSS +85 MB at the peak, and it stayed there.
`trim_when_idle` gives it back once arrivals stop for a moment (+20 MB two seconds after the same flood).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """mallopt(M_ARENA_MAX, arenas) before any thread starts; True if applied (glibc on Linux only)."""
    libc = None if "MALLOC_ARENA_MAX" in os.environ else _libc()
    mallopt = getattr(libc, "mallopt", None)  # musl or another libc: nothing to tune
    return bool(mallopt(M_ARENA_MAX, arenas)) if mallopt is not None else False


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def trim_free_memory() -> bool:
    """malloc_trim(0): give the free memory glibc keeps in its arenas back to the system; True if any was."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    return bool(trim(0)) if trim is not None else False


async def trim_when_idle(activity: Callable[[], int], period_s: float = 2.0) -> None:
    """Once `activity()` (a counter of arrivals) has stood still for `period_s` after moving, trim glibc's free
    memory (in a thread: it walks the arenas). A flood of refused uploads leaves its bodies' memory free but kept
    (about one body per connection at the peak); this gives it back once the flood is over. Runs until cancelled.
    """
    loop = asyncio.get_running_loop()
    seen = activity()
    moved = False
    while True:
        await asyncio.sleep(period_s)
        now = activity()
        if now != seen:
            seen, moved = now, True
        elif moved:
            moved = False
            await loop.run_in_executor(None, trim_free_memory)
