"""The torch engine's CUDA path: network in fp16 (or fp32) channels-last, replayed from CUDA graphs, post-processing
on the GPU in float32, and only the contract's small tensors copied back.

    CudaRunner.run  uint8 [B, H, W, 3] (host) -> one host-to-device copy -> normalise (float32) -> the network, from
                    the CUDA graph captured for the smallest captured batch size >= B (the batch is zero-padded up
                    to it, the padding rows dropped before post-processing) or eagerly -> post-processing in
                    float32 (decode, scores, NMS: data-dependent shapes, never captured) -> 4 small tensors to host

Graphs are captured for the batch sizes the server warms up (1, 2, 4, ..., max: `capture_sizes`), on the first
run at each size, all in one memory pool (they run one at a time, on the engine's thread). Set `graphs=False` for
eager runs only. TF32 follows `server.engines.torch.set_tf32` (off unless fp16).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("server.engines.torch_gpu")


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... and max_batch_size: the sizes the pipeline's warm-up runs."""
    sizes, size = {max_batch_size}, 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def graph_size_for(batch: int, captured: list[int]) -> int | None:
    """The smallest captured size that holds `batch` images, or None (run eagerly)."""
    return next((size for size in sorted(captured) if size >= batch), None)


class _Graph:
    """One captured network run: static input [B, 3, H, W] -> static (regression, logits)."""

    def __init__(self, torch: Any, network: Any, static_input: Any) -> None:
        self.input = static_input
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):  # cuDNN picks its algorithms and the allocator settles before capture
                network(static_input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=_Graph.pool(torch)):
            self.outputs = network(static_input)

    _pool: Any = None

    @classmethod
    def pool(cls, torch: Any) -> Any:
        if cls._pool is None:
            cls._pool = torch.cuda.graph_pool_handle()
        return cls._pool


class CudaRunner:
    """ExportableSSD on one CUDA device, as the module docstring says."""

    def __init__(self, torch: Any, module: Any, device: Any, fp16: bool, max_batch_size: int,
                 graphs: bool = True) -> None:
        self.torch, self.module, self.device, self.fp16 = torch, module, device, fp16
        self.dtype = torch.float16 if fp16 else torch.float32
        self.network = module.network.to(device=device, dtype=self.dtype, memory_format=torch.channels_last)
        self.to_capture = set(capture_sizes(max_batch_size)) if graphs else set()
        self.graphs: dict[int, _Graph] = {}

    def run(self, images: Any) -> tuple[Any, Any, Any, Any]:
        torch = self.torch
        batch = images.shape[0]
        with torch.inference_mode():
            device_images = torch.from_numpy(images).to(self.device, non_blocking=False)
            x = self.module.normalise(device_images).to(self.dtype).contiguous(memory_format=torch.channels_last)
            regression, logits = self._network(x, batch)
            num, boxes, scores, classes = self.module.postprocess(regression.float(), logits.float())
            return (num.to(torch.int32).cpu().numpy(), boxes.float().cpu().numpy(), scores.float().cpu().numpy(),
                    classes.to(torch.int32).cpu().numpy())

    def _network(self, x: Any, batch: int) -> tuple[Any, Any]:
        if batch in self.to_capture and batch not in self.graphs:
            self.to_capture.discard(batch)
            try:
                self.graphs[batch] = _Graph(self.torch, self.network, self.torch.zeros_like(x))
            except RuntimeError as exc:  # an op that cannot be captured: say so, and run eagerly from now on
                logger.warning("CUDA graph capture at batch %d failed (%s): running the network eagerly", batch, exc)
                self.to_capture.clear()
        size = graph_size_for(batch, list(self.graphs))
        if size is None:
            return self.network(x)
        graph = self.graphs[size]
        graph.input[:batch].copy_(x)
        if size > batch:
            graph.input[batch:].zero_()
        graph.graph.replay()
        regression, logits = graph.outputs
        return regression[:batch], logits[:batch]  # views of the static outputs: consumed before the next replay
