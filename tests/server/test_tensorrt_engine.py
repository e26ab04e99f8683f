"""The TensorRT engine: loading rules, bindings and copies run here against stand-ins for TensorRT's runtime
API and for CUDA (host memory plays device memory); the tests marked `gpu` build a real engine and compare
it with ONNX Runtime, and run only where TensorRT and an NVIDIA GPU exist."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_export.contract.engine import BatchProfile, BuildFacts, EngineDescription, GpuFacts
from model_export.contract.errors import ContractError
from model_export.contract.metadata import ModelMetadata, sidecar_path
from model_export.tensorrt.build import inspect_onnx
from server.engines.base import Engine, EngineOptions, EngineOutput
from model_export.contract.cuda import CudaError
from server.engines.cuda import Cuda
from server.engines.tensorrt import TensorRTEngine, TensorRTEngineError, check_batch, cuda_device_index

GPU_REASON = "needs TensorRT and an NVIDIA GPU; TensorRT installs only from NVIDIA's index and this machine has no GPU"
GPU = GpuFacts(name="NVIDIA Fake 80GB", compute_capability="9.0")
TRT_VERSION = "10.9.0.34"
PLAN = b"PLAN-BYTES"
SIZE, K, MAX_BATCH = 8, 5, 6


def metadata(k: int = K) -> ModelMetadata:
    return ModelMetadata(
        model="fake", input_size=(SIZE, SIZE), labels=("", "a", "b", "c"), score_threshold=0.01,
        iou_threshold=0.45, candidates_per_class=10, max_detections=k, score_activation="softmax",
        weights_source="random", weights_sha256=None, opset=17,
    )


def write_engine(tmp_path: Path, *, gpu: GpuFacts = GPU, version: str = TRT_VERSION, max_batch: int = MAX_BATCH,
                 k: int = K) -> Path:
    path = tmp_path / "m.engine"
    path.write_bytes(PLAN)
    build = BuildFacts(tensorrt_version=version, gpu_name=gpu.name, compute_capability=gpu.compute_capability,
                       precision="fp32", profile=BatchProfile(1, max_batch // 2, max_batch), onnx_sha256="0" * 64)
    sidecar_path(path).write_text(EngineDescription(metadata(k), build).to_json())
    return path


def fake_model(images: np.ndarray, k: int = K) -> dict[str, np.ndarray]:
    """What the stand-in engine computes: any deterministic function of every image will do."""
    batch = images.shape[0]
    sums = images.reshape(batch, -1).astype(np.int64).sum(1)
    count = (sums % (k + 1)).astype(np.int32)  # [B]
    rows = np.arange(k)[None, :] < count[:, None]  # [B, K]
    scores = np.where(rows, (images[:, 0, 0, 0, None] + 1) / 256 * (1 - np.arange(k) / k), 0).astype(np.float32)
    boxes = np.where(rows[..., None], (sums[:, None, None] % 7 + np.arange(4)) / 10, 0).astype(np.float32)
    classes = np.where(rows, np.arange(k) % 3 + 1, 0).astype(np.int32)
    return {"num_detections": count, "boxes": boxes, "scores": scores, "classes": classes}


# ------------------------------------------------------------------------------------------------------------
# Stand-ins: CUDA over host memory, and TensorRT's runtime API
# ------------------------------------------------------------------------------------------------------------
class HostCuda:
    """`Cuda` with host memory as device memory; tracks every allocation so leaks and double frees show."""

    def __init__(self, gpu: GpuFacts = GPU) -> None:
        self._gpu = gpu
        self.device: dict[int, Any] = {}
        self.pinned: dict[int, Any] = {}
        self.streams: set[int] = set()
        self.devices_set: list[int] = []

    def gpu(self, device: int) -> GpuFacts:
        return self._gpu

    def set_device(self, device: int) -> None:
        self.devices_set.append(device)

    def _alloc(self, table: dict[int, Any], nbytes: int) -> int:
        block = ctypes.create_string_buffer(nbytes)
        table[ctypes.addressof(block)] = block
        return ctypes.addressof(block)

    def malloc(self, nbytes: int) -> int:
        return self._alloc(self.device, nbytes)

    def malloc_host(self, nbytes: int) -> int:
        return self._alloc(self.pinned, nbytes)

    def free(self, ptr: int) -> None:
        del self.device[ptr]

    def free_host(self, ptr: int) -> None:
        del self.pinned[ptr]

    def _copy(self, dst_table: dict[int, Any], dst: int, src_table: dict[int, Any], src: int, nbytes: int,
              stream: int) -> None:
        assert stream in self.streams
        assert nbytes <= ctypes.sizeof(dst_table[dst]) and nbytes <= ctypes.sizeof(src_table[src])
        ctypes.memmove(dst, src, nbytes)

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._copy(self.device, dst, self.pinned, src, nbytes, stream)

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._copy(self.pinned, dst, self.device, src, nbytes, stream)

    def create_stream(self) -> int:
        self.streams.add(len(self.streams) + 7)
        return max(self.streams)

    def synchronize(self, stream: int) -> None:
        assert stream in self.streams

    def destroy_stream(self, stream: int) -> None:
        self.streams.remove(stream)

    def live(self) -> int:
        return len(self.device) + len(self.pinned) + len(self.streams)


class FakeTensorRT:
    """TensorRT's runtime API as the engine uses it; the 'engine' runs `fake_model` on the bound memory."""

    def __init__(self, *, version: str = TRT_VERSION, dtypes: dict[str, str] | None = None, k: int = K,
                 max_batch: int = MAX_BATCH) -> None:
        data_type = types.SimpleNamespace(UINT8="uint8", INT32="int32", FLOAT="float32", INT64="int64")
        io_mode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
        tensor_dtypes = {"images": "uint8", "num_detections": "int32", "boxes": "float32", "scores": "float32",
                         "classes": "int32"} | (dtypes or {})
        rows = {"images": (SIZE, SIZE, 3), "num_detections": (), "boxes": (k, 4), "scores": (k,), "classes": (k,)}
        fake = self
        self.executed: list[int] = []

        class Context:
            def __init__(self) -> None:
                self.batch: int | None = None
                self.addresses: dict[str, int] = {}

            def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
                assert name == "images"
                if tuple(shape[1:]) != rows["images"] or not 1 <= shape[0] <= max_batch:
                    return False
                self.batch = shape[0]
                return True

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                assert self.batch is not None
                return (self.batch, *rows[name])

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                self.addresses[name] = ptr
                return True

            def _view(self, name: str) -> np.ndarray:
                shape = (self.batch, *rows[name])
                dtype = np.dtype(tensor_dtypes[name])
                raw = (ctypes.c_uint8 * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.addresses[name])
                return np.frombuffer(raw, dtype=dtype).reshape(shape)

            def execute_async_v3(self, stream: int) -> bool:
                assert set(self.addresses) == set(rows) and self.batch is not None
                fake.executed.append(self.batch)
                for name, value in fake_model(self._view("images"), k).items():
                    self._view(name)[...] = value
                return True

        class Engine:
            num_io_tensors = len(rows)

            def get_tensor_name(self, index: int) -> str:
                return list(rows)[index]

            def get_tensor_mode(self, name: str) -> str:
                return io_mode.INPUT if name == "images" else io_mode.OUTPUT

            def get_tensor_dtype(self, name: str) -> str:
                return tensor_dtypes[name]

            def create_execution_context(self) -> Context:
                fake.context = Context()
                return fake.context

        class Runtime:
            def __init__(self, logger: Any) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                return Engine() if data == PLAN else None

        self.module = types.SimpleNamespace(
            __version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None}),
            Runtime=Runtime, TensorIOMode=io_mode, DataType=data_type, nptype=lambda dt: np.dtype(dt).type,
        )


