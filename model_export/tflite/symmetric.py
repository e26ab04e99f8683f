"""Integer convs with zero-point-0 int8 weights, exactly: a few activation channels are carried twice.

ONNX Runtime's fastest u8 x s8 QLinearConv kernels (MLAS's "symmetric" indirect conv and GEMM, which use the VNNI
dot product and skip the per-pixel input sums a weight zero point costs) need int8 weights whose zero point is 0.
A TFLite v1 conv's accumulator uses only the differences v = w - zero_point of its uint8 weights, which lie in
[-255, 255]. The weights can carry v itself with zero point 0 wherever every v fits int8's [-128, 127]; in
ssd_mobilenet_v1_coco all but 1 to 5 values of each conv do.

Where a value does not fit, at input channel c, the conv reads channel c twice: the tensor carries a copy of c as
an extra channel, and the conv splits each v of channel c over the two copies (v = a + b, both within int8).
The int32 accumulator is the same sum, so the requantised output is the same, bit for bit.

The copy costs nothing at run time beyond its channel (and the padding to a multiple of CHANNEL_ALIGNMENT
channels). The conv that produces the tensor writes channel c twice: one more weight row and bias, hence
identical values. A depthwise conv carries its input's channels to its output one to one, so the copy passes
through it: its input and output carry the same channels (a "chain"), and the copy is made by the regular conv at
the chain's start. A chain qualifies only when that conv exists (not the graph's image input) and every consumer
of every tensor in it is a conv, and no tensor of it is one of the network's outputs. A conv whose input chain
does not qualify keeps its weight zero point (still exact, on ONNX Runtime's slower asymmetric kernels).
Depthwise convs keep theirs: a depthwise accumulator reads one channel only, so there is nowhere to split a value.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from model_export.tflite.reader import Graph, Operator

INT8_MIN, INT8_MAX = -128, 127
# A tensor that carries copies is padded to a multiple of this many channels. ONNX Runtime's symmetric conv kernels
# on x86 need multiples of 4 (MLAS convsym.cpp, KernelInputChannelAlignment), and its depthwise kernel (which keeps
# its zero point) slows down on counts that are not multiples of 16: per node, 4 was slower than no copies at all,
# and 16 the fastest (BENCHMARKS.md, section 5).
CHANNEL_ALIGNMENT = 16


def copies_needed(v: np.ndarray) -> np.ndarray:
    """The number of int8 parts each value of `v` (integers) splits into: the smallest k with -128 k <= v <= 127 k."""
    v = np.asarray(v, dtype=np.int64)
    return np.maximum(1, np.maximum(-(-v // INT8_MAX), -(v // -INT8_MIN)))  # ceil(v / 127), ceil(-v / 128)


def _is_regular_conv(graph: Graph, op: Operator) -> bool:
    if op.op != "CONV_2D":
        return False
    in_channels = graph.tensors[op.inputs[0]].shape[3]
    return graph.tensors[op.inputs[1]].shape[3] == in_channels  # not a grouped conv


def _is_depthwise(graph: Graph, op: Operator) -> bool:
    """A depthwise conv with depth multiplier 1: output channel i reads input channel i only."""
    if op.op != "DEPTHWISE_CONV_2D":
        return False
    return graph.tensors[op.inputs[1]].shape[3] == graph.tensors[op.inputs[0]].shape[3]


def centred_weights(graph: Graph, op: Operator) -> np.ndarray | None:
    """A conv's w - zero_point as stored (CONV_2D: [O, kh, kw, I]), int32; None unless its weights are constant
    uint8 with one zero point (the integer conv builder names what else it finds)."""
    weight = graph.tensors[op.inputs[1]]
    q = weight.quantization
    if weight.data is None or weight.dtype != np.uint8 or q is None or q.zero_point.size != 1:
        return None
    return weight.data.astype(np.int32) - int(q.zero_point[0])


def channel_maps(graph: Graph, ops: Sequence[Operator], outputs: Collection[int]) -> dict[int, np.ndarray]:
    """tensor -> the source channel of each channel it carries ([0, ..., C - 1] then the copies), for the tensors
    whose consumers need copies (module docstring); tensors not listed carry their own channels once."""
    built = {op.index for op in ops}
    needs: dict[int, np.ndarray] = {}  # tensor -> parts per channel its regular-conv consumers need
    for op in ops:
        v = centred_weights(graph, op) if _is_regular_conv(graph, op) else None
        if v is not None:
            per_channel = copies_needed(v).max(axis=(0, 1, 2))
            if per_channel.max() > 1:
                t = op.inputs[0]
                needs[t] = np.maximum(needs.get(t, 1), per_channel)

    def chain_start(t: int) -> int:
        producer = graph.producer(t)
        while producer is not None and producer.index in built and _is_depthwise(graph, producer):
            t = producer.inputs[0]
            producer = graph.producer(t)
        return t

    maps: dict[int, np.ndarray] = {}
    for start in {chain_start(t) for t in needs}:
        chain, ok = [], True
        stack = [start]
        while stack:  # the start tensor and every tensor depthwise convs carry it to
            t = stack.pop()
            chain.append(t)
            ok = ok and t not in outputs
            for consumer in graph.consumers(t):
                if consumer.index not in built:
                    continue
                if _is_depthwise(graph, consumer):
                    stack.append(consumer.outputs[0])
                elif not _is_regular_conv(graph, consumer):
                    ok = False
        producer = graph.producer(start)
        if not ok or producer is None or producer.index not in built or not _is_regular_conv(graph, producer):
            continue
        parts = np.max([needs[t] for t in chain if t in needs], axis=0)
        copies = np.repeat(np.arange(parts.size), parts - 1)
        # Whole groups of CHANNEL_ALIGNMENT channels, as the symmetric kernels need: the last copy again, which
        # its consumers then give weights 0 (its channel's values are all held by the copies before it).
        padding = -(parts.size + copies.size) % CHANNEL_ALIGNMENT
        channel_map = np.concatenate([np.arange(parts.size), copies, np.full(padding, copies[-1])])
        for t in chain:
            maps[t] = channel_map
    return maps


def split_over_copies(v: np.ndarray, channel_map: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """A regular conv's centred weights v [O, C, kh, kw] -> [O, len(channel_map), kh, kw] whose parts over the
    copies of each input channel sum to v, and whether every part fits int8 (the weights then carry them with
    zero point 0). Each part takes what the previous copies could not hold, so copies get zeros where v fits.
    Where a part does not fit, the first copy holds all of v and the other copies 0 (to use with the zero point)."""
    if channel_map is None:
        channel_map = np.arange(v.shape[1])
    out = np.zeros((v.shape[0], channel_map.size, *v.shape[2:]), dtype=np.int32)
    left = v.astype(np.int32)  # what the copies of each channel still have to hold
    for position, source in enumerate(channel_map):
        out[:, position] = np.clip(left[:, source], INT8_MIN, INT8_MAX)
        left[:, source] -= out[:, position]
    if np.any(left):
        out = np.zeros_like(out)
        out[:, : v.shape[1]] = v
        return out, False
    return out, True
