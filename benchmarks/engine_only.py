"""The ceiling the server is compared against: the same engine, in-process, no HTTP, no batcher.

Decode modes (the decode is the server's own preprocess, `server.preprocess`, on the same JPEG bytes):
- `none`: images are preprocessed once up front; only `engine.infer` is timed.
- `loop`: each batch is preprocessed in a plain loop on the calling thread, then inferred. Per-batch latency is
  decode + inference, so at batch 1 it is the latency floor a single request can reach through the server.
- `pool`: the server's approach: preprocessing runs in a thread pool (PIL releases the GIL; default size as the
  server's, one thread per core, at most 8), and the next batch is decoded while the current one is inferred.
  This is the throughput ceiling for the server's pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from benchmarks.inputs import InputSet
from benchmarks.report import repo_relative
from benchmarks.stats import LatencySummary, summarize_latencies

DecodeMode = Literal["none", "loop", "pool"]
DECODE_MODES: tuple[str, ...] = ("none", "loop", "pool")
Preprocess = Callable[[bytes], np.ndarray]  # JPEG bytes -> uint8 [H, W, 3] at the model's input size


@dataclass(frozen=True)
class EngineRun:
    engine: str
    model: str
    batch_size: int
    decode: str
    decode_workers: int
    inputs: dict[str, object]
    elapsed_s: float
    batches: int
    images: int
    images_per_s: float
    latency: LatencySummary  # per batch (loop/none: decode + infer or infer; pool: one pipeline step)

    def as_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["latency"] = self.latency.as_dict()
        return out


class LoadedEngine:
    """An engine from the server's registry plus the server's preprocess bound to the model's input size."""

    def __init__(
        self,
        model: Path,
        engine: str = "onnxruntime",
        threads: int = 0,
        max_batch_size: int = 32,
        device: str = "cpu",
        jpeg_draft: bool = False,
    ) -> None:
        from server.engines import ENGINES
        from server.engines.base import EngineOptions

        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; registered: {sorted(ENGINES)}")
        self.name = engine
        self.model = model
        self._engine = ENGINES[engine]()
        options = EngineOptions(device=device, intra_op_threads=threads, max_batch_size=max_batch_size)
        self.metadata = self._engine.load(model, options)
        self.preprocess: Preprocess = _server_preprocess(self.metadata.input_size, jpeg_draft)

    def infer(self, batch: np.ndarray) -> object:
        return self._engine.infer(batch)

    def close(self) -> None:
        self._engine.close()


def default_decode_workers() -> int:
    """The server's default (`Settings.decode_workers = 0`): one thread per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)


def _server_preprocess(input_size: tuple[int, int], jpeg_draft: bool = False) -> Preprocess:
    """The server's decode + EXIF + RGB + resize, as a bytes -> array function (jpeg_draft: as SSD_JPEG_DRAFT)."""
    from server import preprocess as pp

    def run(data: bytes) -> np.ndarray:
        return pp.preprocess(data, input_size, jpeg_draft=jpeg_draft).pixels

    return run


def _batches(images: tuple[bytes, ...], batch_size: int) -> Iterator[list[bytes]]:
    i = 0
    n = len(images)
    while True:
        yield [images[(i + j) % n] for j in range(batch_size)]
        i = (i + batch_size) % n


def run_engine_only(
    engine: LoadedEngine,
    inputs: InputSet,
    batch_size: int,
    decode: DecodeMode,
    duration_s: float = 5.0,
    warmup_s: float = 1.0,
    decode_workers: int = 0,
    max_batches: int = 100_000,
) -> EngineRun:
    """Run batches back to back for `duration_s` (after `warmup_s`); bounded by `max_batches` too."""
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}")
    if batch_size < 1:
        raise ValueError("batch size must be >= 1")
    decode_workers = decode_workers or default_decode_workers()
    if decode == "none":
        decoded = [engine.preprocess(b) for b in inputs.images]
        # a few distinct batches are enough (B=32 x 52 photos would hold ~450 MB of pixels)
        starts = range(0, min(len(decoded), 4 * batch_size), batch_size)
        stacked = [np.stack([decoded[(i + j) % len(decoded)] for j in range(batch_size)]) for i in starts]

        def steps() -> Iterator[float]:
            for k in range(max_batches):
                t = time.perf_counter()
                engine.infer(stacked[k % len(stacked)])
                yield time.perf_counter() - t

    elif decode == "loop":

        def steps() -> Iterator[float]:
            for _, batch in zip(range(max_batches), _batches(inputs.images, batch_size)):
                t = time.perf_counter()
                engine.infer(np.stack([engine.preprocess(b) for b in batch]))
                yield time.perf_counter() - t

    else:
        pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="bench-decode")

        def submit(batch: list[bytes]) -> list[Future[np.ndarray]]:
            return [pool.submit(engine.preprocess, b) for b in batch]

        def steps() -> Iterator[float]:
            source = _batches(inputs.images, batch_size)
            pending = submit(next(source))
            for _ in range(max_batches):
                t = time.perf_counter()
                arrays = [f.result() for f in pending]
                pending = submit(next(source))  # decoded while this batch is inferred
                engine.infer(np.stack(arrays))
                yield time.perf_counter() - t

    try:
        gen = steps()
        warm_end = time.perf_counter() + warmup_s
        next(gen)  # always at least one warm-up batch (allocations for this batch size)
        while time.perf_counter() < warm_end:
            next(gen)
        latencies: list[float] = []
        t0 = time.perf_counter()
        end = t0 + duration_s
        for lat in gen:
            latencies.append(lat)
            if time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - t0
    finally:
        if decode == "pool":
            pool.shutdown(wait=True, cancel_futures=True)
    images = len(latencies) * batch_size
    return EngineRun(
        engine=engine.name,
        model=repo_relative(engine.model),
        batch_size=batch_size,
        decode=decode,
        decode_workers=decode_workers if decode == "pool" else (1 if decode == "loop" else 0),
        inputs=inputs.describe(),
        elapsed_s=elapsed,
        batches=len(latencies),
        images=images,
        images_per_s=images / elapsed,
        latency=summarize_latencies(latencies),
    )
