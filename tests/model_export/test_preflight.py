"""Exports TensorRT can parse: no uint8 intermediate tensor after ONNX shape inference (every model source and
numerics), TopK K within TensorRT's limit, and `inspect_onnx` refusing files that break either before a build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from model_export.errors import ExportError
from model_export.exportable import ExportableSSD
from model_export.models import REGISTRY
from model_export.onnx_export import export_onnx
from model_export.spec import PostprocessOptions
from model_export.tensorrt.build import inspect_onnx
from model_export.tensorrt.preflight import TENSORRT_MAX_TOPK, oversized_topk, topk_sizes, uint8_intermediates

TFLITE = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"
OPTIONS = PostprocessOptions()
# (source, weights, numerics): the torchvision and NVIDIA sources with random weights, the TFLite file both ways.
EXPORTS = [
    ("ssd300_vgg16", None, None),
    ("ssdlite320_mobilenet_v3_large", None, None),
    ("ssd300_resnet50", None, None),
    ("ssd_mobilenet_v1_coco", "tflite", "float"),
    ("ssd_mobilenet_v1_coco", "tflite", "integer"),
]


def _build(name: str, weights: str | None, numerics: str | None):  # -> SSDModel
    if weights == "tflite":
        if not TFLITE.is_file():
            pytest.skip(f"shared model missing: {TFLITE}")
        weights = str(TFLITE)
    return REGISTRY[name].build(weights, None, numerics)


@pytest.fixture(scope="module")
def mobilenet_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preflight") / "m.onnx"
    export_onnx(_build("ssd_mobilenet_v1_coco", "tflite", "float"), OPTIONS, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("name", "weights", "numerics"), EXPORTS, ids=[f"{n}-{q or 'own'}" for n, _, q in EXPORTS])
def test_every_export_takes_its_input_cast_or_dequantized(
    name: str, weights: str | None, numerics: str | None, tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.onnx"
    export_onnx(_build(name, weights, numerics), OPTIONS, path)
    model = onnx.load(str(path))
    consumers = [node for node in model.graph.node if "images" in node.input]
    found = uint8_intermediates(model)
    if numerics == "integer":
        # The pixels are the first conv's uint8 input grid: one DequantizeLinear. Then LiteRT's own uint8
        # arithmetic: QDQ pairs (QuantizeLinear -> uint8, their zero points, integer ReLU6 clips) and nothing
        # else; TensorRT refuses this numerics outright (see the last test).
        assert [n.op_type for n in consumers] == ["DequantizeLinear"]
        assert found and {op for _, op in found} <= {"QuantizeLinear", "Constant", "Clip"}
    else:
        assert [(n.op_type, onnx.helper.get_attribute_value(n.attribute[0])) for n in consumers] == [
            ("Cast", onnx.TensorProto.FLOAT)
        ]
        assert found == []
        inspect_onnx(path)  # the whole pre-flight passes
    assert all(k is not None and k <= TENSORRT_MAX_TOPK for _, k in topk_sizes(model))


class _PermuteFirst(ExportableSSD):
    """The exporter as it was: permuting the uint8 input before casting it."""

    def forward(self, images: torch.Tensor):  # noqa: ANN201
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        regression, logits = self.network(x * self.scale + self.shift)
        return self.postprocess(regression, logits)


def test_casting_first_changes_no_output_and_the_old_order_is_refused(mobilenet_export: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("model_export.onnx_export.ExportableSSD", _PermuteFirst)
    old = tmp_path / "permute_first.onnx"
    export_onnx(_build("ssd_mobilenet_v1_coco", "tflite", "float"), OPTIONS, old)
    assert ("/Transpose_output_0", "Transpose") in uint8_intermediates(onnx.load(str(old)))
    with pytest.raises(ExportError, match=r"cannot be built by TensorRT: 1 uint8 intermediate tensor\(s\): "
                                          r"/Transpose_output_0 \(Transpose\); TensorRT takes uint8 only"):
        inspect_onnx(old)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 300, 300, 3), dtype=np.uint8)
    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"images": images})
            for p in (old, mobilenet_export)]
    for before, after in zip(*runs, strict=True):
        np.testing.assert_array_equal(before, after)  # bit-identical


def test_topk_above_tensorrt_limit_is_refused(mobilenet_export: Path, tmp_path: Path) -> None:
    model = onnx.load(str(mobilenet_export))
    sizes = topk_sizes(model)
    ks = {k for _, k in sizes}  # the fast path's and the fallback's (inside the If), all constants
    assert {OPTIONS.max_detections, OPTIONS.candidates_per_class} <= ks and None not in ks
    assert oversized_topk(model) == []
    name, _ = sizes[0]
    topk = next(n for n in model.graph.node if (n.name or n.output[0]) == name)
    constant = next(n for n in model.graph.node if n.output and n.output[0] == topk.input[1])
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([4000], np.int64)))
    assert oversized_topk(model) == [(name, 4000)]
    path = tmp_path / "big_topk.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=f"TopK {name} has K = 4000; TensorRT's TopK takes K <= 3840"):
        inspect_onnx(path)


def test_integer_numerics_are_refused_with_their_own_message(tmp_path: Path) -> None:
    path = tmp_path / "int.onnx"
    export_onnx(_build("ssd_mobilenet_v1_coco", "tflite", "integer"), OPTIONS, path)
    with pytest.raises(ExportError, match="computes in uint8 \\(--numerics integer\\), which TensorRT cannot run"):
        inspect_onnx(path)
