"""Graph checks TensorRT's ONNX parser would fail on, run before a build starts (pure Python: onnx only).

    uint8_intermediates  tensors typed uint8 after ONNX shape inference that are neither a graph input nor output:
                         the parser refuses them ("UINT8 is only supported as network input or output",
                         onnx-tensorrt docs/operators.md)
    oversized_topk       TopK nodes whose K is a constant above TensorRT's limit (K <= 3840, operators.md)
    preflight_problems   both, as one line each
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

TENSORRT_MAX_TOPK = 3840


def _inferred(model: Any) -> Any:
    import onnx

    return onnx.shape_inference.infer_shapes(model, strict_mode=False)


def uint8_intermediates(model: Any) -> list[tuple[str, str]]:
    """(tensor name, producing op type) of every uint8 tensor that is produced by a node and is not a graph output."""
    import onnx

    inferred = _inferred(model)
    outputs = {value.name for value in inferred.graph.output}
    types = {value.name: value.type.tensor_type.elem_type for value in inferred.graph.value_info}
    found = []
    for node in inferred.graph.node:
        for name in node.output:
            if name and name not in outputs and types.get(name) == onnx.TensorProto.UINT8:
                found.append((name, node.op_type))
    return found


def _graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph in it (the branches of an If, a Loop's body), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _graphs(sub)


def _nodes(model: Any) -> Iterator[Any]:
    for graph in _graphs(model.graph):
        yield from graph.node


def _constant_values(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for graph in _graphs(model.graph) for init in graph.initializer}
    for node in _nodes(model):
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def topk_sizes(model: Any) -> list[tuple[str, int | None]]:
    """(node name, K) of every TopK node, subgraphs included; K is None where it is computed at run time."""
    constants = _constant_values(model)
    sizes = []
    for node in _nodes(model):
        if node.op_type != "TopK":
            continue
        k = constants.get(node.input[1]) if len(node.input) > 1 else None
        sizes.append((node.name or node.output[0], None if k is None else int(np.asarray(k).reshape(-1)[0])))
    return sizes


def oversized_topk(model: Any, limit: int = TENSORRT_MAX_TOPK) -> list[tuple[str, int]]:
    return [(name, k) for name, k in topk_sizes(model) if k is not None and k > limit]


def preflight_problems(model: Any) -> list[str]:
    problems = []
    uint8 = uint8_intermediates(model)
    if uint8:
        shown = ", ".join(f"{name} ({op})" for name, op in uint8[:3]) + (" ..." if len(uint8) > 3 else "")
        problems.append(
            f"{len(uint8)} uint8 intermediate tensor(s): {shown}; TensorRT takes uint8 only as a network input or "
            "output (the exporter must cast the input to float before any other op)"
        )
    for name, k in oversized_topk(model):
        problems.append(f"TopK {name} has K = {k}; TensorRT's TopK takes K <= {TENSORRT_MAX_TOPK}")
    return problems
