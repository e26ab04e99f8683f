"""Benchmark tool for ssd-serve: HTTP load generator, in-process engine ceiling, concurrency sweep and plot.

Entry point: `python -m benchmarks` (console script `ssd-bench`). Importing this package has no side effects.
"""
