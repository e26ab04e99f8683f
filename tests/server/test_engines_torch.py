"""The torch engine rebuilds the exported module from the file's description and agrees with ONNX Runtime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from model_export.contract.metadata import ModelMetadata
from server.engines.base import EngineOptions, EngineOutput
from server.engines.onnxruntime import OnnxRuntimeEngine
from server.preprocess import preprocess

pytest.importorskip("torch")
pytest.importorskip("onnx")
from server.engines.torch import TorchEngine, TorchEngineError, weights_argument

REPO_ROOT = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO_ROOT.parent / "shared" / "data" / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def default_model(server) -> Path:  # type: ignore[no-untyped-def]
    """The default model file, as the session's server found or exported it."""
    path = Path(os.environ.get("SSD_MODEL") or REPO_ROOT / "weights" / "ssd_mobilenet_v1_coco.onnx")
    assert path.is_file()
    return path


def kept(out: EngineOutput, i: int, threshold: float = 0.3) -> list[tuple[int, float, np.ndarray]]:
    n = int(out.num_detections[i])
    return [
        (int(c), float(s), b)
        for c, s, b in zip(out.classes[i, :n], out.scores[i, :n], out.boxes[i, :n])
        if s >= threshold
    ]


@pytest.mark.slow
def test_torch_agrees_with_onnxruntime_on_the_default_model(default_model: Path) -> None:
    images = np.stack([preprocess(p.read_bytes(), (300, 300)).pixels for p in PHOTOS])
    reference, torch_engine = OnnxRuntimeEngine(), TorchEngine()
    meta_ort = reference.load(default_model, EngineOptions())
    meta_torch = torch_engine.load(default_model, EngineOptions(intra_op_threads=2))
    assert meta_torch == meta_ort
    a, b = reference.infer(images), torch_engine.infer(images)
    assert b.num_detections.dtype == np.int32 and b.boxes.shape == a.boxes.shape and b.classes.dtype == np.int32
    assert sum(len(kept(a, i, threshold=0.5)) for i in range(len(PHOTOS))) >= 3
    for i in range(len(PHOTOS)):
        # Confident detections only: near-tied weaker boxes may swap places in NMS between two runtimes.
        theirs = kept(b, i, threshold=0.4)
        for cls, score, box in kept(a, i, threshold=0.5):
            # The imported network keeps the file's quantised activation ranges as clamps, so a float rounding
            # difference can move a score by a quantisation step or two (and a box edge by ~1 px of 300).
            assert any(
                c == cls and abs(s - score) < 0.03 and float(np.abs(x - box).max()) < 0.01 for c, s, x in theirs
            ), (i, cls, score, box)


def test_fp16_needs_cuda(tmp_path: Path) -> None:
    with pytest.raises(TorchEngineError, match="fp16 needs a CUDA device"):
        TorchEngine().load(tmp_path / "m.onnx", EngineOptions(fp16=True))


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TorchEngineError, match="not found"):
        TorchEngine().load(tmp_path / "absent.onnx", EngineOptions())


def test_weights_are_found_from_the_description(tmp_path: Path) -> None:
    def meta(source: str) -> ModelMetadata:
        return ModelMetadata("m", (300, 300), ("a",), 0.01, 0.45, 400, 200, "softmax", source, None, 17)

    assert weights_argument(meta("coco"), tmp_path / "m.onnx") == "coco"
    assert weights_argument(meta("random"), tmp_path / "m.onnx") is None
    (tmp_path / "mine.pth").write_bytes(b"")
    assert weights_argument(meta("mine.pth"), tmp_path / "m.onnx") == str(tmp_path / "mine.pth")
    with pytest.raises(TorchEngineError, match="put it there"):
        weights_argument(meta("elsewhere.pth"), tmp_path / "m.onnx")


TFLITE = REPO_ROOT.parent / "shared" / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"


@pytest.fixture(scope="module")
def exportable():  # type: ignore[no-untyped-def]  # -> ExportableSSD, float numerics of the shared TFLite model
    from model_export.exportable import ExportableSSD
    from model_export.models import REGISTRY
    from model_export.spec import PostprocessOptions

    if not TFLITE.is_file():
        pytest.skip(f"shared model missing: {TFLITE}")
    return ExportableSSD(REGISTRY["ssd_mobilenet_v1_coco"].build(str(TFLITE), None, "float"), PostprocessOptions())


