"""Splice the post-processing's full path into an exported graph as the else-branch of a standard ONNX `If`.

The traced graph holds one placeholder node (`model_export.postprocess.FALLBACK_OP`) with inputs
(fast_ok, the fast path's 4 outputs, scores, boxes) and the 4 contract outputs. The full path is traced on its own,
from (scores, boxes) to the same 4 outputs; here it becomes the `If`'s else-branch, reading the outer graph's
scores and boxes, and the then-branch passes the fast outputs through.
"""

from __future__ import annotations

import onnx
from onnx import helper

from model_export.errors import ExportError
from model_export.postprocess import FALLBACK_DOMAIN, FALLBACK_OP

_PREFIX = "full_path/"


def _subgraph_names(graph: onnx.GraphProto, outer_inputs: dict[str, str]) -> dict[str, str]:
    """Every value name of the traced full path -> its name inside the else-branch."""
    names = dict(outer_inputs)
    for init in graph.initializer:
        names.setdefault(init.name, _PREFIX + init.name)
    for node in graph.node:
        for name in node.output:
            if name:
                names.setdefault(name, _PREFIX + name)
    return names


def splice_fallback(main: onnx.ModelProto, full_path: onnx.ModelProto) -> None:
    """Replace `main`'s placeholder node by `If(fast_ok, then: fast outputs, else: full_path)`, in place."""
    graph = main.graph
    found = [i for i, n in enumerate(graph.node) if n.domain == FALLBACK_DOMAIN and n.op_type == FALLBACK_OP]
    if len(found) != 1:
        raise ExportError(f"expected one {FALLBACK_OP} placeholder in the traced graph, found {len(found)}")
    index = found[0]
    placeholder = graph.node[index]
    fast_ok, *fast_outputs, scores, boxes = placeholder.input
    sub = full_path.graph
    if len(sub.input) != 2 or len(sub.output) != len(fast_outputs):
        raise ExportError("the traced full path must map (scores, boxes) to the 4 contract outputs")
    names = _subgraph_names(sub, {sub.input[0].name: scores, sub.input[1].name: boxes})

    nodes = []
    for node in sub.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _PREFIX + node.name
        copy.input[:] = [names[n] if n else n for n in node.input]
        copy.output[:] = [names[n] if n else n for n in node.output]
        nodes.append(copy)
    initializers = []
    for init in sub.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = names[init.name]
        initializers.append(copy)

    def branch_outputs(name: dict[str, str]) -> list[onnx.ValueInfoProto]:
        outs = []
        for out in sub.output:
            info = onnx.ValueInfoProto()
            info.CopyFrom(out)
            info.name = name[out.name]
            outs.append(info)
        return outs

    else_branch = helper.make_graph(nodes, "full_path", [], branch_outputs(names), initializers)
    then_outputs = branch_outputs({out.name: f"fast_path/{out.name}" for out in sub.output})
    then_branch = helper.make_graph(
        [
            helper.make_node("Identity", [src], [info.name], name=f"{info.name}/out")
            for src, info in zip(fast_outputs, then_outputs, strict=True)
        ],
        "fast_path",
        [],
        then_outputs,
    )
    node = helper.make_node(
        "If", [fast_ok], list(placeholder.output), name="full_path_if_needed",
        then_branch=then_branch, else_branch=else_branch,
    )
    graph.node.remove(placeholder)
    graph.node.insert(index, node)
    imports = [o for o in main.opset_import if o.domain != FALLBACK_DOMAIN]
    del main.opset_import[:]
    main.opset_import.extend(imports)
