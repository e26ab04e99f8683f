"""The ONNX Runtime engine against a small hand-built file of the model contract, and the engine registry."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model_export.contract.metadata import METADATA_KEY, ModelMetadata
from server.engines import ENGINES, MODEL_SUFFIXES, create_engine
from server.engines.base import EngineOptions
from server.engines.cuda import loadable, visible_gpu_count
from server.engines.onnxruntime import (
    EngineLoadError,
    OnnxRuntimeEngine,
    cuda_provider_options,
    missing_cuda_libraries,
    session_options_for,
    solo_session_options_for,
)
from server.preprocess import preprocess

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper

REPO_ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO_ROOT.parent / "shared" / "data" / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:8]
SIZE = (8, 8)
K = 3
METADATA = ModelMetadata(
    model="contract-probe",
    input_size=SIZE,
    labels=("zero", "one", "two"),
    score_threshold=0.01,
    iou_threshold=0.45,
    candidates_per_class=400,
    max_detections=K,
    score_activation="softmax",
    weights_source="random",
    weights_sha256=None,
    opset=17,
)


def contract_model(
    path: Path, *, metadata: ModelMetadata | None = METADATA, input_type: int = TensorProto.UINT8
) -> Path:
    """images uint8 [B, 8, 8, 3] -> one detection per image: score = mean pixel / 255, class 2, a fixed box."""
    c = helper.make_tensor
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2, 3], keepdims=0),  # [B]
        helper.make_node("Div", ["mean", "c255"], ["score"]),
        helper.make_node("Unsqueeze", ["score", "ax1"], ["score_b1"]),  # [B, 1]
        helper.make_node("Mul", ["score_b1", "first_row"], ["scores"]),  # [B, K]
        helper.make_node("Mul", ["score", "zero"], ["zeros_b"]),  # [B]
        helper.make_node("Add", ["zeros_b", "one"], ["ones_b"]),
        helper.make_node("Cast", ["ones_b"], ["num_detections"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["zeros_b", "ax12"], ["zeros_b11"]),  # [B, 1, 1]
        helper.make_node("Add", ["zeros_b11", "box_rows"], ["boxes"]),  # [B, K, 4]
        helper.make_node("Mul", ["score_b1", "zero"], ["zeros_b1"]),
        helper.make_node("Add", ["zeros_b1", "class_row"], ["classes_f"]),
        helper.make_node("Cast", ["classes_f"], ["classes"], to=TensorProto.INT32),
    ]
    box_rows = np.zeros((1, K, 4), np.float32)
    box_rows[0, 0] = (0.1, 0.2, 0.3, 0.4)
    initializers = [
        c("c255", TensorProto.FLOAT, [], [255.0]),
        c("zero", TensorProto.FLOAT, [], [0.0]),
        c("one", TensorProto.FLOAT, [], [1.0]),
        c("ax1", TensorProto.INT64, [1], [1]),
        c("ax12", TensorProto.INT64, [2], [1, 2]),
        c("first_row", TensorProto.FLOAT, [1, K], [1.0] + [0.0] * (K - 1)),
        c("box_rows", TensorProto.FLOAT, [1, K, 4], box_rows.ravel().tolist()),
        c("class_row", TensorProto.FLOAT, [1, K], [2.0] + [0.0] * (K - 1)),
    ]
    graph = helper.make_graph(
        nodes,
        "contract_probe",
        [helper.make_tensor_value_info("images", input_type, ["batch", *SIZE, 3])],
        [
            helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", K, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", K]),
            helper.make_tensor_value_info("classes", TensorProto.INT32, ["batch", K]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata is not None:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, metadata.to_json()
    onnx.save(model, str(path))
    return path


def test_load_reads_the_description_and_infer_follows_the_contract(tmp_path: Path) -> None:
    engine = OnnxRuntimeEngine()
    metadata = engine.load(contract_model(tmp_path / "m.onnx"), EngineOptions(intra_op_threads=1))
    assert metadata == METADATA
    images = np.stack([np.full((*SIZE, 3), v, np.uint8) for v in (0, 51, 255)])
    out = engine.infer(images)
    assert out.num_detections.dtype == np.int32 and out.num_detections.tolist() == [1, 1, 1]
    assert out.boxes.shape == (3, K, 4) and out.boxes.dtype == np.float32
    np.testing.assert_allclose(out.scores[:, 0], [0.0, 0.2, 1.0], atol=1e-6)
    assert out.classes.dtype == np.int32 and out.classes[:, 0].tolist() == [2, 2, 2]
    engine.close()


def test_only_the_solo_session_spins_and_it_stops_when_its_run_returns() -> None:
    import onnxruntime as ort

    plain, solo = session_options_for(ort, 0), solo_session_options_for(ort, 0)
    assert plain.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert solo.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert solo.get_session_config_entry("session.force_spinning_stop") == "1"
    assert solo.intra_op_num_threads == plain.intra_op_num_threads  # the same threads: the same partitioning


def test_infer_solo_gives_what_infer_gives_on_real_photos(server) -> None:  # type: ignore[no-untyped-def]
    """The default model (as the session's server found or exported it), one photo at a time: bit for bit."""
    path = Path(os.environ.get("SSD_MODEL") or REPO_ROOT / "weights" / "ssd_mobilenet_v1_coco.onnx")
    engine = OnnxRuntimeEngine()
    engine.load(path, EngineOptions())
    assert len(PHOTOS) == 8
    for photo in PHOTOS:
        pixels = preprocess(photo.read_bytes(), (300, 300)).pixels[None]
        plain, solo = engine.infer(pixels), engine.infer_solo(pixels)
        assert int(plain.num_detections[0]) > 0
        for field in ("num_detections", "boxes", "scores", "classes"):
            np.testing.assert_array_equal(getattr(solo, field), getattr(plain, field), err_msg=f"{photo.name} {field}")
    engine.close()


def test_infer_solo_on_a_contract_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    engine = OnnxRuntimeEngine()
    engine.load(contract_model(tmp_path / "m.onnx"), EngineOptions(intra_op_threads=1))
    images = np.full((1, *SIZE, 3), 51, np.uint8)
    capfd.readouterr()
    np.testing.assert_allclose(engine.infer_solo(images).scores[:, 0], [0.2], atol=1e-6)
    # Its session is made here, in the serving process: ORT's own warnings (a config entry set twice was one)
    # would land on stderr as plain text lines among the JSON logs.
    assert capfd.readouterr().err == ""
    engine.close()


def test_a_file_without_the_description_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match="metadata"):
        OnnxRuntimeEngine().load(contract_model(tmp_path / "m.onnx", metadata=None), EngineOptions())


