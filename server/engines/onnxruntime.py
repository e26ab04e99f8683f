"""ONNX Runtime engine: the exported .onnx file on CPUExecutionProvider, or on CUDAExecutionProvider with IO binding.

load    one InferenceSession (intra-op threads as configured, sequential execution, all graph optimisations);
        the description is read from the file's own metadata; the input and outputs are checked against the contract
infer   CPU: session.run; CUDA: the batch is copied to the device once (OrtValue), outputs bound to host memory
infer_solo  the same, for a batch the batcher runs while nothing else runs: on the CPU, a second session of the
        file whose threads spin while it runs (made on the first call)

On CUDA (`cuda_provider_options`): TF32 off unless fp16 is asked for (ORT has no fp16 mode for a float32 file;
TF32 convolutions are the reduced precision it offers), and cuDNN's HEURISTIC algorithm choice, so that a batch
size the warm-up did not run does not trigger an EXHAUSTIVE search under live traffic. An integer (QDQ) export is
refused on CUDA: its QLinearConv arithmetic is bit-exact on the CPU only.
"""

from __future__ import annotations

import re
import os
from pathlib import Path
from typing import Any

import numpy as np

from model_export.contract.cpu import exact_integer_options
from model_export.contract.metadata import METADATA_KEY, ModelMetadata
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


# The CUDA and cuDNN libraries onnxruntime-gpu's CUDA provider loads (CUDA major as built; cuDNN 9).
CUDA_LIBRARIES = ("libcudart.so.{cuda}", "libcublas.so.{cuda}", "libcublasLt.so.{cuda}", "libcufft.so.{cufft}",
                  "libcudnn.so.9")
_CUFFT_MAJOR = {12: 11, 13: 12}  # cuFFT's soname major in each CUDA major


def cuda_provider_options(device_id: int, fp16: bool) -> dict[str, str]:
    return {
        "device_id": str(device_id),
        "use_tf32": "1" if fp16 else "0",
        "cudnn_conv_algo_search": "HEURISTIC",
    }


def missing_cuda_libraries(cuda_major: int) -> list[str]:
    from server.engines.cuda import loadable

    names = [n.format(cuda=cuda_major, cufft=_CUFFT_MAJOR.get(cuda_major, cuda_major - 1)) for n in CUDA_LIBRARIES]
    return [name for name in names if not loadable(name)]


def explain_missing_cuda(ort: Any) -> str:
    """Why the CUDA provider did not register: no GPU, or which CUDA/cuDNN library is missing."""
    from server.engines.cuda import visible_gpu_count

    if visible_gpu_count() == 0:
        return "no NVIDIA GPU (or driver) is visible to this process"
    cuda_major = provider_cuda_major(ort)
    if cuda_major is None:
        return "this onnxruntime carries no CUDA provider library (libonnxruntime_providers_cuda.so)"
    missing = missing_cuda_libraries(cuda_major)
    if missing:
        return (f"{', '.join(missing)} cannot be loaded: install onnxruntime-gpu[cuda,cudnn] (CUDA {cuda_major} "
                "and cuDNN 9 from PyPI), or run in NVIDIA's NGC image; README, GPU section, lists the driver and CUDA "
                "pairs")
    return "the CUDA and cuDNN libraries load, so see onnxruntime's own log above for the reason"


def provider_cuda_major(ort: Any) -> int | None:
    """The CUDA major onnxruntime-gpu's CUDA provider was built against (the libcudart soname it links)."""
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return None
    match = re.search(rb"libcudart\.so\.(\d+)", library.read_bytes())  # read only on this failure path
    return int(match.group(1)) if match else None


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


def session_options_for(ort: Any, intra_op_threads: int, *, spin: bool = False) -> Any:
    """The server's SessionOptions: intra-op threads as given (0: ORT's default), sequential, all optimisations,
    exact integer convs on x86 CPUs without VNNI (model_export.contract.cpu). `spin`: `solo_session_options_for`'s
    threads (each config entry is set once: ORT warns on stderr, outside the JSON logs, when one is overwritten)."""
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    session_options.inter_op_num_threads = 1
    session_options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's intra-op threads busy-wait for work by default. In the server the decode threads need those cores:
    # measured on 2 cores, spinning cost ~20% more CPU per image at batch 32 and, with small batches, ~2 ms of
    # CPU per request. Throughput wins here; a lone image gets the spinning session (solo_session_options_for).
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        session_options.add_session_config_entry("session.force_spinning_stop", "1")
    return exact_integer_options(session_options)