def load(tmp_path: Path, cuda: HostCuda | None = None, fake: FakeTensorRT | None = None,
         options: EngineOptions | None = None, **engine_kwargs: Any) -> tuple[TensorRTEngine, HostCuda, FakeTensorRT]:
    cuda, fake = cuda or HostCuda(), fake or FakeTensorRT()
    engine = TensorRTEngine(cuda=cuda, tensorrt=fake.module)  # type: ignore[arg-type]
    path = write_engine(tmp_path, **engine_kwargs)
    engine.load(path, options or EngineOptions(device="cuda:1", max_batch_size=MAX_BATCH))
    return engine, cuda, fake


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------------
# Loading and running, with the stand-ins
# ------------------------------------------------------------------------------------------------------------
def test_satisfies_the_engine_protocol() -> None:
    engine: Engine = TensorRTEngine()  # a type checker verifies the protocol; here: the methods exist
    assert all(callable(getattr(engine, name)) for name in ("load", "infer", "close"))


def test_load_and_infer(tmp_path: Path) -> None:
    engine, cuda, fake = load(tmp_path)
    assert set(fake.context.addresses.values()) <= set(cuda.device)  # every tensor bound to device memory
    assert len(cuda.device) == len(cuda.pinned) == 5 and len(cuda.streams) == 1
    for batch in (1, 3, MAX_BATCH, 2):
        batch_images = images(batch, seed=batch)
        out = engine.infer(batch_images)
        expected = fake_model(batch_images)
        assert isinstance(out, EngineOutput)
        for name, value in expected.items():
            got = getattr(out, name)
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)
    assert fake.executed == [1, 3, MAX_BATCH, 2]
    assert set(cuda.devices_set) == {1}  # cuda:1, set on load and before every batch
    engine.close()
    assert cuda.live() == 0
    engine.close()  # twice is fine


