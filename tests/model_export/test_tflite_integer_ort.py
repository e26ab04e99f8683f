"""The integer export under ONNX Runtime: u8 x s8 QLinearConv (VNNI on x86), and still LiteRT's values exactly.

The exported network alone (no post-processing) runs under ONNX Runtime's CPU kernels, the ones the server uses,
and its box encodings and class logits must equal LiteRT's on the same file, value for value.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from benchmarks.voc_map import load_rgb, resize_bilinear
from model_export.contract.cpu import exact_session
from model_export.models.tflite_ssd import build
from model_export.tflite.reference import LiteRTDetector

SHARED = Path(__file__).resolve().parents[3] / "shared"
TFLITE = SHARED / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"
PHOTOS = sorted((SHARED / "data" / "voc2012_sample" / "JPEGImages").glob("*.jpg"))[:12]

pytestmark = pytest.mark.skipif(not TFLITE.is_file(), reason=f"shared model missing: {TFLITE}")


class _Network(torch.nn.Module):
    """uint8 NHWC pixels -> the network's raw heads, normalised as the import's description says."""

    def __init__(self, network: torch.nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.network, self.mean, self.std = network, mean, std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network((x.permute(0, 3, 1, 2).float() - self.mean) / self.std)


@pytest.fixture(scope="module")
def network_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = build(str(TFLITE), None)
    assert model.extra_metadata["numerics"] == "integer"
    out = tmp_path_factory.mktemp("net") / "network.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Network(model.network, model.mean[0], model.std[0]).eval(),
            (torch.zeros((1, 300, 300, 3), dtype=torch.uint8),),
            str(out),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["regression", "logits"],
            dynamic_axes={"x": {0: "batch"}},
            autograd_inlining=False,
        )
    return out


def test_conv_weights_are_int8_and_fuse_to_u8s8_qlinearconv(network_onnx: Path, tmp_path: Path) -> None:
    proto = onnx.load(str(network_onnx))
    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    conv_weights = [node.input[1] for node in proto.graph.node if node.op_type == "Conv"]
    producers = {out: node for node in proto.graph.node for out in node.output}
    dtypes = Counter(values[producers[w].input[0]].dtype.name for w in conv_weights)
    zero_points = Counter(values[producers[w].input[2]].dtype.name for w in conv_weights)
    assert dtypes == Counter({"int8": 47}) and zero_points == Counter({"int8": 47})

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(network_onnx), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    qconvs = [n for n in optimised.graph.node if n.op_type == "QLinearConv"]
    fused_weights = {init.name: init.data_type for init in optimised.graph.initializer}
    assert len(qconvs) == 47
    assert all(fused_weights.get(n.input[3]) == onnx.TensorProto.INT8 for n in qconvs)  # x is uint8, w int8


def test_onnxruntime_network_equals_litert_value_for_value(network_onnx: Path) -> None:
    if len(PHOTOS) < 12:
        pytest.skip("shared VOC photos missing")
    litert = LiteRTDetector(TFLITE, keep_intermediates=True)
    session = exact_session(network_onnx)  # exact U8U8 convs where ORT's U8S8 saturates (no VNNI)
    pixels = [resize_bilinear(load_rgb(p), (300, 300)) for p in PHOTOS]
    pixels.append(np.zeros_like(pixels[0]))  # the blank frame too
    for start in (0, 1, 5):  # batches of 1, 4 and 8
        stop = {0: 1, 1: 5, 5: 13}[start]
        regression, logits = session.run(None, {"x": np.stack(pixels[start:stop])})
        for i, image in enumerate(pixels[start:stop]):
            raw = litert.raw(image)
            assert raw.logits is not None
            np.testing.assert_array_equal(regression[i], raw.box_encodings[:, [1, 0, 3, 2]])
            np.testing.assert_array_equal(logits[i], raw.logits)


def test_regular_convs_fuse_with_zero_weight_zero_points(network_onnx: Path, tmp_path: Path) -> None:
    """model_export/tflite/symmetric.py: every regular conv but the one on the image gets zero point 0 (ONNX
    Runtime's symmetric kernels); depthwise convs keep theirs; channel counts stay multiples of 16."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(network_onnx), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    values = {init.name: numpy_helper.to_array(init) for init in optimised.graph.initializer}
    kinds: Counter[str] = Counter()
    for node in (n for n in optimised.graph.node if n.op_type == "QLinearConv"):
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight, zero_point = values[node.input[3]], values[node.input[5]]
        symmetric = not np.any(zero_point)
        kinds[("depthwise" if group > 1 else "regular") + (" symmetric" if symmetric else "")] += 1
        if group > 1:
            assert weight.shape[0] % 16 == 0, weight.shape
        if node.input[0] == "x" or "ops.0/" in node.name:
            assert not symmetric  # the image has no producer that could write a channel twice
    assert kinds == Counter({"regular symmetric": 33, "regular": 1, "depthwise": 13})
