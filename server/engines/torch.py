"""PyTorch engine: the same exportable module the ONNX file was traced from, run eagerly in PyTorch.

The ONNX file stays the one artefact: its embedded description names the model source and the weights
(`model`, `weights_source`, `weights_sha256`, thresholds), and this engine rebuilds the module from them with the
exporter's own registry (`model_export.models.REGISTRY` + `ExportableSSD`):

- weights "coco": fetched as the exporter fetches them (`SSD_WEIGHTS_MIRROR` works here too);
- weights "random": the sources' seeded initialisation, identical on every build;
- a weights file name: looked up beside the model file, then in the working directory and weights/.

When the file records a weights sha256, the rebuilt weights must have the same one; otherwise loading fails.
CPU or CUDA; `fp16` (CUDA only) runs the network alone in float16; normalisation, decoding, sigmoid or softmax,
thresholds and NMS always run in float32 (`torch_gpu.CudaRunner`). TF32 is off unless fp16 is asked for
(`set_tf32`): fp32 means fp32, as in the other engines.
On CUDA the engine is GPU-resident (`server.engines.torch_gpu`: fp16 channels-last network replayed from CUDA
graphs, float32 post-processing on the GPU) and offers the pipeline `gpu_decoder` (`server.gpu_preprocess`: batched
nvJPEG decode and resize on the GPU). Needs the export extra (torch, torchvision, onnx) installed. torch is imported in `load`, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model_export.contract.metadata import METADATA_KEY, ModelMetadata
from server.engines.base import EngineOptions, EngineOutput


class TorchEngineError(RuntimeError):
    """The module cannot be rebuilt from the file's description, or the device is not available."""


def read_onnx_metadata(path: Path) -> ModelMetadata:
    import onnx

    if not path.is_file():
        raise TorchEngineError(f"model file not found: {path}")
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return ModelMetadata.from_json(entry.value)
    raise TorchEngineError(f"{path} carries no {METADATA_KEY!r} metadata: export it with python -m model_export")


def weights_argument(metadata: ModelMetadata, model_path: Path) -> str | None:
    """The exporter's --weights value that reproduces the file's weights."""
    source = metadata.weights_source
    if source == "random":
        return None
    if source == "coco":
        return "coco"
    for folder in (model_path.parent, Path.cwd(), Path("weights")):
        candidate = folder / source
        if candidate.is_file():
            return str(candidate)
    raise TorchEngineError(
        f"{model_path} was exported from the weights file {source!r}, which is not beside it, in the working "
        "directory or in weights/: put it there to run this model with the torch engine"
    )


def set_tf32(torch: Any, enabled: bool) -> None:
    """TF32 for float32 convolutions and matmuls (cuDNN convolutions default to TF32 on Ampere and later)."""
    precision = "tf32" if enabled else "ieee"
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9; mixing with allow_tf32 is an error
        conv.fp32_precision = precision
        torch.backends.cuda.matmul.fp32_precision = precision
    else:
        torch.backends.cudnn.allow_tf32 = enabled
        torch.backends.cuda.matmul.allow_tf32 = enabled


def run_module(torch: Any, module: Any, batch: Any) -> tuple[Any, Any, Any, Any]:
    """ExportableSSD on a uint8 batch, eagerly, in float32 (the CPU path; CUDA runs `torch_gpu.CudaRunner`)."""
    with torch.inference_mode():
        return module(batch)


class TorchEngine:
    """The Engine protocol over ExportableSSD in eager PyTorch (one batch at a time)."""

    def __init__(self) -> None:
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._fp16 = False
        self._runner: Any = None  # server.engines.torch_gpu.CudaRunner on CUDA
        self.gpu_decoder: Any = None  # server.gpu_preprocess.GpuDecoder on CUDA: the pipeline decodes JPEGs with it

    def load(self, path: Path, options: EngineOptions) -> ModelMetadata:
        import torch

        from model_export.exportable import ExportableSSD
        from model_export.models import REGISTRY
        from model_export.spec import PostprocessOptions

        device = torch.device(options.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TorchEngineError(f"device {options.device!r} asked for, but torch sees no CUDA device")
        if options.fp16 and device.type != "cuda":
            raise TorchEngineError("fp16 needs a CUDA device")
        if options.intra_op_threads > 0:
            torch.set_num_threads(options.intra_op_threads)
        set_tf32(torch, options.fp16)

        metadata = read_onnx_metadata(path)
        source = REGISTRY.get(metadata.model)
        if source is None:
            raise TorchEngineError(f"{path} is a {metadata.model!r} model, which this exporter version does not know")
        weights = weights_argument(metadata, path)
        numerics = metadata.extra.get("numerics")  # as exported (a TFLite import records it)
        model = source.build(weights, None, numerics)  # the source's own class count (COCO weights or a file)
        if tuple(model.labels) != tuple(metadata.labels) and weights is None:
            # A random-weight export made with --num-classes: labels[class_id] spans every class, background included.
            model = source.build(weights, len(metadata.labels), numerics)
        if metadata.weights_sha256 is not None and model.weights_sha256 != metadata.weights_sha256:
            raise TorchEngineError(
                f"the rebuilt weights (sha256 {model.weights_sha256}) are not the ones {path} was exported from "
                f"(sha256 {metadata.weights_sha256})"
            )
        if tuple(model.labels) != tuple(metadata.labels) or tuple(model.input_size) != tuple(metadata.input_size):
            raise TorchEngineError(f"the rebuilt {metadata.model} does not match {path} (labels or input size differ)")
        postprocess = PostprocessOptions(
            score_threshold=metadata.score_threshold,
            iou_threshold=metadata.iou_threshold,
            candidates_per_class=metadata.candidates_per_class,
            max_detections=metadata.max_detections,
        )
        self._module = ExportableSSD(model, postprocess).eval().to(device)
        self._torch, self._device, self._fp16 = torch, device, options.fp16
        if device.type == "cuda":  # the GPU-resident path: server.engines.torch_gpu, server.gpu_preprocess
            from server.engines.torch_gpu import CudaRunner
            from server.gpu_preprocess import GpuDecoder

            self._runner = CudaRunner(torch, self._module, device, options.fp16, options.max_batch_size)
            self.gpu_decoder = GpuDecoder(device, tuple(metadata.input_size), max_batch=options.max_batch_size)
        return metadata

    def infer(self, images: np.ndarray) -> EngineOutput:
        if self._module is None:
            raise RuntimeError("infer() before load()")
        if self._runner is not None:
            return EngineOutput(*self._runner.run(images))
        torch = self._torch
        batch = torch.from_numpy(images).to(self._device, non_blocking=True)
        num_detections, boxes, scores, classes = run_module(torch, self._module, batch)
        return EngineOutput(
            num_detections=num_detections.to(torch.int32).cpu().numpy(),
            boxes=boxes.float().cpu().numpy(),
            scores=scores.float().cpu().numpy(),
            classes=classes.to(torch.int32).cpu().numpy(),
        )

    def close(self) -> None:
        if self.gpu_decoder is not None:
            self.gpu_decoder.close()
        self._module = self._runner = self.gpu_decoder = None