def test_results_do_not_alias_the_reused_buffers(tmp_path: Path) -> None:
    engine, _, _ = load(tmp_path)
    first = engine.infer(images(2, seed=1))
    kept = first.scores.copy()
    engine.infer(images(2, seed=2))
    np.testing.assert_array_equal(first.scores, kept)
    engine.close()


def test_infer_refuses_bad_batches(tmp_path: Path) -> None:
    engine, _, _ = load(tmp_path)
    with pytest.raises(ValueError, match=r"expected images \[B, 8, 8, 3\], got \[1, 8, 9, 3\]"):
        engine.infer(np.zeros((1, SIZE, SIZE + 1, 3), np.uint8))
    with pytest.raises(ValueError, match="batch of 7 images: this engine takes 1 to 6"):
        engine.infer(np.zeros((7, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match="expected a uint8 numpy array, got float32"):
        engine.infer(np.zeros((1, SIZE, SIZE, 3), np.float32))
    engine.close()
    with pytest.raises(TensorRTEngineError, match="not loaded"):
        engine.infer(images(1))


def test_buffers_sized_for_the_options_max_batch(tmp_path: Path) -> None:
    engine, cuda, fake = load(tmp_path, options=EngineOptions(device="cuda", max_batch_size=2))
    assert ctypes.sizeof(cuda.device[fake.context.addresses["images"]]) == 2 * SIZE * SIZE * 3
    with pytest.raises(ValueError, match="this engine takes 1 to 2"):
        engine.infer(images(3))
    engine.close()


@pytest.mark.parametrize(("device", "index"), [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)])
def test_cuda_device_index(device: str, index: int) -> None:
    assert cuda_device_index(device) == index


@pytest.mark.parametrize("device", ["cpu", "cuda:", "cuda:x", "gpu:0", "cuda:-1"])
def test_cuda_device_refused(device: str) -> None:
    with pytest.raises(TensorRTEngineError, match="the TensorRT engine runs on a GPU: device must be"):
        cuda_device_index(device)


def test_check_batch() -> None:
    check_batch(np.zeros((2, 4, 5, 3), np.uint8), (4, 5), 2)
    with pytest.raises(ValueError):
        check_batch(np.zeros((0, 4, 5, 3), np.uint8), (4, 5), 2)
    with pytest.raises(ValueError):
        check_batch([[1]], (4, 5), 2)  # type: ignore[arg-type]


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TensorRTEngineError, match="model file not found: .*absent.engine"):
        TensorRTEngine().load(tmp_path / "absent.engine", EngineOptions(device="cuda"))


