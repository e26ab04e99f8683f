"""JPEG decode and resize on the GPU, for the torch engine on CUDA (`--engine torch --device cuda`).

    read_header     bytes -> JpegHeader (format, size, EXIF orientation; PIL reads the header only) or None when the
                    file is not a baseline-decodable RGB/grey JPEG (the CPU path takes those)
    orient          an image tensor [C, H, W] turned as its EXIF orientation says (PIL's exif_transpose)
    resize_to_input uint8 [3, h, w] -> uint8 [H, W, 3]: bilinear, half-pixel centres, no antialiasing, on float, rounded
                    (torch's F.interpolate: the filter the CPU path approximates within one uint8 step)
    GpuDecoder      gathers the JPEGs of concurrent requests for up to `max_delay_s`, decodes them with nvJPEG in one
                    batched `torchvision.io.decode_jpeg(list, device="cuda")` call, orients and resizes each on the GPU
                    and copies the batch's small uint8 inputs back to the host once

Anything the GPU path does not take (PNG, WebP, CMYK JPEGs, a file nvJPEG refuses) goes back to the caller as None,
which runs the CPU path (`server.preprocess.preprocess`), so every error message and status stays the CPU path's.
nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: pixels differ by a few uint8 steps, detections within
the tolerances stated in the GPU test. torch and torchvision are imported by the engine that builds a GpuDecoder.
"""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from server.preprocess import PreparedImage

_NVJPEG_MODES = frozenset({"RGB", "L"})  # YCbCr or grey JPEGs; CMYK/YCCK go to the CPU path


@dataclass(frozen=True)
class JpegHeader:
    width: int  # as stored
    height: int
    orientation: int  # EXIF 1..8 (1: as stored)

    @property
    def displayed_size(self) -> tuple[int, int]:
        """(width, height) after orientation."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def read_header(data: bytes, max_pixels: int) -> JpegHeader | None:
    """The facts the GPU path needs, from the header alone; None for anything it should leave to the CPU path
    (not a JPEG, a JPEG nvJPEG does not convert to RGB, an empty, unreadable or too large file: the CPU path
    reports those with its own errors)."""
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        return None
    width, height = image.size
    if image.mode not in _NVJPEG_MODES or width < 1 or height < 1 or width * height > max_pixels:
        return None
    try:
        orientation = int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: the CPU path decides what it means
        return None
    return JpegHeader(width, height, orientation if 1 <= orientation <= 8 else 1)


def orient(image: Any, orientation: int) -> Any:
    """[C, H, W] -> the displayed image, as PIL's ImageOps.exif_transpose turns it."""
    if orientation == 2:
        return image.flip(2)
    if orientation == 3:
        return image.flip(1).flip(2)
    if orientation == 4:
        return image.flip(1)
    if orientation == 5:
        return image.transpose(1, 2)
    if orientation == 6:
        return image.transpose(1, 2).flip(2)  # rotated 90 degrees clockwise
    if orientation == 7:
        return image.transpose(1, 2).flip(1).flip(2)
    if orientation == 8:
        return image.transpose(1, 2).flip(1)  # rotated 90 degrees counter-clockwise
    return image


def resize_to_input(image: Any, size: tuple[int, int]) -> Any:
    """uint8 [3, h, w] (any device) -> uint8 [H, W, 3]: bilinear, half-pixel centres, no antialias, rounded."""
    import torch
    from torch.nn import functional

    if tuple(image.shape[1:]) == tuple(size):
        return image.permute(1, 2, 0)
    resized = functional.interpolate(
        image[None].to(torch.float32), size=size, mode="bilinear", align_corners=False, antialias=False
    )  # [1, 3, H, W]
    return resized[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


@dataclass
class _Job:
    data: bytes
    header: JpegHeader
    future: asyncio.Future[PreparedImage | None]


class GpuDecoder:
    """Batched nvJPEG decode + GPU resize; one instance per engine, used from the server's event loop."""

    def __init__(self, device: Any, input_size: tuple[int, int], max_batch: int = 64,
                 max_delay_s: float = 0.0005) -> None:
        self.device, self.input_size = device, tuple(input_size)
        self.max_batch, self.max_delay_s = max_batch, max_delay_s
        self._pending: list[_Job] = []
        self._flush: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # One thread: nvJPEG's batched decode is the unit of parallelism; the engine has its own thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-decode")
        self._headers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jpeg-header")

    async def prepare(self, data: bytes, max_pixels: int) -> PreparedImage | None:
        """The image ready for the batcher, or None: the CPU path should take it."""
        loop = asyncio.get_running_loop()
        header = await loop.run_in_executor(self._headers, read_header, data, max_pixels)
        if header is None:
            return None
        job = _Job(data, header, loop.create_future())
        self._pending.append(job)
        if len(self._pending) >= self.max_batch:  # a full batch goes now
            if self._flush is not None:
                self._flush.cancel()
                self._flush = None
            jobs, self._pending = self._pending, []
            self._keep(loop.create_task(self._run(jobs)))
        elif self._flush is None:  # the first of a batch: the rest may join for max_delay_s
            self._flush = self._keep(loop.create_task(self._flush_after(self.max_delay_s)))
        return await job.future

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        jobs, self._pending, self._flush = self._pending, [], None
        await self._run(jobs)

    async def _run(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._thread, self.decode_batch, [(j.data, j.header) for j in jobs])
        except Exception as exc:  # noqa: BLE001 - a CUDA failure: every image of the batch gets it
            results = [exc] * len(jobs)
        for job, result in zip(jobs, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def decode_batch(self, items: list[tuple[bytes, JpegHeader]]) -> list[PreparedImage | None]:
        """nvJPEG on the whole batch; a batch nvJPEG refuses is retried image by image, and what still fails is
        left to the CPU path (None)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        start = time.perf_counter()
        encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data, _ in items]
        try:
            decoded: list[Any] = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # "does not return partial results in case of an error"
            decoded = []
            for tensor in encoded:
                try:
                    decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    decoded.append(None)
        inputs = [None if image is None else resize_to_input(orient(image, header.orientation), self.input_size)
                  for image, (_, header) in zip(decoded, items, strict=True)]
        done = [i for i, image in enumerate(inputs) if image is not None]
        host = torch.stack([inputs[i] for i in done]).cpu().numpy() if done else None  # one copy back: [n, H, W, 3]
        seconds = (time.perf_counter() - start) / max(1, len(items))
        results: list[PreparedImage | None] = [None] * len(items)
        for row, i in enumerate(done):
            width, height = items[i][1].displayed_size
            results[i] = PreparedImage(pixels=host[row], width=width, height=height, decode_s=seconds)
        return results

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._headers.shutdown(wait=False, cancel_futures=True)
