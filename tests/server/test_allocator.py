"""server.allocator: two malloc arenas keep freed image buffers from piling up per thread (real glibc, real RSS)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.testing import REPO_ROOT

PROBE = """
import sys, threading
import numpy as np
from server.allocator import limit_malloc_arenas
applied = limit_malloc_arenas() if sys.argv[1] == "limit" else False
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
base = rss_mb()
barrier = threading.Barrier(8)
def work():
    for i in range(20):  # every thread holds a decoded image at once, then frees it (a burst of decodes)
        barrier.wait()
        image = np.ones(20_000_000 + i * 1000, dtype=np.uint8)
        small = np.ones(3_000_000, dtype=np.uint8)
        del image
        barrier.wait()
        del small
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(applied, rss_mb() - base)
"""


def growth_mb(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas are a Linux matter")
def test_two_arenas_bound_what_freed_buffers_leave_behind() -> None:
    applied, limited = growth_mb("limit")
    if not applied:
        pytest.skip("this libc has no mallopt(M_ARENA_MAX) (not glibc)")
    _, default = growth_mb("default")
    assert limited < 120 and limited * 2 < default, (limited, default)