def test_a_second_load_replaces_the_first(tmp_path: Path) -> None:
    engine, cuda, _ = load(tmp_path)
    engine.load(tmp_path / "m.engine", EngineOptions(device="cuda", max_batch_size=2))
    assert len(cuda.device) == len(cuda.pinned) == 5 and len(cuda.streams) == 1  # the first load's buffers freed
    assert engine.infer(images(2)).scores.shape == (2, K)
    engine.close()
    assert cuda.live() == 0


def test_load_refuses_an_engine_without_its_json(tmp_path: Path) -> None:
    (tmp_path / "m.engine").write_bytes(PLAN)
    with pytest.raises(ContractError, match=r"m\.engine\.json is missing"):
        TensorRTEngine(cuda=HostCuda(), tensorrt=FakeTensorRT().module).load(  # type: ignore[arg-type]
            tmp_path / "m.engine", EngineOptions(device="cuda"))


def test_load_refuses_a_larger_max_batch(tmp_path: Path) -> None:
    path = write_engine(tmp_path, max_batch=16)
    with pytest.raises(TensorRTEngineError) as info:
        TensorRTEngine().load(path, EngineOptions(device="cuda", max_batch_size=32))
    assert str(info.value) == (f"max batch size 32 exceeds what {path} was built for (16): lower it, "
                               "or rebuild the engine with --max-batch 32")


def test_load_refuses_fp16_from_an_fp32_engine(tmp_path: Path) -> None:
    with pytest.raises(TensorRTEngineError, match=r"fp16 was asked for but .*m\.engine was built fp32 .* --fp16"):
        TensorRTEngine().load(write_engine(tmp_path), EngineOptions(device="cuda", fp16=True, max_batch_size=4))


def test_close_releases_everything_even_after_a_cuda_error(tmp_path: Path) -> None:
    engine, cuda, _ = load(tmp_path)
    real_free = cuda.free
    calls: list[int] = []

    def failing_free(ptr: int) -> None:
        calls.append(ptr)
        real_free(ptr)
        if len(calls) == 1:
            raise CudaError("cudaFree failed: cudaErrorIllegalAddress (an illegal memory access)")

    cuda.free = failing_free  # type: ignore[method-assign]
    with pytest.raises(CudaError, match="cudaErrorIllegalAddress"):
        engine.close()
    assert cuda.live() == 0 and len(calls) == 5
    engine.close()


def test_load_without_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ContractError, match=r"TensorRT is not installed: pip install 'ssd-serve\[gpu\]'"):
        TensorRTEngine().load(write_engine(tmp_path), EngineOptions(device="cuda", max_batch_size=4))


@pytest.mark.parametrize(
    ("engine_kwargs", "message"),
    [
        ({"version": "10.8.0.43"}, "was built for TensorRT 10.8.0.43 (this host has 10.9.0.34)"),
        ({"gpu": GpuFacts("NVIDIA L4", "8.9")},
         "was built for the GPU NVIDIA L4 (this host has NVIDIA Fake 80GB) and compute capability 8.9"),
    ],
)
def test_load_refuses_another_build(tmp_path: Path, engine_kwargs: dict[str, Any], message: str) -> None:
    cuda = HostCuda()
    with pytest.raises(ContractError) as info:
        load(tmp_path, cuda=cuda, **engine_kwargs)
    assert message in str(info.value) and "rebuild it on this host" in str(info.value)
    assert cuda.live() == 0