def solo_session_options_for(ort: Any, intra_op_threads: int) -> Any:
    """`session_options_for`, for a batch that runs while nothing else does (`OnnxRuntimeEngine.infer_solo`).

    Its intra-op threads spin between operators instead of sleeping and being woken at each one, and stop
    spinning as soon as the run returns (`session.force_spinning_stop`), so they take no CPU from the request's
    next steps. On 2 cores: ~1 ms less per lone image at 0.5-1.5 ms more CPU, spent on a core nothing else wanted
    (BENCHMARKS.md, section 5). The other session does not spin: under load a spinning thread takes the core a
    decode or the other instance needs (-8% throughput with spinning bounded to 100 us, -20% and more unbounded).
    """
    return session_options_for(ort, intra_op_threads, spin=True)


class OnnxRuntimeEngine:
    """The Engine protocol over one onnxruntime.InferenceSession (one batch at a time)."""

    def __init__(self) -> None:
        self._session: Any = None
        self._solo_session: Any = None  # CPU: infer_solo's, made on its first call
        self._ort: Any = None
        self._path: Path | None = None
        self._intra_op_threads = 0
        self._cuda_device: int | None = None

    def load(self, path: Path, options: EngineOptions) -> ModelMetadata:
        # ONNX Runtime's telemetry writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db when its
        # environment is created (on import); the variable stops that, the API call any later events.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        ort.disable_telemetry_events()

        if not path.is_file():
            raise EngineLoadError(f"model file not found: {path}")
        session_options = session_options_for(ort, options.intra_op_threads)

        if options.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineLoadError(
                    f"device {options.device!r} asked for, but this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu[cuda,cudnn] "
                    "in place of onnxruntime"
                )
            self._cuda_device = cuda_device_id(options.device)
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels of onnxruntime-gpu[cuda,cudnn]
                try:
                    ort.preload_dlls()
                except Exception:  # noqa: BLE001 - best effort: a library still missing is named below
                    pass
            cuda_options = cuda_provider_options(self._cuda_device, options.fp16)
            providers: list[Any] = [("CUDAExecutionProvider", cuda_options), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]

        try:
            session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as exc:
            raise EngineLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        metadata = read_metadata(session, path)
        if self._cuda_device is not None and metadata.extra.get("numerics") == "integer":
            raise EngineLoadError(
                f"{path} is an integer (QDQ) export: its uint8 arithmetic matches LiteRT bit for bit on the CPU "
                "(QLinearConv), which ONNX Runtime's CUDA provider is not known to do; serve it with --device cpu, "
                "or re-export with --numerics float for the GPU"
            )
        if self._cuda_device is not None and "CUDAExecutionProvider" not in session.get_providers():
            raise EngineLoadError(
                f"onnxruntime did not enable CUDAExecutionProvider for {path}: {explain_missing_cuda(ort)}"
            )
        check_contract(session, metadata, path)
        self._session, self._ort = session, ort
        self._path, self._intra_op_threads = path, options.intra_op_threads
        return metadata

    def infer(self, images: np.ndarray) -> EngineOutput:
        if self._session is None:
            raise RuntimeError("infer() before load()")
        if self._cuda_device is None:
            outputs = self._session.run(OUTPUT_NAMES, {INPUT_NAME: images})
        else:
            outputs = self._infer_bound(images)
        return _output(outputs)

    def infer_solo(self, images: np.ndarray) -> EngineOutput:
        """`infer` for a batch that runs while nothing else does: the same results, sooner, from a second session
        of the same file whose threads spin while it runs (`solo_session_options_for`); on CUDA, `infer`.

        The session is made on the first call (the batcher sends lone batches to its first instance only, which
        the server warms up with one): ~30 MB of RSS for the default model that the other instances do not spend."""
        if self._cuda_device is not None:
            return self.infer(images)
        if self._solo_session is None:
            if self._session is None:
                raise RuntimeError("infer_solo() before load()")
            options = solo_session_options_for(self._ort, self._intra_op_threads)  # the same threads: same results
            self._solo_session = self._ort.InferenceSession(
                str(self._path), options, providers=["CPUExecutionProvider"]
            )
        return _output(self._solo_session.run(OUTPUT_NAMES, {INPUT_NAME: images}))

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
        self._session = self._solo_session = None


def _output(outputs: list[np.ndarray]) -> EngineOutput:
    num_detections, boxes, scores, classes = outputs
    return EngineOutput(num_detections=num_detections, boxes=boxes, scores=scores, classes=classes)