def test_a_file_off_the_contract_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match="images is tensor\\(float\\)"):
        OnnxRuntimeEngine().load(contract_model(tmp_path / "m.onnx", input_type=TensorProto.FLOAT), EngineOptions())


def test_missing_or_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineLoadError, match="not found"):
        OnnxRuntimeEngine().load(tmp_path / "absent.onnx", EngineOptions())
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(EngineLoadError, match="cannot load"):
        OnnxRuntimeEngine().load(junk, EngineOptions())


def test_cuda_without_the_provider_is_an_error_not_a_cpu_fallback(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal is for CPU-only builds")
    with pytest.raises(EngineLoadError, match="CUDAExecutionProvider"):
        OnnxRuntimeEngine().load(contract_model(tmp_path / "m.onnx"), EngineOptions(device="cuda"))


def test_cuda_provider_options_turn_tf32_off_and_search_heuristically() -> None:
    assert cuda_provider_options(1, fp16=False) == {
        "device_id": "1", "use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    assert cuda_provider_options(0, fp16=True)["use_tf32"] == "1"


def test_a_missing_cuda_library_is_named() -> None:
    assert missing_cuda_libraries(99) == [
        "libcudart.so.99", "libcublas.so.99", "libcublasLt.so.99", "libcufft.so.98"
    ] + ([] if loadable("libcudnn.so.9") else ["libcudnn.so.9"])


def _pretend_cuda_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDAExecutionProvider on any host, GPU or not; do the same on this CPU-only build."""
    import onnxruntime

    listed = [*onnxruntime.get_available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: listed)


def test_cuda_listed_but_no_gpu_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if visible_gpu_count():
        pytest.skip("this host has a GPU")
    _pretend_cuda_is_listed(monkeypatch)
    with pytest.raises(EngineLoadError, match="did not enable CUDAExecutionProvider .*: no NVIDIA GPU"):
        OnnxRuntimeEngine().load(contract_model(tmp_path / "m.onnx"), EngineOptions(device="cuda"))


def test_integer_exports_are_refused_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_cuda_is_listed(monkeypatch)
    integer = replace(METADATA, extra={"numerics": "integer"})
    with pytest.raises(EngineLoadError, match=r"integer \(QDQ\) export: .* --device cpu, or re-export with "
                                              r"--numerics float"):
        OnnxRuntimeEngine().load(contract_model(tmp_path / "m.onnx", metadata=integer), EngineOptions(device="cuda"))
    OnnxRuntimeEngine().load(contract_model(tmp_path / "m.onnx", metadata=integer), EngineOptions())  # CPU: fine


@pytest.mark.gpu
def test_cuda_with_io_binding_matches_the_cpu(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with CUDAExecutionProvider and an NVIDIA GPU")
    if not visible_gpu_count():  # onnxruntime-gpu lists CUDA on GPU-less hosts too
        pytest.skip("onnxruntime-gpu is installed but the CUDA driver shows no GPU")
    path = contract_model(tmp_path / "m.onnx")
    images = np.random.default_rng(0).integers(0, 256, (4, *SIZE, 3), dtype=np.uint8)
    cpu, gpu = OnnxRuntimeEngine(), OnnxRuntimeEngine()
    cpu.load(path, EngineOptions())
    gpu.load(path, EngineOptions(device="cuda:0"))
    a, b = cpu.infer(images), gpu.infer(images)
    np.testing.assert_array_equal(a.num_detections, b.num_detections)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_the_registry_names_every_engine() -> None:
    assert set(ENGINES) == {"onnxruntime", "torch", "tensorrt"} == set(MODEL_SUFFIXES)
    assert isinstance(create_engine("onnxruntime"), OnnxRuntimeEngine)
    with pytest.raises(ValueError, match="known engines"):
        create_engine("tflite")


def test_the_cuda_major_comes_from_the_provider_library(tmp_path: Path) -> None:
    import types

    from server.engines.onnxruntime import provider_cuda_major

    package = tmp_path / "onnxruntime"
    (package / "capi").mkdir(parents=True)
    fake = types.SimpleNamespace(__file__=str(package / "__init__.py"))
    assert provider_cuda_major(fake) is None  # a CPU-only build has no CUDA provider library
    (package / "capi" / "libonnxruntime_providers_cuda.so").write_bytes(b"\x7fELF...\0libcublas.so.13\0libcudart.so.13\0")
    assert provider_cuda_major(fake) == 13