@pytest.mark.parametrize(
    ("fake", "message"),
    [
        (FakeTensorRT(dtypes={"classes": "int64"}), "engine tensor 'classes' is int64, the contract says int32"),
        (FakeTensorRT(k=7), "engine tensor 'boxes' has shape [6, 7, 4] at batch 6, expected [6, 5, 4]"),
        (FakeTensorRT(max_batch=4), "the engine refuses input shape [6, 8, 8, 3]"),
    ],
)
def test_load_refuses_an_engine_off_contract(tmp_path: Path, fake: FakeTensorRT, message: str) -> None:
    cuda = HostCuda()
    with pytest.raises(TensorRTEngineError) as info:
        load(tmp_path, cuda=cuda, fake=fake)
    assert message in str(info.value)
    assert cuda.live() == 0  # whatever was allocated before the refusal is freed


def test_load_refuses_an_engine_tensorrt_cannot_read(tmp_path: Path) -> None:
    path = write_engine(tmp_path)
    path.write_bytes(b"corrupt")
    with pytest.raises(TensorRTEngineError, match="TensorRT could not deserialise"):
        TensorRTEngine(cuda=HostCuda(), tensorrt=FakeTensorRT().module).load(  # type: ignore[arg-type]
            path, EngineOptions(device="cuda", max_batch_size=2))


# ------------------------------------------------------------------------------------------------------------
# A real engine against ONNX Runtime (TensorRT + an NVIDIA GPU)
# ------------------------------------------------------------------------------------------------------------
@functools.cache
def _builder_tests() -> types.ModuleType:
    """tests/model_export/test_tensorrt.py: its small contract model and ONNX Runtime runner."""
    path = Path(__file__).resolve().parents[1] / "model_export" / "test_tensorrt.py"
    spec = importlib.util.spec_from_file_location("_tensorrt_builder_tests", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def real_engine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("tensorrt", reason=GPU_REASON)
    try:
        Cuda().gpu(0)
    except ContractError as exc:
        pytest.skip(f"{GPU_REASON} ({exc})")
    from model_export.tensorrt.__main__ import main

    helpers = _builder_tests()
    tmp = tmp_path_factory.mktemp("trt")
    onnx_path = helpers.write_contract_onnx(tmp / "m.onnx")
    assert main(["--onnx", str(onnx_path), "--max-batch", "8", "--opt-batch", "4"]) == 0
    return onnx_path, tmp / "m.engine"


def assert_same_detections(got: EngineOutput, want: dict[str, np.ndarray], atol: float) -> None:
    """Same count per image; every row matched by class, score and box (order may differ between equal scores)."""
    np.testing.assert_array_equal(got.num_detections, want["num_detections"])
    for image, count in enumerate(want["num_detections"]):
        assert not got.scores[image, count:].any() and not got.boxes[image, count:].any()
        unmatched = list(range(count))
        for row in range(count):
            for candidate in unmatched:
                if (got.classes[image, row] == want["classes"][image, candidate]
                        and abs(got.scores[image, row] - want["scores"][image, candidate]) <= atol
                        and np.allclose(got.boxes[image, row], want["boxes"][image, candidate], atol=atol)):
                    unmatched.remove(candidate)
                    break
            else:
                raise AssertionError(f"image {image} row {row}: no match in ONNX Runtime's output")


@pytest.mark.gpu
def test_real_engine_matches_onnxruntime(real_engine: tuple[Path, Path]) -> None:
    onnx_path, engine_path = real_engine
    helpers = _builder_tests()
    engine = TensorRTEngine()
    meta = engine.load(engine_path, EngineOptions(device="cuda", max_batch_size=8))
    assert meta == helpers.contract_metadata()
    try:
        for batch in (1, 3, 8, 2):
            batch_images = np.random.default_rng(batch).integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
            batch_images[0] = 0  # an image without detections
            got = engine.infer(batch_images)
            want = helpers.run_onnxruntime(onnx_path, batch_images)
            assert got.num_detections.dtype == np.int32 and got.classes.dtype == np.int32
            assert got.boxes.shape == (batch, 20, 4) and got.scores.shape == (batch, 20)
            assert_same_detections(got, want, atol=1e-4)
    finally:
        engine.close()


@pytest.mark.gpu
def test_real_engine_refused_for_another_gpu(real_engine: tuple[Path, Path], tmp_path: Path) -> None:
    _, engine_path = real_engine
    copy = tmp_path / "m.engine"
    copy.write_bytes(engine_path.read_bytes())
    data = json.loads(sidecar_path(engine_path).read_text())
    data["tensorrt"]["gpu_name"] = "NVIDIA Some Other GPU"
    sidecar_path(copy).write_text(json.dumps(data))
    with pytest.raises(ContractError, match="was built for the GPU NVIDIA Some Other GPU"):
        TensorRTEngine().load(copy, EngineOptions(device="cuda", max_batch_size=4))


@pytest.fixture(scope="module")
def exported_ssd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SSD through the project's own exporter (the production graph: NonMaxSuppression and all)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    from model_export.onnx_export import export_onnx
    from model_export.spec import PostprocessOptions, SSDModel

    anchors, logits = 300, 5

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
            self.box = nn.Linear(8 * 16, anchors * 4)
            self.cls = nn.Linear(8 * 16, anchors * logits)
            nn.init.normal_(self.cls.weight, std=0.5)

        def forward(self, x: Any) -> tuple[Any, Any]:
            f = self.features(x).flatten(1)
            return self.box(f).reshape(-1, anchors, 4), self.cls(f).reshape(-1, anchors, logits)

    g = torch.Generator().manual_seed(1)
    model = SSDModel(
        name="tiny-ssd", network=Heads(), input_size=(64, 48),
        anchors=torch.cat((torch.rand(anchors, 2, generator=g), 0.05 + 0.3 * torch.rand(anchors, 2, generator=g)), 1),
        box_weights=(10.0, 10.0, 5.0, 5.0), score_activation="softmax", score_columns=(1, 2, 4), class_ids=(0, 1, 3),
        labels=("a", "b", "", "d"), mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5),
    )
    path = tmp_path_factory.mktemp("exported") / "tiny.onnx"
    export_onnx(model, PostprocessOptions(max_detections=50), path)
    return path


