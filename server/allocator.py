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

The third is speed. By default glibc serves a block above its mmap threshold (128 KB, then the largest block
freed so far) with a fresh mmap, and returns an arena's free top above its trim threshold (twice that) to the
system. Every image then lands on pages that are new to the process: a 640x480 JPEG's decode and resize allocate
megabytes, and the page faults on them cost more than the arithmetic (on this VM, with the float resize of the
time: decode + resize 7-9 ms per image by default, 3.5-4.7 ms with fixed thresholds; BENCHMARKS.md, section 5).
Fixed thresholds (32 MB, glibc's largest mmap threshold, for both) keep those blocks in the arenas for reuse;
a larger image still gets its own mapping, and `trim_when_idle` still hands back what a burst left free.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable

# glibc's mallopt parameter numbers (malloc.h) and the environment variables that set them at start-up.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
_ENVIRONMENT = {M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
                M_ARENA_MAX: "MALLOC_ARENA_MAX"}
DEFAULT_ARENAS = 2
THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc refuses an mmap threshold above 32 MB on 64-bit


def tune_malloc(arenas: int = DEFAULT_ARENAS, threshold_bytes: int = THRESHOLD_BYTES) -> dict[str, bool]:
    """Before any thread starts: `arenas` malloc arenas, and fixed mmap and trim thresholds of `threshold_bytes`.
    Returns which were applied (glibc on Linux only; a setting given in the environment is left alone)."""
    wanted = {M_ARENA_MAX: arenas, M_MMAP_THRESHOLD: threshold_bytes, M_TRIM_THRESHOLD: threshold_bytes}
    mallopt = getattr(_libc(), "mallopt", None)  # musl or another libc: nothing to tune
    applied = {}
    for param, value in wanted.items():
        name = _ENVIRONMENT[param]
        applied[name] = mallopt is not None and name not in os.environ and bool(mallopt(param, value))
    return applied


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
