"""benchmarks.overload's CPU split: the list syntax and the checks on it (the scenarios run in BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from benchmarks import overload


def test_cpu_lists_read_like_taskset() -> None:
    assert overload.cpu_list("0,1") == {0, 1}
    assert overload.cpu_list("2-4, 7") == {2, 3, 4, 7}
    assert overload.cpu_list("") == set()


def test_overlapping_or_unknown_cpus_are_refused() -> None:
    with pytest.raises(SystemExit):
        overload.main(["--only", "drain", "--server-cpus", "0", "--client-cpus", "0"])
    with pytest.raises(SystemExit):
        overload.main(["--only", "drain", "--server-cpus", "0-4095"])
