"""Zero-point-0 weights by channel copies (model_export/tflite/symmetric.py): the splitting arithmetic, and the
plan on the shared ssd_mobilenet_v1_coco file. That the exported network still equals LiteRT value for value, and
that ONNX Runtime fuses the convs with zero weight zero points, is in test_tflite_integer_ort.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model_export.tflite.reader import read_tflite
from model_export.tflite.symmetric import (
    CHANNEL_ALIGNMENT,
    centred_weights,
    channel_maps,
    copies_needed,
    split_over_copies,
)

SHARED = Path(__file__).resolve().parents[3] / "shared"
TFLITE = SHARED / "models" / "coco_ssd_mobilenet_v1" / "detect.tflite"
needs_model = pytest.mark.skipif(not TFLITE.is_file(), reason=f"shared model missing: {TFLITE}")


def test_copies_needed_at_the_int8_edges() -> None:
    v = np.array([0, 127, 128, -128, -129, 254, 255, -255, -256])
    assert copies_needed(v).tolist() == [1, 1, 2, 1, 2, 2, 3, 2, 2]


def test_split_over_copies_keeps_every_sum_and_fits_int8() -> None:
    rng = np.random.default_rng(0)
    v = rng.integers(-120, 120, size=(6, 3, 3, 3))
    v[0, 1, 0, 0], v[4, 1, 2, 2], v[2, 2, 1, 1] = 200, -250, 255  # channel 1 needs 2 parts, channel 2 needs 3
    channel_map = np.array([0, 1, 2, 1, 2, 2])
    parts, symmetric = split_over_copies(v, channel_map)
    assert symmetric and parts.shape == (6, 6, 3, 3)
    assert parts.min() >= -128 and parts.max() <= 127
    for source in range(3):
        np.testing.assert_array_equal(parts[:, channel_map == source].sum(axis=1), v[:, source])
    assert not np.any(parts[:, 3:] * (np.abs(v[:, [1, 2, 2]]) <= 127))  # copies are 0 where v fits


def test_split_over_copies_without_enough_copies_keeps_the_values_for_a_zero_point() -> None:
    v = np.zeros((2, 2, 1, 1), dtype=np.int32)
    v[1, 0] = 200
    parts, symmetric = split_over_copies(v, np.array([0, 1, 1]))  # channel 0 would need a copy
    assert not symmetric
    np.testing.assert_array_equal(parts[:, :2], v)
    assert not np.any(parts[:, 2])


@needs_model
def test_plan_on_the_shared_model() -> None:
    graph = read_tflite(TFLITE)
    ops = [op for op in graph.operators if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    maps = channel_maps(graph, ops, set())
    assert maps, "the shared model's convs need copies"
    for tensor, channel_map in maps.items():
        channels = graph.tensors[tensor].shape[3]
        assert channel_map.size % CHANNEL_ALIGNMENT == 0
        np.testing.assert_array_equal(channel_map[:channels], np.arange(channels))
        assert channel_map.max() < channels
    for op in ops:
        a, b = op.inputs[0], op.outputs[0]
        if op.op == "DEPTHWISE_CONV_2D":  # carries its input's channels
            assert (a in maps) == (b in maps) and (a not in maps or np.array_equal(maps[a], maps[b]))
            continue
        if op.inputs[0] == graph.inputs[0]:
            assert a not in maps  # the image: nothing can write its channels twice
            continue
        v = centred_weights(graph, op)
        assert v is not None
        parts, symmetric = split_over_copies(np.transpose(v, (0, 3, 1, 2)), maps.get(a))
        assert symmetric, f"operator {op.index} keeps its zero point"
    # A tensor the network returns cannot carry copies, nor can any tensor of its chain.
    chain = next(t for t in maps if graph.producer(t).op == "DEPTHWISE_CONV_2D")
    start = graph.producer(chain).inputs[0]
    assert start not in channel_maps(graph, ops, {chain}) and chain not in channel_maps(graph, ops, {chain})
