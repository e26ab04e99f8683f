"""Dynamic batching: requests queue up; one loop takes a batch and runs it on a free engine instance's thread.

A batch closes when it holds `max_batch_size` images, or `max_queue_delay_s` after its first request was queued,
or earlier when the queue is empty and no other request is on its way (being decoded): waiting could not grow it.
While the engine threads run batches the event loop is free, so the next requests decode and queue meanwhile.

Instances (Triton's instance group): with several, up to that many batches run side by side, each on its own
engine and thread. The loop takes a batch only once an instance is free, so while all are busy the queue grows
into the next, larger batch. On a CPU, two single-session instances beat one session running each batch on two
threads (its parallel sections leave cores idle between operators; figures in BENCHMARKS.md).

Solo: a batch of one image that runs while nothing else does (no other batch, nothing queued or being decoded)
goes to the instance's `solo` infer where the engine has one (OnnxRuntimeEngine.infer_solo: the same results,
from threads that spin, ~1 ms sooner at batch 1 on 2 cores). Under load every batch takes the plain infer. Each
batch goes to the lowest-numbered free instance, so at low load one warm instance does the work, and a solo batch
(every instance free) always runs on the first.

Per-item isolation (Triton's execute contract): every pending record has its own future. A full queue refuses
at `submit` (QueueFull); an image past its request's deadline (or that waited past `request_timeout_s`) is answered
RequestTimeout when dequeued and never reaches the engine; a cancelled one (client gone) is skipped; only an engine failure reaches a whole batch (EngineError), and the next batch
runs normally. A batch that comes back with a different number of results than it had fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.engines.base import EngineOutput
from server.errors import EngineError, NotReady, QueueFull, RequestTimeout
from server.metrics import ModelMetrics

logger = logging.getLogger("server.batcher")

InferFn = Callable[[np.ndarray], EngineOutput]


@dataclass(frozen=True)
class ImageResult:
    """One image's share of a batch's output (views into the batch's arrays)."""

    num_detections: int
    boxes: np.ndarray  # float32 [K, 4] x1, y1, x2, y2 normalised
    scores: np.ndarray  # float32 [K]
    classes: np.ndarray  # int32 [K]
    queue_s: float  # enqueued -> its batch started
    inference_s: float  # the batch's engine time
    batch_size: int


@dataclass(eq=False)
class Pending:
    """A queued image waiting for its batch."""

    image: np.ndarray  # uint8 [H, W, 3] at the model's input size
    future: asyncio.Future[ImageResult]
    enqueued_at: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter seconds; None: enqueued_at + request_timeout_s


@dataclass(frozen=True)
class BatcherConfig:
    input_size: tuple[int, int]  # (H, W)
    max_batch_size: int = 32
    max_queue_delay_s: float = 0.002
    max_queue_size: int = 256
    request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")


class DynamicBatcher:
    def __init__(
        self,
        infer: InferFn | Sequence[InferFn],
        config: BatcherConfig,
        metrics: ModelMetrics | None = None,
        executors: Sequence[ThreadPoolExecutor] | None = None,
        solo: Sequence[InferFn | None] | None = None,
        per_image_s: float = 0.0,
    ) -> None:
        """`infer`: the engine's infer, or one per instance. `executors`: each instance's single thread, when the
        caller owns them (and loaded the engines there); by default the batcher makes its own. `solo`: per
        instance, the infer for a lone image with nothing else to do (None: `infer`). `per_image_s`: engine
        seconds per image measured before (at warm-up), the estimate until batches refine it (0: none)."""
        self._infers = [infer] if callable(infer) else list(infer)
        if not self._infers:
            raise ValueError("at least one engine instance is needed")
        self.config = config
        self._metrics = metrics
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=config.max_queue_size)
        self._incoming = 0  # requests being decoded that will submit soon
        self._own_executors = executors is None
        self._executors = list(executors) if executors is not None else [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine") for _ in self._infers
        ]
        if len(self._executors) != len(self._infers):
            raise ValueError(f"{len(self._infers)} engine instances but {len(self._executors)} executors")
        self._solos = list(solo) if solo is not None else [None] * len(self._infers)
        if len(self._solos) != len(self._infers):
            raise ValueError(f"{len(self._infers)} engine instances but {len(self._solos)} solo paths")
        height, width = config.input_size
        # Batches are assembled on their instance's thread, one at a time there: one buffer per instance.
        self._buffers = [
            np.empty((config.max_batch_size, height, width, 3), dtype=np.uint8) for _ in self._infers
        ]
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        # Engine seconds per image, a moving average over recent batches (0 until one ran): a batch is not grown
        # past what can finish before the tightest deadline in it, and an image that cannot finish even alone
        # is answered at once instead of taking engine time from the others.
        self._per_image_s = per_image_s

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        """Stop taking batches; fail whatever still waits; let running batches finish."""
        if self._task is not None:
            self._task.cancel()
            for task in self._running:
                task.cancel()
            for task in (self._task, *self._running):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            self._task = None
        while not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(NotReady("the server is shutting down"))
        self._set_depth()
        if self._own_executors:
            loop = asyncio.get_running_loop()
            for executor in self._executors:
                await loop.run_in_executor(None, executor.shutdown)

    # ------------------------------------------------------------------------------------------ requests

    @property
    def engine_s_per_image(self) -> float:
        """Recent engine seconds per image (0 before the first batch)."""
        return self._per_image_s

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that will `submit` once decoded, so an open batch waits for it (up to the delay)."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    def submit(self, image: np.ndarray, deadline: float | None = None) -> asyncio.Future[ImageResult]:
        """Queue one image; its future completes with its result or a ServerError. QueueFull when full.
        `deadline` (perf_counter seconds, the request's end-to-end one): past it, the image never joins a batch."""
        if self._task is None:
            raise NotReady("the batcher is not running")
        pending = Pending(image=image, future=asyncio.get_running_loop().create_future(), deadline=deadline)
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise QueueFull(f"the queue is full ({self.config.max_queue_size} images waiting); retry shortly") from None
        self._set_depth()
        return pending.future

    # ------------------------------------------------------------------------------------------ batching

    async def _run(self) -> None:
        free: asyncio.PriorityQueue[int] = asyncio.PriorityQueue()  # the lowest-numbered free instance first
        for instance in range(len(self._infers)):
            free.put_nowait(instance)
        while True:
            instance = await free.get()
            batch = await self._wait_for_batch()
            free.put_nowait(instance)
            if not batch:
                continue
            # Taken again now the batch is formed: the lowest free one, so at low load one warm instance does
            # the work (its caches and threads stay hot) instead of alternating with the one taken meanwhile.
            instance = free.get_nowait()
            task = asyncio.get_running_loop().create_task(self._run_batch(batch, instance))
            self._running.add(task)
            task.add_done_callback(functools.partial(self._batch_done, free, instance))

    def _batch_done(self, free: asyncio.PriorityQueue[int], instance: int, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        free.put_nowait(instance)

    async def _wait_for_batch(self) -> list[Pending]:
        """Block for a first image, then gather more until full, the deadline, or nothing more is coming."""
        batch: list[Pending] = []
        first = await self._queue.get()
        self._take(first, batch)
        deadline = first.enqueued_at + self.config.max_queue_delay_s
        while len(batch) < self._fitting_size(batch):
            try:
                self._take(self._queue.get_nowait(), batch)
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._incoming == 0 or not batch:
                break
            try:
                pending = await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11
                break
            self._take(pending, batch)
        self._set_depth()
        return batch

    def _fitting_size(self, batch: list[Pending]) -> int:
        """The largest batch that, at the recent engine time per image, ends before every deadline in `batch`."""
        deadlines = [p.deadline for p in batch if p.deadline is not None]
        if not deadlines or self._per_image_s <= 0:
            return self.config.max_batch_size
        slack = min(deadlines) - time.perf_counter()
        return max(len(batch), min(self.config.max_batch_size, int(slack / self._per_image_s)))

    def _take(self, pending: Pending, batch: list[Pending]) -> None:
        """Add to the batch unless its client is gone or it waited too long (then answered here, not inferred)."""
        if pending.future.done():  # cancelled: the client went away
            return
        now = time.perf_counter()
        waited = now - pending.enqueued_at
        if pending.deadline is not None and now + self._per_image_s > pending.deadline:
            late = "passed" if now > pending.deadline else "would pass before its inference ends"
            pending.future.set_exception(
                RequestTimeout(f"the request's deadline {late} after {waited * 1000:.0f} ms in the queue")
            )
            return
        if waited > self.config.request_timeout_s:
            pending.future.set_exception(
                RequestTimeout(
                    f"waited {waited * 1000:.0f} ms in the queue (limit {self.config.request_timeout_s * 1000:.0f} ms)"
                )
            )
            return
        batch.append(pending)

    async def _run_batch(self, batch: list[Pending], instance: int) -> None:
        started = time.perf_counter()
        # One image and nothing else to do (no other batch, none queued or being decoded): the engine's solo path.
        alone = len(batch) == 1 and len(self._running) == 1 and self._queue.empty() and self._incoming == 0
        solo = self._solos[instance]
        infer = solo if alone and solo is not None else self._infers[instance]
        if self._metrics is not None:
            for pending in batch:
                self._metrics.queue_wait.observe(started - pending.enqueued_at)
        loop = asyncio.get_running_loop()
        try:
            output = await loop.run_in_executor(
                self._executors[instance], self._infer_batch, instance, [p.image for p in batch], infer
            )
            inference_s = time.perf_counter() - started
            check_batch_output(output, len(batch))
        except asyncio.CancelledError:  # stop() while this batch ran: its requests get an answer too
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(NotReady("the server is shutting down"))
            raise
        except Exception as exc:
            logger.exception("engine failed on a batch of %d images", len(batch))
            error = EngineError(f"inference failed: {type(exc).__name__}: {exc}")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        per_image = inference_s / len(batch)
        self._per_image_s = per_image if self._per_image_s <= 0 else 0.8 * self._per_image_s + 0.2 * per_image
        if self._metrics is not None:
            self._metrics.observe_batch(len(batch), inference_s)
        for i, pending in enumerate(batch):
            if pending.future.done():
                continue
            pending.future.set_result(
                ImageResult(
                    num_detections=int(output.num_detections[i]),
                    boxes=output.boxes[i],
                    scores=output.scores[i],
                    classes=output.classes[i],
                    queue_s=started - pending.enqueued_at,
                    inference_s=inference_s,
                    batch_size=len(batch),
                )
            )

    def _infer_batch(self, instance: int, images: list[np.ndarray], infer: InferFn) -> EngineOutput:
        """On the instance's thread: copy the images into its batch buffer, run `infer` (its engine's) on it."""
        batch = self._buffers[instance][: len(images)]
        for slot, image in zip(batch, images):
            slot[...] = image
        return infer(batch)

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(self._queue.qsize())


def check_batch_output(output: EngineOutput, expected: int) -> None:
    """The engine answered every image of the batch, in the contract's shapes."""
    sizes = {
        "num_detections": output.num_detections.shape[0] if output.num_detections.ndim == 1 else -1,
        "boxes": output.boxes.shape[0] if output.boxes.ndim == 3 and output.boxes.shape[2] == 4 else -1,
        "scores": output.scores.shape[0] if output.scores.ndim == 2 else -1,
        "classes": output.classes.shape[0] if output.classes.ndim == 2 else -1,
    }
    wrong = {name: size for name, size in sizes.items() if size != expected}
    if wrong:
        raise RuntimeError(
            f"the engine returned results for the wrong number of images (batch of {expected}; "
            + ", ".join(f"{name}: {size if size >= 0 else 'bad shape'}" for name, size in wrong.items())
            + ")"
        )
