"""Engine-only runs on a tiny ONNX file that follows the model contract (no real weights needed)."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from benchmarks.engine_only import DECODE_MODES, LoadedEngine, run_engine_only  # noqa: E402
from benchmarks.inputs import InputSet, reencode, source_photos  # noqa: E402
from model_export.contract.metadata import METADATA_KEY, ModelMetadata  # noqa: E402

K = 5


def _toy_model(path, size=(300, 300)):
    h, w = size
    zeros_k = helper.make_tensor("zk", TensorProto.FLOAT, [1, K], [0.0] * K)
    zeros_4 = helper.make_tensor("z4", TensorProto.FLOAT, [1, 1, 4], [0.0] * 4)
    axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    two = helper.make_tensor("two", TensorProto.INT64, [1], [2])
    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),  # [B]
        helper.make_node("Unsqueeze", ["m", "one"], ["m1"]),  # [B, 1]
        helper.make_node("Mul", ["m1", "zk"], ["scores"]),  # [B, K]
        helper.make_node("Unsqueeze", ["scores", "two"], ["s2"]),  # [B, K, 1]
        helper.make_node("Mul", ["s2", "z4"], ["boxes"]),  # [B, K, 4]
        helper.make_node("Cast", ["scores"], ["classes"], to=TensorProto.INT32),
        helper.make_node("Mul", ["m", "m"], ["mm"]),
        helper.make_node("Sub", ["mm", "mm"], ["z"]),
        helper.make_node("Cast", ["z"], ["num_detections"], to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["B", h, w, 3])],
        [
            helper.make_tensor_value_info("num_detections", TensorProto.INT32, ["B"]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["B", K, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", K]),
            helper.make_tensor_value_info("classes", TensorProto.INT32, ["B", K]),
        ],
        initializer=[zeros_k, zeros_4, axes, one, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    meta = ModelMetadata(
        model="toy", input_size=size, labels=("a", "b"), score_threshold=0.01, iou_threshold=0.45,
        candidates_per_class=400, max_detections=K, score_activation="softmax", weights_source="test",
        weights_sha256=None, opset=18,
    )
    helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    loaded = LoadedEngine(_toy_model(tmp_path_factory.mktemp("m") / "toy.onnx"), "onnxruntime", threads=1)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def inputs():
    photos = source_photos()[:3]
    return InputSet("photos", (640, 480), tuple(reencode(p, (640, 480)) for p in photos), tuple(p.name for p in photos))


@pytest.mark.parametrize("decode", DECODE_MODES)
@pytest.mark.parametrize("batch", [1, 4])
def test_engine_only_runs_every_mode(engine, inputs, decode, batch):
    run = run_engine_only(engine, inputs, batch, decode, duration_s=0.3, warmup_s=0.05, decode_workers=2)
    assert run.batches >= 1 and run.images == run.batches * batch
    assert run.images_per_s > 0 and run.latency.count == run.batches
    assert run.decode == decode and run.batch_size == batch
    json.dumps(run.as_dict())


def test_preprocess_is_the_servers(engine, inputs):
    from server.preprocess import preprocess

    np.testing.assert_array_equal(engine.preprocess(inputs.images[0]), preprocess(inputs.images[0], (300, 300)).pixels)
    assert engine.preprocess(inputs.images[0]).shape == (300, 300, 3)


def test_bounded_by_max_batches(engine, inputs):
    run = run_engine_only(engine, inputs, 2, "none", duration_s=60, warmup_s=0, max_batches=5)
    assert run.batches <= 5


def test_rejects_bad_arguments(engine, inputs):
    with pytest.raises(ValueError):
        run_engine_only(engine, inputs, 0, "none")
    with pytest.raises(ValueError):
        run_engine_only(engine, inputs, 1, "gpu")  # type: ignore[arg-type]
