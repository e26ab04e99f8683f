"""The TensorRT builder: everything but TensorRT itself runs here (arguments, ONNX checks, error messages,
the engine's JSON, and the build steps against a stand-in `tensorrt` module that records what it is asked);
the tests marked `gpu` build real engines and run only where TensorRT and an NVIDIA GPU exist."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from model_export.contract.engine import (  # noqa: E402
    BatchProfile,
    BuildFacts,
    EngineDescription,
    GpuFacts,
    batch_profile,
    check_compatible,
    read_engine_description,
)
from model_export.contract.errors import ContractError  # noqa: E402
from model_export.contract.metadata import METADATA_KEY, ModelMetadata, sidecar_path  # noqa: E402
from model_export.tensorrt import build as build_module  # noqa: E402
from model_export.tensorrt.__main__ import main, parse_args  # noqa: E402
from model_export.tensorrt.build import BuildOptions, build_engine, inspect_onnx  # noqa: E402
from model_export.contract.cuda import Cuda, CudaError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GPU_REASON = "needs TensorRT and an NVIDIA GPU; TensorRT installs only from NVIDIA's index and this machine has no GPU"
FAKE_GPU = GpuFacts(name="NVIDIA Fake 80GB", compute_capability="9.0")

# ------------------------------------------------------------------------------------------------------------
# A small ONNX model with the contract's signature and a real SSD tail (also used by tests/server).
# ------------------------------------------------------------------------------------------------------------

LOGITS = 4  # background + 3 classes
GRID = 8  # anchors on an 8x8 grid: N = 64
CANDIDATES = 10  # NonMaxSuppression's max_output_boxes_per_class
MAX_DETECTIONS = 20  # K
SCORE_THRESHOLD = 0.4


def contract_metadata(size: int = 2 * GRID) -> ModelMetadata:
    return ModelMetadata(
        model="tiny-contract",
        input_size=(size, size),
        labels=("", "cat", "dog", "bird"),
        score_threshold=SCORE_THRESHOLD,
        iou_threshold=0.45,
        candidates_per_class=CANDIDATES,
        max_detections=MAX_DETECTIONS,
        score_activation="softmax",
        weights_source="random",
        weights_sha256=None,
        opset=17,
    )


def write_contract_onnx(path: Path, *, batch: int | str = "batch", metadata: ModelMetadata | None = None,
                        input_dtype: int = TensorProto.UINT8, extra_node: onnx.NodeProto | None = None) -> Path:
    """A small model with the contract's signature and a real SSD tail: conv heads -> decode -> softmax ->
    NonMaxSuppression -> ScatterElements -> TopK -> Gather, all standard opset-17 ops (ONNX Runtime and
    TensorRT both run it). Input [B, 16, 16, 3] uint8; outputs as the model contract, K = 20."""
    size = 2 * GRID
    n = GRID * GRID
    classes = LOGITS - 1
    rng = np.random.default_rng(0)
    weight = rng.normal(0.0, 0.6, size=(4 + LOGITS, 3, 2, 2)).astype(np.float32)
    bias = rng.normal(0.0, 0.2, size=(4 + LOGITS,)).astype(np.float32)
    centres = (np.stack(np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="xy"), -1).reshape(n, 2) + 0.5) / GRID
    sizes = np.full((n, 2), 2.5 / GRID)
    consts = {
        "W": weight, "Bc": bias,
        "shape_bcn": np.array([0, 4 + LOGITS, -1], np.int64),
        "split": np.array([4, LOGITS], np.int64),
        "a_cxcy": centres.astype(np.float32), "a_wh": sizes.astype(np.float32),
        "k_xy": np.float32(0.15), "k_wh": np.float32(0.3), "half": np.float32(0.5),
        "scale": np.float32(1 / 255), "shift": np.float32(-0.5), "lo": np.float32(0), "hi": np.float32(1),
        "s0": np.array([0], np.int64), "s1": np.array([1], np.int64), "s2": np.array([2], np.int64),
        "s4": np.array([4], np.int64), "sC": np.array([LOGITS], np.int64), "ax2": np.array([2], np.int64),
        "max_out": np.array([CANDIDATES], np.int64),
        "iou": np.array([0.45], np.float32), "thr": np.array([SCORE_THRESHOLD], np.float32),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64),
        "CN": np.array(classes * n, np.int64), "N": np.array(n, np.int64), "one": np.array(1, np.int64),
        "flat": np.array([-1], np.int64), "rows": np.array([-1, classes * n], np.int64),
        "k": np.array([MAX_DETECTIONS], np.int64), "fzero": np.float32(0), "izero": np.int32(0),
        "u2": np.array([2], np.int64), "rep4": np.array([1, 1, 4], np.int64), "ax1": np.array([1], np.int64),
    }
    N = helper.make_node
    nodes = [
        N("Cast", ["images"], ["x_f"], to=TensorProto.FLOAT),
        N("Transpose", ["x_f"], ["x_nchw"], perm=[0, 3, 1, 2]),
        N("Mul", ["x_nchw", "scale"], ["x_s"]), N("Add", ["x_s", "shift"], ["x"]),
        N("Conv", ["x", "W", "Bc"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),  # [B, 4+C, 8, 8]
        N("Reshape", ["y", "shape_bcn"], ["y_bcn"]), N("Transpose", ["y_bcn"], ["y_bnc"], perm=[0, 2, 1]),
        N("Split", ["y_bnc", "split"], ["deltas", "logits"], axis=2),  # [B, N, 4], [B, N, C]
        N("Slice", ["deltas", "s0", "s2", "ax2"], ["d_xy"]), N("Slice", ["deltas", "s2", "s4", "ax2"], ["d_wh"]),
        N("Mul", ["d_xy", "k_xy"], ["d_xy_s"]), N("Mul", ["d_xy_s", "a_wh"], ["off"]),
        N("Add", ["off", "a_cxcy"], ["cxcy"]),
        N("Mul", ["d_wh", "k_wh"], ["d_wh_s"]), N("Exp", ["d_wh_s"], ["e_wh"]), N("Mul", ["e_wh", "a_wh"], ["wh"]),
        N("Mul", ["wh", "half"], ["half_wh"]),
        N("Sub", ["cxcy", "half_wh"], ["x1y1"]), N("Add", ["cxcy", "half_wh"], ["x2y2"]),
        N("Concat", ["x1y1", "x2y2"], ["raw_boxes"], axis=2), N("Clip", ["raw_boxes", "lo", "hi"], ["dec_boxes"]),
        N("Softmax", ["logits"], ["probs"], axis=2),
        N("Slice", ["probs", "s1", "sC", "ax2"], ["cls_probs"]),  # background dropped: [B, N, C-1]
        N("Transpose", ["cls_probs"], ["cls_scores"], perm=[0, 2, 1]),  # [B, C-1, N]
        N("NonMaxSuppression", ["dec_boxes", "cls_scores", "max_out", "iou", "thr"], ["selected"]),  # [M, 3]
        N("Gather", ["selected", "i0"], ["sel_b"], axis=1), N("Gather", ["selected", "i1"], ["sel_c"], axis=1),
        N("Gather", ["selected", "i2"], ["sel_n"], axis=1),
        N("Mul", ["sel_b", "CN"], ["off_b"]), N("Mul", ["sel_c", "N"], ["off_c"]),
        N("Add", ["off_b", "off_c"], ["off_bc"]), N("Add", ["off_bc", "sel_n"], ["sel_flat"]),  # [M]
        N("Reshape", ["cls_scores", "flat"], ["all_scores"]),  # [B*(C-1)*N]
        N("Gather", ["all_scores", "sel_flat"], ["sel_scores"], axis=0),
        N("Mul", ["all_scores", "fzero"], ["zeros"]),
        N("ScatterElements", ["zeros", "sel_flat", "sel_scores"], ["kept"], axis=0),
        N("Reshape", ["kept", "rows"], ["ranked"]),  # [B, (C-1)*N]
        N("TopK", ["ranked", "k"], ["top_scores", "top_index"], axis=1),  # [B, K]
        N("Greater", ["top_scores", "fzero"], ["valid"]),
        N("Cast", ["valid"], ["valid_i"], to=TensorProto.INT32),
        N("ReduceSum", ["valid_i", "ax1"], ["num_detections"], keepdims=0),
        N("Mod", ["top_index", "N"], ["box_index"]), N("Div", ["top_index", "N"], ["cls0"]),
        N("Add", ["cls0", "one"], ["cls1"]), N("Cast", ["cls1"], ["cls_i"], to=TensorProto.INT32),
        N("Unsqueeze", ["box_index", "u2"], ["box_index3"]), N("Expand", ["box_index3", "rep4"], ["box_index4"]),
        N("GatherElements", ["dec_boxes", "box_index4"], ["top_boxes"], axis=1),
        N("Unsqueeze", ["valid", "u2"], ["valid3"]),
        N("Where", ["valid3", "top_boxes", "fzero"], ["boxes"]),
        N("Where", ["valid", "top_scores", "fzero"], ["scores"]),
        N("Where", ["valid", "cls_i", "izero"], ["classes"]),
    ]
    outputs = [
        helper.make_tensor_value_info("num_detections", TensorProto.INT32, [batch]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, MAX_DETECTIONS, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, MAX_DETECTIONS]),
        helper.make_tensor_value_info("classes", TensorProto.INT32, [batch, MAX_DETECTIONS]),
    ]
    opsets = [helper.make_opsetid("", 17)]
    if extra_node is not None:
        nodes.append(extra_node)
        outputs.append(helper.make_tensor_value_info(extra_node.output[0], TensorProto.FLOAT, None))
        opsets.append(helper.make_opsetid(extra_node.domain, 1))
    graph = helper.make_graph(
        nodes, "tiny_contract",
        [helper.make_tensor_value_info("images", input_dtype, [batch, size, size, 3])],
        outputs,
        initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=opsets, producer_name="ssd-serve tests")
    model.ir_version = 8
    meta = model.metadata_props.add()
    meta.key, meta.value = METADATA_KEY, (metadata or contract_metadata()).to_json()
    onnx.save(model, str(path))
    return path


def run_onnxruntime(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images}), strict=True))


def test_contract_model_runs_in_onnxruntime(tmp_path: Path) -> None:
    path = write_contract_onnx(tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    images[3] = 0
    out = run_onnxruntime(path, images)
    assert out["num_detections"].dtype == np.int32 and out["classes"].dtype == np.int32
    assert out["boxes"].shape == (4, MAX_DETECTIONS, 4) and out["scores"].shape == (4, MAX_DETECTIONS)
    counts = out["num_detections"]
    assert counts.max() > 0 and counts[3] == 0  # some detections, and an image without any
    for row, n in enumerate(counts):
        assert np.all(out["scores"][row, :n] > SCORE_THRESHOLD) and not out["scores"][row, n:].any()
        assert np.all(np.diff(out["scores"][row, :n]) <= 0)
        assert np.all(np.isin(out["classes"][row, :n], [1, 2, 3])) and not out["boxes"][row, n:].any()


# ------------------------------------------------------------------------------------------------------------
# Arguments and the optimisation profile
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("max_batch", "opt_batch", "expected"),
    [(64, None, BatchProfile(1, 32, 64)), (1, None, BatchProfile(1, 1, 1)), (7, None, BatchProfile(1, 3, 7)),
     (16, 16, BatchProfile(1, 16, 16)), (16, 1, BatchProfile(1, 1, 16))],
)
def test_batch_profile(max_batch: int, opt_batch: int | None, expected: BatchProfile) -> None:
    assert batch_profile(max_batch, opt_batch) == expected


@pytest.mark.parametrize(("max_batch", "opt_batch", "message"),
                         [(0, None, "--max-batch must be >= 1"), (8, 9, "within [1, 8]"), (8, 0, "within [1, 8]")])
def test_batch_profile_refuses(max_batch: int, opt_batch: int | None, message: str) -> None:
    with pytest.raises(ContractError, match=message.replace("[", r"\[")):
        batch_profile(max_batch, opt_batch)


def test_arguments_defaults() -> None:
    onnx_path, out, options = parse_args(["--onnx", "w/m.onnx"])
    assert (onnx_path, out) == (Path("w/m.onnx"), Path("w/m.engine"))
    assert options == BuildOptions(precision="fp32", profile=BatchProfile(1, 32, 64), workspace_gb=None)


@pytest.mark.parametrize("flags", [["--fp16"], ["--precision", "fp16"]])
def test_arguments_fp16(flags: list[str]) -> None:
    _, _, options = parse_args(["--onnx", "m.onnx", "--out", "x.plan", *flags])
    assert options.precision == "fp16"


def test_arguments_all() -> None:
    argv = ["--onnx", "m.onnx", "--out", "e/x.engine", "--max-batch", "16", "--opt-batch", "8",
            "--workspace-gb", "1.5", "--verbose"]
    onnx_path, out, options = parse_args(argv)
    assert out == Path("e/x.engine")
    assert options == BuildOptions("fp32", BatchProfile(1, 8, 16), workspace_gb=1.5, verbose=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch", "0"], "must be >= 1, got 0"),
        (["--max-batch", "many"], "expected an integer"),
        (["--opt-batch", "65"], "--opt-batch must be within [1, 64]"),
        (["--max-batch", "4", "--opt-batch", "5"], "--opt-batch must be within [1, 4]"),
        (["--opt-batch", "0"], "must be >= 1, got 0"),
        (["--workspace-gb", "0"], "must be a positive number"),
        (["--workspace-gb", "-2"], "must be a positive number"),
        (["--precision", "int8"], "invalid choice"),
        (["--fp16", "--precision", "fp32"], "not allowed with argument"),
        ([], None),  # --onnx is required
    ],
)
def test_arguments_refused(flags: list[str], message: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = flags if not flags else ["--onnx", "m.onnx", *flags]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (message or "--onnx") in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------------
# The ONNX file
# ------------------------------------------------------------------------------------------------------------
def test_inspect_onnx(tmp_path: Path) -> None:
    path = write_contract_onnx(tmp_path / "m.onnx")
    facts = inspect_onnx(path)
    assert facts.metadata == contract_metadata() and facts.input_size == (16, 16)
    assert facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and facts.data == path.read_bytes()


def _without_metadata(path: Path) -> None:
    write_contract_onnx(path)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "ONNX file not found: "),
        (lambda p: p.write_bytes(b"\x08\x07\x12\xff\xff\xff garbage"), "is not a valid ONNX model"),
        (lambda p: p.write_bytes(b""), "is not a valid ONNX model (it has no graph)"),
        (_without_metadata, "has no 'ssd_serve' metadata"),
        (lambda p: write_contract_onnx(p, batch=2), "batch axis of 'images' is fixed at 2"),
        (lambda p: write_contract_onnx(p, input_dtype=TensorProto.FLOAT), "must be uint8, it is FLOAT"),
        (lambda p: write_contract_onnx(p, metadata=contract_metadata(size=300)),
         "is 16x16 but the metadata says 300x300"),
        (lambda p: write_contract_onnx(p, metadata=replace(contract_metadata(), extra={"numerics": "integer"})),
         "computes in uint8 (--numerics integer), which TensorRT cannot run; re-export it with --numerics float"),
    ],
)
def test_inspect_onnx_refuses(tmp_path: Path, make: Any, message: str) -> None:
    path = tmp_path / "m.onnx"
    make(path)
    with pytest.raises(ContractError) as info:
        inspect_onnx(path)
    assert message in str(info.value) and str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# The engine's JSON description and the compatibility check
# ------------------------------------------------------------------------------------------------------------
FACTS = BuildFacts(tensorrt_version="10.9.0.34", gpu_name=FAKE_GPU.name, compute_capability="9.0",
                   precision="fp16", profile=BatchProfile(1, 32, 64), onnx_sha256="ab" * 32)


def test_engine_description_json(tmp_path: Path) -> None:
    description = EngineDescription(contract_metadata(), FACTS)
    data = json.loads(description.to_json())
    assert data.pop("tensorrt") == {
        "tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA Fake 80GB", "compute_capability": "9.0",
        "precision": "fp16", "profile": {"min": 1, "opt": 32, "max": 64}, "onnx_sha256": "ab" * 32,
    }
    assert data == json.loads(contract_metadata().to_json())  # the ONNX's own description, unchanged
    engine = tmp_path / "m.engine"
    sidecar_path(engine).write_text(description.to_json())
    assert read_engine_description(engine) == description


def test_engine_description_refused(tmp_path: Path) -> None:
    engine = tmp_path / "m.engine"
    with pytest.raises(ContractError, match=r"m\.engine\.json is missing: .* rebuild the engine"):
        read_engine_description(engine)
    sidecar_path(engine).write_text(contract_metadata().to_json())  # an ONNX sidecar, not an engine's
    with pytest.raises(ContractError, match="not a valid engine description: no 'tensorrt' block"):
        read_engine_description(engine)
    sidecar_path(engine).write_text("{")
    with pytest.raises(ContractError, match="not a valid engine description"):
        read_engine_description(engine)


def test_check_compatible() -> None:
    engine = Path("w/m.engine")
    check_compatible(FACTS, tensorrt_version="10.9.0.34", gpu=FAKE_GPU, engine_path=engine)
    with pytest.raises(ContractError) as info:
        check_compatible(FACTS, tensorrt_version="10.13.0.35", gpu=GpuFacts("NVIDIA L4", "8.9"), engine_path=engine)
    message = str(info.value)
    assert "w/m.engine was built for TensorRT 10.9.0.34 (this host has 10.13.0.35)" in message
    assert "the GPU NVIDIA Fake 80GB (this host has NVIDIA L4)" in message
    assert "compute capability 9.0 (this GPU is 8.9)" in message
    assert "python -m model_export.tensorrt --onnx MODEL.onnx --out w/m.engine" in message
    with pytest.raises(ContractError, match=r"built for the GPU NVIDIA Fake 80GB \(this host has NVIDIA H100\);"):
        check_compatible(FACTS, tensorrt_version="10.9.0.34", gpu=GpuFacts("NVIDIA H100", "9.0"), engine_path=engine)


# ------------------------------------------------------------------------------------------------------------
# What is missing: TensorRT, cuda-python, a GPU
# ------------------------------------------------------------------------------------------------------------
def test_tensorrt_not_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = write_contract_onnx(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert main(["--onnx", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: TensorRT is not installed: pip install 'ssd-serve[gpu]' on a host with an NVIDIA GPU "
        "(TensorRT wheels come from NVIDIA; see https://docs.nvidia.com/deeplearning/tensorrt/)\n"
    )
    assert not (tmp_path / "m.engine").exists()
    assert main(["--onnx", str(path), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: TensorRT is not installed: " + build_module.TENSORRT_HINT + "\n")


def test_unexpected_errors_are_one_line_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("pybind11 said no")

    monkeypatch.setattr("model_export.tensorrt.__main__.build_engine", broken)
    assert main(["--onnx", "m.onnx"]) == 1
    assert capsys.readouterr().err == "error: RuntimeError: pybind11 said no (run with --verbose for the traceback)\n"
    assert main(["--onnx", "m.onnx", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_tensorrt_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(ContractError, match=r"TensorRT 8\.6\.1 is too old: 10\.0 or later is needed"):
        build_module.import_tensorrt()


def test_command_line_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-m", "model_export.tensorrt", "--onnx", str(tmp_path / "absent.onnx")],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False,
    )
    assert run.returncode == 1
    assert run.stderr == f"error: ONNX file not found: {tmp_path / 'absent.onnx'}\n"
    usage = subprocess.run([sys.executable, "-m", "model_export.tensorrt", "--help"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
    assert usage.returncode == 0 and "--max-batch" in usage.stdout and "--opt-batch" in usage.stdout


def test_importing_the_package_imports_no_gpu_library() -> None:
    code = ("import sys, model_export.tensorrt, model_export.tensorrt.__main__; "
            "print([m for m in ('tensorrt', 'cuda', 'cuda.bindings') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert run.stdout.strip() == "[]"


class FakeCudart:
    """cuda-python's runtime module, answering as a host with the given GPUs (or the given error)."""

    class cudaError_t:  # noqa: N801 (cuda-python's names)
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35
        cudaErrorNoDevice = 100
        cudaErrorInvalidDevice = 101

    def __init__(self, gpus: list[tuple[bytes, int, int]], error: int = 0) -> None:
        self.gpus, self.error = gpus, error

    def cudaGetDeviceCount(self) -> tuple[int, int | None]:  # noqa: N802
        return (self.error, None) if self.error else (0, len(self.gpus))

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:  # noqa: N802
        name, major, minor = self.gpus[device]
        return 0, types.SimpleNamespace(name=name, major=major, minor=minor)

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:  # noqa: N802
        return 0, {35: b"cudaErrorInsufficientDriver", 100: b"cudaErrorNoDevice"}.get(err, b"cudaErrorUnknown")

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:  # noqa: N802
        return 0, b"some CUDA text"


