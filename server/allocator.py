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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
DEFAULT_ARENAS = 2


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> bool:
    """mallopt(M_ARENA_MAX, arenas) before any thread starts; True if applied (glibc on Linux only)."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))
