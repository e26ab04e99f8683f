"""The serving pipeline behind the routes: model file -> engine -> warm-up -> batcher, and one image's trip
through it (decode in the thread pool -> batcher -> detections in original pixels).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from model_export.contract.metadata import ModelMetadata
from server import requestid
from server.admission import Admission, Ticket
from server.batcher import BatcherConfig, DynamicBatcher, ImageResult, check_batch_output
from server.engines import MODEL_SUFFIXES, create_engine
from server.engines.base import Engine, EngineOptions
from server.errors import InvalidParameter, NotReady, RequestTimeout
from server.metrics import ModelMetrics
from server.model_store import ensure_model
from server.postprocess import detections_json, select_detections
from server.preprocess import PreparedImage, check_content_type, preprocess
from server.settings import Settings
from server.uploads import Upload

logger = logging.getLogger("server.pipeline")


@dataclass(frozen=True)
class DetectOptions:
    score_threshold: float
    max_detections: int


def warmup_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size: the sizes the batcher forms most."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        metrics: ModelMetrics,
        engine_factory: Callable[[], Engine] | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory or functools.partial(create_engine, settings.engine)
        self.status = "loading"  # -> ready | failed
        self.error: str | None = None
        self.metadata: ModelMetadata | None = None
        self.model_path: Path | None = None
        self._engines: list[Engine] = []
        self._batcher: DynamicBatcher | None = None
        # Each engine instance's own thread: its load, warm-up and batches run there (CUDA state is per thread).
        self._engine_threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine{i}")
            for i in range(settings.effective_instances)
        ]
        self._decode_pool = ThreadPoolExecutor(
            max_workers=settings.effective_decode_workers, thread_name_prefix="decode"
        )
        cv2.setNumThreads(1)  # the pool runs one image per thread: OpenCV's own threads would compete with it
        # Every front end admits its requests here, before reading them (server.admission); one Admission is
        # shared by every model of a server (server.models), so the bound is the server's.
        self.admission = admission or Admission(settings.effective_max_in_flight, settings.request_timeout_ms / 1000.0)
        self._decode_s = 0.0  # recent decode seconds per image (moving average)

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Model file -> engine -> warm-up -> batcher; sets status. Never raises (except on cancel)."""
        try:
            await self._start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.error("the model could not be loaded: %s", self.error)
            logger.debug("load failure traceback", exc_info=True)
            return
        self.status = "ready"

    async def _start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        path = await ensure_model(settings)
        suffixes = MODEL_SUFFIXES.get(settings.engine)
        if suffixes and path.suffix.lower() not in suffixes:
            raise ValueError(f"the {settings.engine} engine reads {'/'.join(suffixes)} files, not {path.name}")
        options = EngineOptions(
            device=settings.device,
            intra_op_threads=settings.intra_op_threads,
            fp16=settings.fp16,
            max_batch_size=settings.max_batch_size,
        )
        started = time.perf_counter()
        engines = [self._engine_factory() for _ in self._engine_threads]
        self._engines = engines  # closed by stop() even if a load below fails
        loads = [loop.run_in_executor(thread, engine.load, path, options)
                 for engine, thread in zip(engines, self._engine_threads)]
        metadata = (await asyncio.gather(*loads))[0]  # the same file for each
        self.metadata, self.model_path = metadata, path
        logger.info(
            "loaded %s (%s, input %dx%d, %d labels) with %s on %s in %.1f s, %d instance(s)",
            path,
            metadata.model,
            *metadata.input_size,
            len(metadata.labels),
            settings.engine,
            settings.device,
            time.perf_counter() - started,
            len(engines),
        )
        exported_max = metadata.extra.get("max_batch", "")
        if exported_max.isdigit() and settings.max_batch_size > int(exported_max):
            logger.warning(
                "max_batch_size %d is above the %s the file was exported for", settings.max_batch_size, exported_max
            )
        per_image_s = 0.0  # at the largest batch, the slowest instance: the batcher's and admission's first estimate
        if settings.warmup:
            for i, (engine, thread) in enumerate(zip(engines, self._engine_threads)):  # one at a time: whole CPU
                # A lone batch always finds the first instance free (server.batcher): only it runs solo.
                warm = await loop.run_in_executor(thread, self._warm_up, engine, metadata, i == 0)
                per_image_s = max(per_image_s, warm)
        config = BatcherConfig(
            input_size=metadata.input_size,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            request_timeout_s=settings.request_timeout_ms / 1000.0,
        )
        self._batcher = DynamicBatcher(
            [engine.infer for engine in engines],
            config,
            self.metrics,
            executors=self._engine_threads,
            solo=[getattr(engine, "infer_solo", None) for engine in engines],
            per_image_s=per_image_s,
        )
        self._batcher.start()
        self.metrics.set_model(settings.engine, metadata.input_size)
        logger.info("ready: max batch %d, queue delay %g ms", settings.max_batch_size, settings.max_queue_delay_ms)

    def _warm_up(self, engine: Engine, metadata: ModelMetadata, solo: bool) -> float:
        """Run every warm-up size; the engine seconds per image at the largest."""
        height, width = metadata.input_size
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        per_image_s = 0.0
        for size in warmup_sizes(self.settings.max_batch_size):
            started = time.perf_counter()
            check_batch_output(engine.infer(np.repeat(image[None], size, axis=0)), size)
            elapsed = time.perf_counter() - started
            per_image_s = elapsed / size
            logger.info("warm-up: batch %d in %.1f ms", size, elapsed * 1000)
        infer_solo = getattr(engine, "infer_solo", None)
        if solo and infer_solo is not None:
            started = time.perf_counter()
            check_batch_output(infer_solo(image[None]), 1)
            logger.info("warm-up: a lone image (solo) in %.1f ms", (time.perf_counter() - started) * 1000)
        return per_image_s

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        loop = asyncio.get_running_loop()
        for engine, thread in zip(self._engines, self._engine_threads):
            await loop.run_in_executor(thread, engine.close)
        for thread in self._engine_threads:
            thread.shutdown(wait=False)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ requests

    def engine_rate(self) -> float:
        """Images per second this model's engines finish with every instance busy, from the recent engine time
        per image (0 before the first batch)."""
        if self._batcher is None or self._batcher.engine_s_per_image <= 0:
            return 0.0
        return len(self._engine_threads) / self._batcher.engine_s_per_image

    def ready(self) -> tuple[ModelMetadata, DynamicBatcher]:
        if self.status != "ready" or self.metadata is None or self._batcher is None:
            raise NotReady(f"the model is not ready ({self.status})")
        return self.metadata, self._batcher

    def options(self, score_threshold: float | None, max_detections: int | None) -> DetectOptions:
        """The query's options, checked against what the model returns."""
        metadata, _ = self.ready()
        if score_threshold is None:
            score_threshold = metadata.score_threshold
        elif not metadata.score_threshold <= score_threshold <= 1.0:
            raise InvalidParameter(
                f"score_threshold must be between the model's {metadata.score_threshold:g} and 1, got {score_threshold:g}"
            )
        if max_detections is None:
            max_detections = metadata.max_detections
        elif not 1 <= max_detections <= metadata.max_detections:
            raise InvalidParameter(
                f"max_detections must be between 1 and the model's {metadata.max_detections}, got {max_detections}"
            )
        return DetectOptions(score_threshold=score_threshold, max_detections=max_detections)

    async def decode(self, upload: Upload, deadline: float | None = None) -> PreparedImage:
        """Decode in the thread pool. A job that starts too late to finish its decode and inference (at their
        recent times) before `deadline` (perf_counter s) is dropped unrun: under overload the pool skips the
        requests that are already lost and serves those that can still make it."""
        metadata, batcher = self.ready()
        check_content_type(upload.content_type)
        gpu_decoder = getattr(self._engines[0], "gpu_decoder", None)  # server.gpu_preprocess.GpuDecoder; None: CPU
        if gpu_decoder is not None:
            prepared = await gpu_decoder.prepare(upload.data, self.settings.max_image_pixels)
            if prepared is not None:  # None: not a JPEG nvJPEG takes; the CPU path below decides
                self.metrics.decode_duration.observe(prepared.decode_s)
                return prepared
        loop = asyncio.get_running_loop()
        job = functools.partial(
            _preprocess_before,
            deadline,
            self._decode_s + batcher.engine_s_per_image,
            upload.data,
            metadata.input_size,
            max_pixels=self.settings.max_image_pixels,
            jpeg_draft=self.settings.jpeg_draft,
        )
        prepared = await loop.run_in_executor(self._decode_pool, job)
        self.metrics.decode_duration.observe(prepared.decode_s)
        requestid.note_image(prepared.width, prepared.height)  # for the access log
        self._decode_s = prepared.decode_s if self._decode_s <= 0 else 0.8 * self._decode_s + 0.2 * prepared.decode_s
        return prepared

    async def infer_upload(self, upload: Upload, ticket: Ticket) -> tuple[PreparedImage, ImageResult]:
        """One encoded image: decode -> batch; its share of the batch's output, within `ticket`'s deadline
        (dropped wherever it is once that passes). Every front end's path for encoded files."""
        _, batcher = self.ready()
        with batcher.incoming():
            prepared = await ticket.wait(self.decode(upload, ticket.deadline), "decode")
            ticket.check("joining a batch")
            future = batcher.submit(prepared.pixels, deadline=ticket.deadline)
        result = await ticket.wait(future, "inference")
        ticket.check("encoding the result")
        return prepared, result

    async def infer_pixels(self, pixels: np.ndarray, ticket: Ticket) -> ImageResult:
        """One image already at the model's input (uint8 [H, W, 3], KServe v2 `images`) -> batch."""
        _, batcher = self.ready()
        ticket.check("joining a batch")
        result = await ticket.wait(batcher.submit(pixels, deadline=ticket.deadline), "inference")
        ticket.check("encoding the result")
        return result

    async def detect(
        self, upload: Upload, options: DetectOptions, received_at: float | None = None, *, ticket: Ticket | None = None
    ) -> dict[str, Any]:
        """One image: decode -> batch -> detections; the response body as a dict (schemas.DetectResponse).

        `ticket` (from `self.admission.admit()`) carries the end-to-end deadline; without one the deadline is
        request_timeout_ms from `received_at` (not admitted: the caller bypasses the in-flight bound)."""
        metadata, _ = self.ready()
        if ticket is None:
            ticket = self.admission.untracked(received_at)
        prepared, result = await self.infer_upload(upload, ticket)
        detections = select_detections(
            result.num_detections,
            result.boxes,
            result.scores,
            result.classes,
            width=prepared.width,
            height=prepared.height,
            score_threshold=options.score_threshold,
            max_detections=options.max_detections,
        )
        return {
            "model": metadata.model,
            "width": prepared.width,
            "height": prepared.height,
            "detections": detections_json(detections, metadata.labels),
            "timings_ms": {
                "decode": round(prepared.decode_s * 1000, 3),
                "queue": round(result.queue_s * 1000, 3),
                "inference": round(result.inference_s * 1000, 3),
                "total": round((time.perf_counter() - ticket.arrived_at) * 1000, 3),
            },
        }


def _preprocess_before(deadline: float | None, needed_s: float, *args: Any, **kwargs: Any) -> PreparedImage:
    """`preprocess`, unless the request can no longer finish (`needed_s` more) before its deadline."""
    if deadline is not None and time.perf_counter() + needed_s > deadline:
        raise RequestTimeout("the request's deadline would pass before its decode and inference end")
    return preprocess(*args, **kwargs)