def test_gpu_facts() -> None:
    cuda = Cuda(FakeCudart([(b"NVIDIA L4" + b"\0" * 20, 8, 9), (b"NVIDIA H100 80GB HBM3", 9, 0)]))
    assert cuda.gpu(0) == GpuFacts("NVIDIA L4", "8.9")
    assert cuda.gpu(1) == GpuFacts("NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(CudaError, match="there is no GPU cuda:2: 2 visible"):
        cuda.gpu(2)


@pytest.mark.parametrize(
    ("gpus", "error", "message"),
    [
        ([], 0, "no NVIDIA GPU is visible"),
        ([], 100, "no NVIDIA GPU is visible"),
        ([], 35, "no usable NVIDIA driver: either this host has no NVIDIA GPU and driver, or the driver is older"),
        ([], 999, "cannot list the GPUs: cudaErrorUnknown (some CUDA text)"),
    ],
)
def test_no_gpu(gpus: list[Any], error: int, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(CudaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Cuda(FakeCudart(gpus, error)).gpu(0)
    if "visible" in message:
        with pytest.raises(CudaError, match="CUDA_VISIBLE_DEVICES=''"):
            Cuda(FakeCudart(gpus, error)).gpu(0)


def test_cuda_python_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(CudaError, match="cuda-python is not installed: pip install cuda-python"):
        Cuda()


def _real_gpu_visible() -> bool:
    try:
        Cuda().gpu(0)
    except ContractError:
        return False
    return True


def test_no_gpu_on_this_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """The real cuda-python on a host without a GPU: one clear line, exit status 1."""
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed here")
    if _real_gpu_visible():
        pytest.skip("this host has a GPU")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT().module)  # TensorRT itself may be absent too
    assert main(["--onnx", str(write_contract_onnx(tmp_path / "m.onnx"))]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no ") and ("no usable NVIDIA driver" in err or "no NVIDIA GPU is visible" in err)
    assert err.count("\n") == 1 and not (tmp_path / "m.engine").exists()


# ------------------------------------------------------------------------------------------------------------
# The build steps against a stand-in for TensorRT's documented Python API
# ------------------------------------------------------------------------------------------------------------
class FakeTensorRT:
    """Records what the builder is asked; answers as configured (parse errors, fp16 support, build failure)."""

    def __init__(self, *, version: str = "10.9.0.34", parse_errors: tuple[tuple[int, str, str, str], ...] = (),
                 fast_fp16: bool = True, fp16_flag: bool = True, plan: bytes | None = b"PLAN-BYTES",
                 build_errors: tuple[str, ...] = ()) -> None:
        self.calls: dict[str, Any] = {"flags": set(), "shapes": [], "pool": {}}
        fake = self
        severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        class ILogger:
            Severity = severity

            def __init__(self) -> None:
                pass

        class ParserError:
            def __init__(self, node: int, name: str, op: str, desc: str) -> None:
                self._node, self._name, self._op, self._desc = node, name, op, desc

            def node(self) -> int:
                return self._node

            def node_name(self) -> str:
                return self._name

            def node_operator(self) -> str:
                return self._op

            def desc(self) -> str:
                return self._desc

        class OnnxParser:
            def __init__(self, network: Any, logger: Any) -> None:
                self.num_errors = len(parse_errors)

            def parse(self, data: bytes, path: str) -> bool:
                fake.calls["parsed"] = (bytes(data), path)
                return not parse_errors

            def get_error(self, index: int) -> ParserError:
                return ParserError(*parse_errors[index])

        class Config:
            def __init__(self) -> None:
                fake.calls["flags"] = {"TF32"}  # TensorRT's default

            def set_flag(self, flag: str) -> None:
                fake.calls["flags"].add(flag)

            def clear_flag(self, flag: str) -> None:
                fake.calls["flags"].discard(flag)

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["pool"][pool] = size

            def add_optimization_profile(self, profile: Any) -> int:
                fake.calls["profiles"] = fake.calls.get("profiles", 0) + 1
                return 0

        class Profile:
            def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
                fake.calls["shapes"].append((name, low, opt, high))

        class Tensor:
            def __init__(self, dtype: str) -> None:
                self.dtype = dtype

        class Layer:
            """What TensorRT's ONNX parser makes of one node: its name, precision, typed outputs."""

            def __init__(self, name: str, inputs: list[str | None], outputs: list[str]) -> None:
                self.name, self.precision = name, None  # None: not set, TensorRT chooses
                self._inputs = [None if t is None else Tensor(t) for t in inputs]
                self._outputs = [Tensor(t) for t in outputs]
                self.num_inputs, self.num_outputs = len(inputs), len(outputs)
                self.output_types: dict[int, str] = {}

            def get_input(self, i: int) -> Tensor | None:
                return self._inputs[i]

            def get_output(self, i: int) -> Tensor:
                return self._outputs[i]

            def set_output_type(self, i: int, dtype: str) -> None:
                self.output_types[i] = dtype

        class Network:
            def __init__(self) -> None:
                self.layers = [
                    Layer("/Cast", ["uint8"], ["float32"]),
                    Layer("/network/backbone/Conv", ["float32", "float32"], ["float32"]),
                    Layer("/postprocess/Sigmoid", ["float32"], ["float32"]),
                    Layer("/postprocess/NonMaxSuppression", ["float32", "float32", "int32", None], ["int32"]),
                    Layer("/postprocess/TopK", ["float32"], ["float32", "int32"]),
                    Layer("/postprocess/Add_3", ["int32", "int32"], ["int32"]),
                ]
                self.num_layers = len(self.layers)

            def get_layer(self, i: int) -> Layer:
                return self.layers[i]

        class Builder:
            def __init__(self, logger: Any) -> None:
                self.logger = logger
                if fp16_flag:
                    self.platform_has_fast_fp16 = fast_fp16

            def create_network(self, flags: int) -> Network:
                fake.calls["network_flags"] = flags
                fake.network = Network()
                return fake.network

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: Config) -> bytes | None:
                for message in build_errors:
                    self.logger.log(severity.ERROR, message)
                self.logger.log(severity.WARNING, "a warning the user sees")
                self.logger.log(severity.INFO, "an info line only --verbose shows")
                return plan

        creation = types.SimpleNamespace(STRONGLY_TYPED=1)
        flags = {"TF32": "TF32", "OBEY_PRECISION_CONSTRAINTS": "OBEY_PRECISION_CONSTRAINTS"}
        flags |= {"FP16": "FP16"} if fp16_flag else {}
        self.network: Any = None
        self.module = types.SimpleNamespace(
            float32="float32", float16="float16", NetworkDefinitionCreationFlag=creation,
            __version__=version, ILogger=ILogger, Builder=Builder, OnnxParser=OnnxParser,
            BuilderFlag=types.SimpleNamespace(**flags), MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        )


class FakeCuda:
    def gpu(self, device: int) -> GpuFacts:
        assert device == 0
        return FAKE_GPU


def _build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeTensorRT, **options: Any) -> EngineDescription:
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    path = write_contract_onnx(tmp_path / "m.onnx")
    out = tmp_path / "out" / "m.engine"
    return build_engine(path, out, BuildOptions(**options), cuda=FakeCuda())  # type: ignore[arg-type]


def test_build_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeTensorRT()
    description = _build(tmp_path, monkeypatch, fake, profile=batch_profile(8, 4), workspace_gb=0.5)
    onnx_bytes = (tmp_path / "m.onnx").read_bytes()
    assert fake.calls["parsed"] == (onnx_bytes, str(tmp_path / "m.onnx"))
    assert fake.calls["network_flags"] == 0
    assert fake.calls["shapes"] == [("images", (1, 16, 16, 3), (4, 16, 16, 3), (8, 16, 16, 3))]
    assert fake.calls["profiles"] == 1
    assert fake.calls["flags"] == set()  # TF32 off: fp32 means fp32
    assert fake.calls["pool"] == {"WORKSPACE": 1 << 29}
    engine = tmp_path / "out" / "m.engine"
    assert engine.read_bytes() == b"PLAN-BYTES"
    assert read_engine_description(engine) == description
    assert description.build == BuildFacts(
        tensorrt_version="10.9.0.34", gpu_name=FAKE_GPU.name, compute_capability="9.0", precision="fp32",
        profile=BatchProfile(1, 4, 8), onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
    )
    assert description.metadata == contract_metadata()
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.engine.json"]  # no temp files left
    err = capsys.readouterr().err
    assert "[TensorRT] a warning the user sees" in err and "info line" not in err


@pytest.mark.parametrize(("version", "precision", "flags"), [
    ("10.9.0.34", "fp32", 0), ("10.12.0.36", "fp32", 1 << 1), ("11.0.0.1", "fp32", 1 << 1),
    ("10.12.0.36", "fp16", 0),
])
def test_strong_typing_from_10_12_for_fp32(version: str, precision: str, flags: int, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeTensorRT(version=version)
    _build(tmp_path, monkeypatch, fake, precision=precision)
    assert fake.calls["network_flags"] == flags
    deprecated = "deprecates the FP16 builder flag" in capsys.readouterr().err
    assert deprecated == (precision == "fp16" and version != "10.9.0.34")


def test_build_fp16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT(fast_fp16=True)
    description = _build(tmp_path, monkeypatch, fake, precision="fp16", verbose=True)
    assert fake.calls["flags"] == {"FP16", "TF32", "OBEY_PRECISION_CONSTRAINTS"}
    assert description.build.precision == "fp16"
    # The detection tail runs in float32; the network (and the input cast) may take fp16; index maths is left alone.
    pinned = {layer.name: (layer.precision, layer.output_types) for layer in fake.network.layers}
    assert pinned == {
        "/Cast": (None, {}),
        "/network/backbone/Conv": (None, {}),
        "/postprocess/Sigmoid": ("float32", {0: "float32"}),
        "/postprocess/NonMaxSuppression": ("float32", {}),
        "/postprocess/TopK": ("float32", {0: "float32"}),
        "/postprocess/Add_3": (None, {}),
    }
    assert json.loads(sidecar_path(tmp_path / "out" / "m.engine").read_text())["tensorrt"]["precision"] == "fp16"


@pytest.mark.parametrize(
    ("fake", "message"),
    [
        (FakeTensorRT(fast_fp16=False),
         "NVIDIA Fake 80GB (compute capability 9.0) has no fast fp16: build with --precision fp32"),
        (FakeTensorRT(version="11.0.0.1", fp16_flag=False),
         "TensorRT 11.0.0.1 has no FP16 builder flag (TensorRT 11 removed weakly typed precision)"),
    ],
)
def test_build_fp16_refused(fake: FakeTensorRT, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ContractError) as info:
        _build(tmp_path, monkeypatch, fake, precision="fp16")
    assert message in str(info.value)
    assert "FP16" not in fake.calls["flags"] and not (tmp_path / "out" / "m.engine").exists()


def test_build_parser_errors_one_per_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT(parse_errors=(
        (12, "/postprocess/Frob", "Frobnicate", "No importer registered for op: Frobnicate"),
        (-1, "", "", "graph: unsupported IR version"),
    ))
    with pytest.raises(ContractError) as info:
        _build(tmp_path, monkeypatch, fake)
    assert str(info.value).splitlines() == [
        f"TensorRT could not parse {tmp_path / 'm.onnx'}:",
        "  node /postprocess/Frob (Frobnicate): No importer registered for op: Frobnicate",
        "  graph: unsupported IR version",
    ]


def test_build_failure_keeps_the_old_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.engine").write_bytes(b"old engine")
    fake = FakeTensorRT(plan=None, build_errors=("out of memory", "tactic failed"))
    with pytest.raises(ContractError) as info:
        _build(tmp_path, monkeypatch, fake)
    assert str(info.value).splitlines() == [
        f"TensorRT could not build an engine from {tmp_path / 'm.onnx'}:", "  out of memory", "  tactic failed",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["m.engine"] and (out / "m.engine").read_bytes() == b"old engine"


def test_main_reports_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT().module)
    monkeypatch.setattr(build_module, "Cuda", FakeCuda)
    path = write_contract_onnx(tmp_path / "m.onnx")
    assert main(["--onnx", str(path), "--fp16", "--max-batch", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote {tmp_path / 'm.engine'} (0.0 MB, fp16, batch 1..16, TensorRT 10.9.0.34, NVIDIA Fake 80GB)",
        f"wrote {tmp_path / 'm.engine.json'}",
    ]
    facts = json.loads((tmp_path / "m.engine.json").read_text())["tensorrt"]
    assert facts["profile"] == asdict(BatchProfile(1, 8, 16))


# ------------------------------------------------------------------------------------------------------------
# Real engines (TensorRT + an NVIDIA GPU)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tensorrt() -> Any:
    trt = pytest.importorskip("tensorrt", reason=GPU_REASON)
    try:
        Cuda().gpu(0)
    except ContractError as exc:
        pytest.skip(f"{GPU_REASON} ({exc})")
    return trt


@pytest.mark.gpu
def test_real_build_fp32(tensorrt: Any, tmp_path: Path) -> None:
    path = write_contract_onnx(tmp_path / "m.onnx")
    engine_path = tmp_path / "m.engine"
    assert main(["--onnx", str(path), "--out", str(engine_path), "--max-batch", "8", "--opt-batch", "4"]) == 0
    description = read_engine_description(engine_path)
    gpu = Cuda().gpu(0)
    assert description.build == BuildFacts(
        tensorrt_version=tensorrt.__version__, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
        precision="fp32", profile=BatchProfile(1, 4, 8), onnx_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    runtime = tensorrt.Runtime(tensorrt.Logger(tensorrt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    assert engine is not None
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    assert names == {"images", "num_detections", "boxes", "scores", "classes"}
    assert [tuple(s) for s in engine.get_tensor_profile_shape("images", 0)] == [
        (1, 16, 16, 3), (4, 16, 16, 3), (8, 16, 16, 3)]
    dtypes = {name: np.dtype(tensorrt.nptype(engine.get_tensor_dtype(name))) for name in names}
    assert dtypes == {"images": np.uint8, "num_detections": np.int32, "boxes": np.float32, "scores": np.float32,
                      "classes": np.int32}


@pytest.mark.gpu
def test_real_build_fp16_or_a_clear_refusal(tensorrt: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_contract_onnx(tmp_path / "m.onnx")
    code = main(["--onnx", str(path), "--fp16", "--max-batch", "4"])
    err = capsys.readouterr().err
    if not hasattr(tensorrt.BuilderFlag, "FP16"):
        assert code == 1 and "has no FP16 builder flag" in err
    elif not tensorrt.Builder(tensorrt.Logger()).platform_has_fast_fp16:
        assert code == 1 and "has no fast fp16: build with --precision fp32" in err
    else:
        assert code == 0, err
        assert read_engine_description(tmp_path / "m.engine").build.precision == "fp16"


@pytest.mark.gpu
def test_real_parser_errors(tensorrt: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unknown = helper.make_node("Frobnicate", ["scores"], ["frobbed"], domain="com.example", name="frob")
    path = write_contract_onnx(tmp_path / "m.onnx", extra_node=unknown)
    assert main(["--onnx", str(path), "--max-batch", "2"]) == 1
    lines = capsys.readouterr().err.splitlines()
    start = lines.index(f"error: TensorRT could not parse {path}:")
    assert any("Frobnicate" in line for line in lines[start + 1:])
    assert all(line.startswith("  ") for line in lines[start + 1:])
    assert not (tmp_path / "m.engine").exists()



@pytest.mark.gpu
@pytest.mark.slow
def test_real_fp16_engine_detects_what_fp32_does(tensorrt: Any, tmp_path: Path) -> None:
    """The shared model exported as float and built both ways: fp32 within the validation tolerances of ONNX Runtime
    CPU (tie order aside: TensorRT's is unspecified, see model_export.validate), fp16 (network in fp16, post-processing
    pinned to fp32) finding every fp32 detection above 0.35 with its score within 0.02 and box within 0.005."""
    from model_export.models import REGISTRY
    from model_export.onnx_export import export_onnx
    from model_export.spec import Detections, PostprocessOptions
    from model_export.validate import _Tally, compare_detections, load_validation_images
    from server.engines.base import EngineOptions, EngineOutput
    from server.engines.tensorrt import TensorRTEngine

    tflite = REPO.parent / "shared" / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"
    if not tflite.is_file():
        pytest.skip(f"shared model missing: {tflite}")
    model = REGISTRY["ssd_mobilenet_v1_coco"].build(str(tflite), None, "float")
    onnx_path = tmp_path / "m.onnx"
    options = PostprocessOptions()
    export_onnx(model, options, onnx_path)
    images = load_validation_images(model.input_size).numpy()
    reference = EngineOutput(**run_onnxruntime(onnx_path, images))
    outputs = {}
    for precision in ("fp32", "fp16"):
        engine_path = tmp_path / f"m.{precision}.engine"
        assert main(["--onnx", str(onnx_path), "--out", str(engine_path), "--precision", precision,
                     "--max-batch", "8"]) == 0
        engine = TensorRTEngine()
        engine.load(engine_path, EngineOptions(device="cuda", max_batch_size=8))
        outputs[precision] = engine.infer(images)
        engine.close()

    def detections(out: EngineOutput, i: int) -> Detections:
        import torch

        n = int(out.num_detections[i])
        return Detections(torch.from_numpy(out.boxes[i, :n].copy()), torch.from_numpy(out.scores[i, :n].copy()),
                          torch.from_numpy(out.classes[i, :n].astype(np.int64)))

    for i in range(len(images)):
        compare_detections(detections(outputs["fp32"], i), detections(reference, i), options, model.labels,
                           f"fp32 image {i}", _Tally())
        fp32, fp16 = detections(outputs["fp32"], i), detections(outputs["fp16"], i)
        for box, score, cls in zip(fp32.boxes, fp32.scores, fp32.classes, strict=True):
            if float(score) < 0.35:
                continue
            fits = (fp16.classes == cls) & ((fp16.scores - score).abs() < 0.02)
            fits &= (fp16.boxes - box).abs().amax(dim=1) < 0.005
            assert bool(fits.any()), (i, int(cls), float(score), box.tolist())