def test_fp16_covers_the_network_only(exportable) -> None:  # type: ignore[no-untyped-def]
    """The CUDA runner's fp16 (run here on the CPU, eagerly: the same module calls) reaches every convolution in
    float16 and stops before post-processing, which gets float32 tensors."""
    import copy

    import torch

    from server.engines.torch_gpu import CudaRunner

    seen: dict[str, list[torch.dtype]] = {"conv": [], "postprocess": []}

    def record(where: str):  # type: ignore[no-untyped-def]
        def hook(module, inputs) -> None:  # type: ignore[no-untyped-def]
            seen[where].extend(t.dtype for t in inputs)
        return hook

    module = copy.deepcopy(exportable)
    convs = [m for m in module.network.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        conv.register_forward_pre_hook(record("conv"))
    module.postprocess.register_forward_pre_hook(record("postprocess"))
    runner = CudaRunner(torch, module, torch.device("cpu"), fp16=True, max_batch_size=1, graphs=False)
    num, boxes, scores, classes = runner.run(np.zeros((1, 300, 300, 3), dtype=np.uint8))
    assert len(seen["conv"]) == len(convs) > 0 and set(seen["conv"]) == {torch.float16}
    assert seen["postprocess"] == [torch.float32, torch.float32]  # regression, logits
    assert boxes.dtype == scores.dtype == np.float32 and num.dtype == classes.dtype == np.int32


@pytest.mark.parametrize("fp16", [False, True])
def test_tf32_is_off_unless_fp16(fp16: bool) -> None:
    import torch

    from server.engines.torch import set_tf32

    set_tf32(torch, fp16)
    expected = "tf32" if fp16 else "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == expected
    assert torch.backends.cuda.matmul.fp32_precision == expected
    set_tf32(torch, False)


def test_loading_turns_tf32_off(tmp_path: Path) -> None:
    import torch

    from server.engines.torch import set_tf32

    set_tf32(torch, True)
    with pytest.raises(TorchEngineError, match="not found"):  # the flags are set before the file is read
        TorchEngine().load(tmp_path / "absent.onnx", EngineOptions())
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True])
def test_torch_cuda_agrees_with_onnxruntime_cpu(default_model: Path, fp16: bool) -> None:
    """On a GPU: fp32 within the export validation's tolerances of ORT CPU; fp16 within stated ones."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False here)")
    from model_export.spec import Detections, PostprocessOptions
    from model_export.validate import _Tally, compare_detections

    images = np.stack([preprocess(p.read_bytes(), (300, 300)).pixels for p in PHOTOS])
    reference, engine = OnnxRuntimeEngine(), TorchEngine()
    metadata = reference.load(default_model, EngineOptions())
    engine.load(default_model, EngineOptions(device="cuda", fp16=fp16))
    a, b = reference.infer(images), engine.infer(images)
    if fp16:
        # Stated fp16 tolerance: every reference detection above 0.35 is found with its class, its score within
        # 0.02 and its box within 0.005 (1.5 px at 300x300).
        assert sum(len(kept(a, i, threshold=0.35)) for i in range(len(images))) >= 3
        for i in range(len(images)):
            for cls, score, box in kept(a, i, threshold=0.35):
                assert any(c == cls and abs(s - score) < 0.02 and float(np.abs(x - box).max()) < 0.005
                           for c, s, x in kept(b, i, threshold=0.2)), (i, cls, score, box)
        return
    options = PostprocessOptions(
        score_threshold=metadata.score_threshold, iou_threshold=metadata.iou_threshold,
        candidates_per_class=metadata.candidates_per_class, max_detections=metadata.max_detections,
    )
    for i in range(len(images)):
        ours, theirs = (
            Detections(torch.from_numpy(o.boxes[i, : o.num_detections[i]].copy()),
                       torch.from_numpy(o.scores[i, : o.num_detections[i]].copy()),
                       torch.from_numpy(o.classes[i, : o.num_detections[i]].astype(np.int64)))
            for o in (b, a)
        )
        compare_detections(ours, theirs, options, metadata.labels, f"image {i}", _Tally())


def test_the_cuda_runner_path_without_graphs_matches_the_eager_module(exportable) -> None:  # type: ignore[no-untyped-def]
    """The GPU-resident runner's own steps (channels-last network, padding-free eager path, float32 tail, host
    copies), run on the CPU: the same detections as the plain module."""
    import copy

    import torch

    from server.engines.torch import run_module
    from server.engines.torch_gpu import CudaRunner

    images = np.stack([preprocess(p.read_bytes(), (300, 300)).pixels for p in PHOTOS[:2]])
    expected = [t.numpy() for t in run_module(torch, exportable, torch.from_numpy(images))]
    runner = CudaRunner(torch, copy.deepcopy(exportable), torch.device("cpu"), fp16=False, max_batch_size=4,
                        graphs=False)
    got = runner.run(images)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[3], expected[3])
    np.testing.assert_allclose(got[1], expected[1], atol=1e-4)
    np.testing.assert_allclose(got[2], expected[2], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_graph_replays_padded_batches_like_eager_runs(default_model: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False here)")
    images = np.stack([preprocess(p.read_bytes(), (300, 300)).pixels for p in PHOTOS])
    engine = TorchEngine()
    engine.load(default_model, EngineOptions(device="cuda", max_batch_size=4))
    full = engine.infer(images[:4])  # captures the batch-4 graph
    three = engine.infer(images[:3])  # replays it, zero-padded to 4
    assert 4 in engine._runner.graphs
    np.testing.assert_array_equal(three.num_detections, full.num_detections[:3])
    np.testing.assert_allclose(three.scores, full.scores[:3], atol=1e-6)
    assert engine.gpu_decoder is not None
    engine.close()
