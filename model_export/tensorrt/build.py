"""Exported ONNX -> serialised TensorRT engine + its JSON description.

    inspect_onnx   the file exists, parses, carries ssd-serve metadata and the contract's input, and passes the
                   pre-flight graph checks (no uint8 intermediates, TopK K <= 3840; see preflight.py) (pure Python)
    build_engine   TensorRT's OnnxParser -> one optimisation profile for `images` -> fp32 or fp16 -> plan bytes,
                   written atomically together with `<engine>.json`

TensorRT and cuda-python are imported inside the functions that need them (no import-time side effects).
Nothing asked for is quietly changed: fp16 on a GPU without fast fp16 is an error, and fp32 means fp32
(TensorRT's default TF32 for fp32 layers is switched off). fp16 is the network only: the post-processing layers
are pinned to float32 (`pin_postprocess_fp32`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from model_export.contract.engine import (
    OUTPUTS,
    BatchProfile,
    BuildFacts,
    EngineDescription,
    GpuFacts,
    Precision,
    batch_profile,
)
from model_export.errors import ExportError
from model_export.contract.metadata import INPUT_NAME, METADATA_KEY, ModelMetadata, sidecar_path
from model_export.contract.cuda import Cuda
from model_export.tensorrt.preflight import preflight_problems

MIN_TENSORRT_MAJOR = 10
TENSORRT_HINT = (
    "pip install 'ssd-serve[gpu]' on a host with an NVIDIA GPU "
    "(TensorRT wheels come from NVIDIA; see https://docs.nvidia.com/deeplearning/tensorrt/)"
)


@dataclass(frozen=True)
class BuildOptions:
    precision: Precision = "fp32"
    profile: BatchProfile = field(default_factory=batch_profile)
    workspace_gb: float | None = None  # None: TensorRT's default (the device's memory)
    verbose: bool = False  # TensorRT's INFO messages too, not only warnings


@dataclass(frozen=True)
class OnnxFacts:
    path: Path
    metadata: ModelMetadata
    input_size: tuple[int, int]  # (H, W) of `images` [B, H, W, 3]
    sha256: str
    data: bytes


def inspect_onnx(path: Path) -> OnnxFacts:
    """Check the file is an ssd-serve export TensorRT can take; raise ExportError saying what is wrong."""
    try:
        import onnx
    except ImportError:
        raise ExportError("the onnx package is not installed: pip install 'ssd-serve[export]'") from None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"ONNX file not found: {path}") from None
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise ExportError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise ExportError(f"{path} is not a valid ONNX model (it has no graph)")

    entries = {prop.key: prop.value for prop in model.metadata_props}
    if METADATA_KEY not in entries:
        raise ExportError(
            f"{path} has no {METADATA_KEY!r} metadata: only files written by `python -m model_export` can be built"
        )
    try:
        metadata = ModelMetadata.from_json(entries[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"{path}: unreadable {METADATA_KEY!r} metadata ({exc})") from exc

    if metadata.extra.get("numerics") == "integer":
        # uint8 QuantizeLinear with a non-zero zero point: TensorRT's explicit quantisation is symmetric int8.
        raise ExportError(
            f"{path} computes in uint8 (--numerics integer), which TensorRT cannot run; "
            f"re-export it with --numerics float"
        )
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if [value.name for value in inputs] != [INPUT_NAME]:
        raise ExportError(f"{path}: expected one input {INPUT_NAME!r}, found {[v.name for v in inputs]}")
    tensor = inputs[0].type.tensor_type
    if tensor.elem_type != onnx.TensorProto.UINT8:
        dtype = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise ExportError(f"{path}: input {INPUT_NAME!r} must be uint8, it is {dtype}")
    dims = [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in tensor.shape.dim]
    if len(dims) != 4 or dims[3] != 3:
        raise ExportError(f"{path}: input {INPUT_NAME!r} must be [B, H, W, 3], it is {dims}")
    if isinstance(dims[0], int) and dims[0] > 0:
        raise ExportError(
            f"{path}: the batch axis of {INPUT_NAME!r} is fixed at {dims[0]}; re-export it (dynamic batch)"
        )
    if not all(isinstance(d, int) and d > 0 for d in dims[1:3]):
        raise ExportError(f"{path}: input {INPUT_NAME!r} needs a fixed height and width, it is {dims}")
    input_size = (int(dims[1]), int(dims[2]))
    if input_size != tuple(metadata.input_size):
        raise ExportError(
            f"{path}: input {INPUT_NAME!r} is {input_size[0]}x{input_size[1]} but the metadata says "
            f"{metadata.input_size[0]}x{metadata.input_size[1]}"
        )
    missing = sorted(set(OUTPUTS) - {value.name for value in model.graph.output})
    if missing:
        raise ExportError(f"{path}: outputs {missing} of the model contract are missing")
    problems = preflight_problems(model)
    if problems:
        raise ExportError(f"{path} cannot be built by TensorRT: " + "; ".join(problems) + "; re-export it")
    return OnnxFacts(path, metadata, input_size, hashlib.sha256(data).hexdigest(), data)


def import_tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        if "lib" in str(exc) and ".so" in str(exc):  # the wheel is there, a CUDA/TensorRT library it loads is not
            raise ExportError(f"TensorRT is installed but cannot load a library it needs ({exc}): {TENSORRT_HINT}") from None
        raise ExportError(f"TensorRT is not installed: {TENSORRT_HINT}") from None
    major = _major(tensorrt.__version__)
    if major < MIN_TENSORRT_MAJOR:
        raise ExportError(f"TensorRT {tensorrt.__version__} is too old: {MIN_TENSORRT_MAJOR}.0 or later is needed")
    return tensorrt


def build_engine(onnx_path: Path, out: Path, options: BuildOptions, cuda: Cuda | None = None) -> EngineDescription:
    """Build `out` and `out.json` from `onnx_path` on the current GPU; return what the JSON says."""
    onnx = inspect_onnx(onnx_path)
    trt = import_tensorrt()
    cuda = cuda if cuda is not None else Cuda()
    gpu = cuda.gpu(0)
    _say(f"building {out.name} from {onnx_path.name}: {options.precision}, batch {_batches(options.profile)}, "
         f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}); this takes minutes")
    plan = _build_plan(trt, onnx, options, gpu)
    description = EngineDescription(
        metadata=onnx.metadata,
        build=BuildFacts(
            tensorrt_version=trt.__version__,
            gpu_name=gpu.name,
            compute_capability=gpu.compute_capability,
            precision=options.precision,
            profile=options.profile,
            onnx_sha256=onnx.sha256,
        ),
    )
    with atomic_output(out) as engine_tmp, atomic_output(sidecar_path(out)) as json_tmp:
        engine_tmp.write_bytes(plan)
        json_tmp.write_text(description.to_json() + "\n")
    return description


def _build_plan(trt: ModuleType, onnx: OnnxFacts, options: BuildOptions, gpu: GpuFacts) -> memoryview:
    logger = make_logger(trt, verbose=options.verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, options.precision))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx.data, str(onnx.path)):
        lines = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise ExportError(f"TensorRT could not parse {onnx.path}:\n" + "\n".join(f"  {line}" for line in lines))

    height, width = onnx.input_size
    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    set_precision(trt, builder, config, options.precision, gpu)
    if options.precision == "fp16":
        pin_postprocess_fp32(trt, network, config)
    profile = builder.create_optimization_profile()
    p = options.profile
    profile.set_shape(INPUT_NAME, (p.min, height, width, 3), (p.opt, height, width, 3), (p.max, height, width, 3))
    config.add_optimization_profile(profile)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "\n".join(f"  {message}" for message in logger.errors) or "  (TensorRT logged no error)"
        raise ExportError(f"TensorRT could not build an engine from {onnx.path}:\n{errors}")
    return memoryview(plan)


STRONGLY_TYPED_SINCE = (10, 12)  # TensorRT deprecates weakly typed precision (BuilderFlag.FP16) from here on


def network_flags(trt: ModuleType, precision: Precision) -> int:
    """fp32 on TensorRT >= 10.12: a strongly typed network (every tensor keeps the ONNX file's float32), the mode
    that replaces the deprecated weak typing; fp16 still needs weak typing (BuilderFlag.FP16, deprecated but present
    in 10.x) because the exported file is float32 throughout. Every TensorRT 10 network has an explicit batch axis."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    if precision == "fp32" and flag is not None and _version(trt.__version__) >= STRONGLY_TYPED_SINCE:
        return 1 << int(flag)
    return 0


def set_precision(trt: ModuleType, builder: Any, config: Any, precision: Precision, gpu: GpuFacts) -> None:
    if precision == "fp32":
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:  # on by default for fp32 layers on Ampere and later; fp32 means fp32 here
            config.clear_flag(tf32)
        return
    fp16 = getattr(trt.BuilderFlag, "FP16", None)
    if fp16 is None:
        raise ExportError(
            f"TensorRT {trt.__version__} has no FP16 builder flag (TensorRT 11 removed weakly typed precision): "
            "build with --precision fp32, or use TensorRT 10 for fp16"
        )
    fast = getattr(builder, "platform_has_fast_fp16", None)
    if fast is None:
        fast = _fast_fp16(gpu.compute_capability)
    if not fast:
        raise ExportError(
            f"{gpu.name} (compute capability {gpu.compute_capability}) has no fast fp16: "
            "build with --precision fp32"
        )
    if _version(trt.__version__) >= STRONGLY_TYPED_SINCE:
        _say(f"note: TensorRT {trt.__version__} deprecates the FP16 builder flag this fp16 build uses (weak typing); "
             "TensorRT 11 removes it, and fp16 builds are refused there")
    config.set_flag(fp16)


POSTPROCESS_SCOPE = "/postprocess/"  # the exporter's module name: ExportableSSD.postprocess


def pin_postprocess_fp32(trt: ModuleType, network: Any, config: Any) -> int:
    """Keep box decoding, sigmoid/softmax, thresholds, TopK and NMS in float32 in an fp16 build.

    FP16 lets TensorRT pick fp16 for any layer; the detection tail compares scores with thresholds and with each
    other, where fp16 rounding (about 5e-4 near 0.5) would reorder ties and move boxes by ~0.1 px at 300x300.
    Every layer the ONNX parser made from a node under `/postprocess/` gets precision float32 (and float32
    outputs where it outputs floats), enforced with OBEY_PRECISION_CONSTRAINTS. Returns the number of layers pinned.
    (TensorRT >= 10.12 deprecates this weakly typed mode; TensorRT 11 has no FP16 flag and is refused before here.)
    """
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if POSTPROCESS_SCOPE not in layer.name:
            continue
        floats = (trt.float32, trt.float16)
        float_outputs = [i for i in range(layer.num_outputs) if layer.get_output(i).dtype in floats]
        inputs = [layer.get_input(i) for i in range(layer.num_inputs)]
        if not float_outputs and not any(t is not None and t.dtype in floats for t in inputs):
            continue  # integer or boolean arithmetic only (index maths): nothing to pin
        layer.precision = trt.float32
        for i in float_outputs:
            layer.set_output_type(i, trt.float32)
        pinned += 1
    if pinned:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return pinned


def make_logger(trt: ModuleType, verbose: bool) -> Any:
    """A TensorRT logger that prints warnings (and INFO when verbose) and keeps errors for the final message."""
    severity = trt.ILogger.Severity
    shown = int(severity.INFO if verbose else severity.WARNING)

    class Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, message: str) -> None:
            if int(level) <= int(severity.ERROR):
                self.errors.append(message)
                if verbose:
                    print(f"[TensorRT] {message}", file=sys.stderr)
            elif int(level) <= shown:
                print(f"[TensorRT] {message}", file=sys.stderr)

    return Logger()


def describe_parser_error(error: Any) -> str:
    """One line per ONNX parser error: node, operator, description."""
    desc = _call(error, "desc") or str(error)
    node = _call(error, "node")
    if node is None or int(node) < 0:
        return desc
    name = _call(error, "node_name") or f"#{node}"
    op = _call(error, "node_operator")
    return f"node {name} ({op}): {desc}" if op else f"node {name}: {desc}"


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only when the block succeeds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ExportError(f"cannot write to {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # an accessor a given TensorRT version lacks or cannot answer
        return None


def _fast_fp16(compute_capability: str) -> bool:
    major, minor = (int(part) for part in compute_capability.split("."))
    return major >= 7 or (major, minor) in {(5, 3), (6, 0), (6, 2)}


def _version(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return 0, 0


def _major(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError:
        return 0


def _batches(profile: BatchProfile) -> str:
    return f"{profile.min}..{profile.max} (optimised for {profile.opt})"


def _say(message: str) -> None:
    print(message, file=sys.stderr)