def test_exported_ssd_runs_in_onnxruntime(exported_ssd: Path) -> None:
    """The half of the GPU comparison that runs anywhere: the same file and inputs through ONNX Runtime."""
    out = _builder_tests().run_onnxruntime(exported_ssd, np.zeros((2, 64, 48, 3), np.uint8))
    assert out["boxes"].shape == (2, 50, 4) and out["num_detections"].dtype == np.int32
    facts = inspect_onnx(exported_ssd)  # and the builder accepts what the exporter writes
    assert facts.input_size == (64, 48) and facts.metadata.model == "tiny-ssd"


@pytest.mark.gpu
def test_real_engine_from_the_exporter_matches_onnxruntime(exported_ssd: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason=GPU_REASON)
    try:
        Cuda().gpu(0)
    except ContractError as exc:
        pytest.skip(f"{GPU_REASON} ({exc})")
    from model_export.tensorrt.__main__ import main

    engine_path = tmp_path / "tiny.engine"
    assert main(["--onnx", str(exported_ssd), "--out", str(engine_path), "--max-batch", "4"]) == 0
    engine = TensorRTEngine()
    engine.load(engine_path, EngineOptions(device="cuda:0", max_batch_size=4))
    try:
        for batch in (1, 4):
            batch_images = np.random.default_rng(10 + batch).integers(0, 256, (batch, 64, 48, 3), dtype=np.uint8)
            want = _builder_tests().run_onnxruntime(exported_ssd, batch_images)
            assert_same_detections(engine.infer(batch_images), want, atol=1e-4)
    finally:
        engine.close()
