"""ONNX Runtime engine: the exported .onnx file on CPUExecutionProvider, or on CUDAExecutionProvider with IO binding.

load    one InferenceSession (intra-op threads as configured, sequential execution, all graph optimisations);
        the description is read from the file's own metadata; the input and outputs are checked against the contract
infer   CPU: session.run; CUDA: the batch is copied to the device once (OrtValue), outputs bound to host memory
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model_export.metadata import METADATA_KEY, ModelMetadata
from server.engines.base import EngineOptions, EngineOutput

INPUT_NAME = "images"
OUTPUT_NAMES = ("num_detections", "boxes", "scores", "classes")
_ONNX_TYPES = {
    INPUT_NAME: "tensor(uint8)",
    "num_detections": "tensor(int32)",
    "boxes": "tensor(float)",
    "scores": "tensor(float)",
    "classes": "tensor(int32)",
}


class EngineLoadError(RuntimeError):
    """The file cannot be served by this engine (missing, not an ssd-serve export, wrong contract, no device)."""


def cuda_device_id(device: str) -> int:
    _, _, index = device.partition(":")
    return int(index) if index else 0


def read_metadata(session: Any, path: Path) -> ModelMetadata:
    """The ssd-serve description embedded in the ONNX file's metadata_props."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise EngineLoadError(f"{path} carries no {METADATA_KEY!r} metadata: export it with python -m model_export")
    try:
        return ModelMetadata.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise EngineLoadError(f"{path}: unreadable {METADATA_KEY!r} metadata: {exc}") from exc


def check_contract(session: Any, metadata: ModelMetadata, path: Path) -> None:
    """The file's input and outputs are the contract's names, types and (static) shapes."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    problems = []
    if set(inputs) != {INPUT_NAME}:
        problems.append(f"inputs are {sorted(inputs)}, expected [{INPUT_NAME!r}]")
    missing = [name for name in OUTPUT_NAMES if name not in outputs]
    if missing:
        problems.append(f"outputs {missing} are missing")
    for name, expected in _ONNX_TYPES.items():
        arg = inputs.get(name) or outputs.get(name)
        if arg is not None and arg.type != expected:
            problems.append(f"{name} is {arg.type}, expected {expected}")
    image = inputs.get(INPUT_NAME)
    if image is not None:
        height, width = metadata.input_size
        if len(image.shape) != 4 or tuple(image.shape[1:]) != (height, width, 3):
            problems.append(f"input shape {image.shape} is not [batch, {height}, {width}, 3]")
    if problems:
        raise EngineLoadError(f"{path} does not follow the model contract: " + "; ".join(problems))


def session_options_for(ort: Any, intra_op_threads: int) -> Any:
    """The server's SessionOptions: intra-op threads as given (0: ORT's default), sequential, all optimisations."""
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    session_options.inter_op_num_threads = 1
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's intra-op threads busy-wait for work by default. In the server the decode threads need those cores:
    # measured on 2 cores, spinning cost ~20% more CPU per image at batch 32 and, with small batches, ~2 ms of
    # CPU per request, for ~3 ms less latency at batch 1. Throughput wins here.
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return session_options


class OnnxRuntimeEngine:
    """The Engine protocol over one onnxruntime.InferenceSession (one batch at a time)."""

    def __init__(self) -> None:
        self._session: Any = None
        self._ort: Any = None
        self._cuda_device: int | None = None

    def load(self, path: Path, options: EngineOptions) -> ModelMetadata:
        import onnxruntime as ort

        if not path.is_file():
            raise EngineLoadError(f"model file not found: {path}")
        session_options = session_options_for(ort, options.intra_op_threads)

        if options.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineLoadError(
                    f"device {options.device!r} asked for, but this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
                )
            self._cuda_device = cuda_device_id(options.device)
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": self._cuda_device}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]

        try:
            session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:
            raise EngineLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        if self._cuda_device is not None and "CUDAExecutionProvider" not in session.get_providers():
            raise EngineLoadError(f"onnxruntime did not enable CUDAExecutionProvider for {path} (see its log above)")
        metadata = read_metadata(session, path)
        check_contract(session, metadata, path)
        self._session, self._ort = session, ort
        return metadata

    def infer(self, images: np.ndarray) -> EngineOutput:
        if self._session is None:
            raise RuntimeError("infer() before load()")
        if self._cuda_device is None:
            outputs = self._session.run(OUTPUT_NAMES, {INPUT_NAME: images})
        else:
            outputs = self._infer_bound(images)
        num_detections, boxes, scores, classes = outputs
        return EngineOutput(num_detections=num_detections, boxes=boxes, scores=scores, classes=classes)

    def _infer_bound(self, images: np.ndarray) -> list[np.ndarray]:
        # The batch goes to the device in one copy; ORT allocates the outputs (their batch size varies) in host memory.
        binding = self._session.io_binding()
        device_images = self._ort.OrtValue.ortvalue_from_numpy(images, "cuda", self._cuda_device)
        binding.bind_ortvalue_input(INPUT_NAME, device_images)
        for name in OUTPUT_NAMES:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def close(self) -> None:
        self._session = None
