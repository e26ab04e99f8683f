"""TFLite operators as float PyTorch modules, and the interpreter that wires a file's own operator list.

Numerics: a quantised TFLite kernel computes the float op on dequantised values, rounds to the output's
uint8 grid and saturates at the grid's ends. numerics="float" (the default) keeps the float op and the
saturation (a clamp to the output tensor's representable range, exactly what TF's FakeQuant nodes did in
training) and drops only the rounding. The clamp matters: TOCO folds ReLU6 into the output range (the
backbone convs of ssd_mobilenet_v1 have no fused activation, only a [0, 6] uint8 range), and the class-logit
ranges cap the scores. numerics="fake_quant" also rounds every quantised activation to its grid (Round,
Clip, Mul in the graph), which tracks LiteRT's integer kernels to about a fifth of a step instead of about
one. Clamps / rounding that the input already satisfies (RESHAPE, CONCATENATION on a shared grid) are omitted.

Layout: the graph runs NCHW internally (PyTorch's convs); 4-D tensors are tagged "nchw" or "nhwc" and
converted only where an op's semantics depend on it (RESHAPE/SQUEEZE and axis-based ops see NHWC, as TFLite).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)
from torch import nn

from model_export.errors import ExportError
from model_export.tflite.reader import Graph, Operator

Layout = Literal["nchw", "nhwc"]
Range = tuple[float, float]  # (lo, hi); +-inf where unbounded
Numerics = Literal["float", "fake_quant"]
_UNBOUNDED: Range = (-math.inf, math.inf)
# ActivationFunctionType -> value range of the fused activation (TANH / SIGN_BIT are not used by SSDs).
_FUSED: dict[int, Range] = {0: _UNBOUNDED, 1: (0.0, math.inf), 2: (-1.0, 1.0), 3: (0.0, 6.0)}
_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}  # NHWC axis -> NCHW axis


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


@dataclass(frozen=True)
class Known:
    """What is known of a tensor's values: bounds, and the grid they lie on (None: anywhere)."""

    lo: float = -math.inf
    hi: float = math.inf
    step: float | None = None


_ANY = Known()


@dataclass(frozen=True)
class OutputQuant:
    """What an op's output goes through: a clamp to [lo, hi] and, in fake-quant mode, rounding to a grid."""

    lo: float
    hi: float
    step: float | None = None  # grid spacing (the output tensor's scale); None: no rounding


def _finish(x: torch.Tensor, spec: OutputQuant | None) -> torch.Tensor:
    if spec is None:
        return x
    lo, hi = spec.lo, spec.hi
    if spec.step is not None:  # real = step * q, q an integer in [lo / step, hi / step]
        q = torch.round(x * (1.0 / spec.step)).clamp(round(lo / spec.step), round(hi / spec.step))
        return q * spec.step
    if lo == 0.0 and hi == math.inf:
        return F.relu(x)
    return x.clamp(min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME': output = ceil(size / stride); the odd pixel of padding goes at the end (bottom / right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _ZeroPad(torch.autograd.Function):
    """Zero padding that exports as one ONNX `Pad` with a constant `pads` input. (F.pad's TorchScript symbolic
    computes the pads in the graph, through a reversing Slice the exporter cannot constant-fold: five small
    shape subgraphs per model, and a non-constant `pads` for every runtime to deal with.)"""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:  # type: ignore[override]
        return F.pad(x, pad)  # (left, right, top, bottom) on NCHW

    @staticmethod
    def symbolic(g, x, pad):  # type: ignore[no-untyped-def]
        left, right, top, bottom = pad
        pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)  # ONNX: begins, then ends
        return g.op("Pad", x, g.op("Constant", value_t=pads), mode_s="constant")


class Conv(nn.Module):
    """CONV_2D and DEPTHWISE_CONV_2D (groups = input channels), NCHW in and out."""

    def __init__(
        self,
        conv: nn.Conv2d,
        pad: tuple[int, int, int, int],  # (left, right, top, bottom), applied only when asymmetric
        input_nhwc: bool,
        out: OutputQuant | None,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.pad = pad
        self.input_nhwc = input_nhwc
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_nhwc:
            x = _to_nchw(x)
        if any(self.pad):
            x = _ZeroPad.apply(x, self.pad)
        return _finish(self.conv(x), self.out)


class Reshape(nn.Module):
    """RESHAPE / SQUEEZE to the file's static output shape, batch axis kept dynamic."""

    def __init__(self, shape: Sequence[int], input_nchw: bool, out: OutputQuant | None) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.input_nchw = input_nchw
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_nchw:
            x = _to_nhwc(x)
        return _finish(x.reshape(-1, *self.shape[1:]), self.out)


class Concat(nn.Module):
    def __init__(self, dim: int, to_nhwc: Sequence[bool], out: OutputQuant | None) -> None:
        super().__init__()
        self.dim = dim
        self.to_nhwc = tuple(to_nhwc)
        self.out = out

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        xs = tuple(_to_nhwc(x) if convert else x for x, convert in zip(xs, self.to_nhwc, strict=True))
        return _finish(torch.cat(xs, dim=self.dim), self.out)


class Elementwise(nn.Module):
    """ADD / SUB / MUL of two activations or an activation and a constant (`constant_slot` 0 or 1)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        constant: torch.Tensor | None,
        constant_slot: int,
        to_nhwc: Sequence[bool],
        out: OutputQuant | None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.constant_slot = constant_slot
        self.to_nhwc = tuple(to_nhwc)
        self.out = out
        self.register_buffer("constant", constant, persistent=False)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        args = [_to_nhwc(x) if convert else x for x, convert in zip(xs, self.to_nhwc, strict=True)]
        if self.constant is not None:
            args.insert(self.constant_slot, self.constant)
        return _finish(self.fn(args[0], args[1]), self.out)


class Unary(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], out: OutputQuant | None) -> None:
        super().__init__()
        self.fn = fn
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _finish(self.fn(x), self.out)


@dataclass
class _Built:
    module: nn.Module
    inputs: tuple[int, ...]  # activation tensors fed to the module, in order
    layout: Layout
    known: Known  # what the output can hold (for eliding redundant clamps / rounding)


@dataclass
class _Context:
    graph: Graph
    layout: dict[int, Layout] = field(default_factory=dict)
    numerics: Numerics = "float"
    known: dict[int, Known] = field(default_factory=dict)
    channel_perms: dict[int, np.ndarray] = field(default_factory=dict)

    def constant(self, tensor: int) -> np.ndarray | None:
        """A constant's float value, looking through DEQUANTIZE of a constant (fp16 / int8 weights)."""
        t = self.graph.tensors[tensor]
        if t.data is not None:
            return t.value()
        producer = self.graph.producer(tensor)
        if producer is not None and producer.op == "DEQUANTIZE":
            inner = self.graph.tensors[producer.inputs[0]]
            if inner.data is not None:
                return inner.value().astype(np.float32)
        return None

    def output_quant(self, op: Operator, fused: Range, known: Known = _ANY) -> tuple[OutputQuant | None, Known]:
        """The clamp (and in fake-quant mode the rounding) an op's output needs: fused activation ∩ the output
        tensor's quantised range, on its grid. None where the input already satisfies it (e.g. RESHAPE)."""
        lo, hi = fused
        out = self.graph.tensors[op.outputs[0]]
        q = out.real_range()
        step = None
        if q is not None:
            lo, hi = max(lo, q[0]), min(hi, q[1])
            if self.numerics == "fake_quant" and out.quantization is not None:
                step = float(out.quantization.scale[0])
        if known.lo >= lo and known.hi <= hi and (step is None or known.step == step):
            return None, known
        return OutputQuant(lo, hi, step), Known(max(lo, known.lo), min(hi, known.hi), step)

    def fused(self, op: Operator) -> Range:
        code = int(op.options.get("fused_activation_function", 0))
        if code not in _FUSED:
            raise ExportError(f"{op.op} (operator {op.index}) has an unsupported fused activation {code}")
        return _FUSED[code]


def _weights(ctx: _Context, op: Operator) -> tuple[np.ndarray, np.ndarray | None]:
    weight = ctx.constant(op.inputs[1])
    if weight is None:
        raise ExportError(f"{op.op} (operator {op.index}) has non-constant weights")
    bias = ctx.constant(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    return weight, bias


def _conv(ctx: _Context, op: Operator, depthwise: bool) -> _Built:
    x = op.inputs[0]
    in_shape = ctx.graph.tensors[x].shape  # NHWC
    weight, bias = _weights(ctx, op)  # conv: [O, kh, kw, I]; depthwise: [1, kh, kw, I * M]
    opts = op.options
    stride = (int(opts.get("stride_h", 1)), int(opts.get("stride_w", 1)))
    dilation = (int(opts.get("dilation_h_factor", 1) or 1), int(opts.get("dilation_w_factor", 1) or 1))
    in_ch = in_shape[3]
    if depthwise:
        out_ch = weight.shape[3]
        w = np.transpose(weight, (3, 0, 1, 2))  # [I*M, 1, kh, kw]; output channel i*M + m reads input i
        groups = in_ch
        if out_ch % in_ch:
            raise ExportError(f"DEPTHWISE_CONV_2D (operator {op.index}): {out_ch} outputs for {in_ch} inputs")
    else:
        out_ch = weight.shape[0]
        w = np.transpose(weight, (0, 3, 1, 2))  # [O, I, kh, kw]
        groups = in_ch // weight.shape[3]
    perm = ctx.channel_perms.get(op.index)
    if perm is not None:
        w = w[perm]
        bias = bias[perm] if bias is not None else None
    kh, kw = w.shape[2], w.shape[3]
    if int(opts.get("padding", 0)) == 0:  # SAME
        top, bottom = _same_padding(in_shape[1], kh, stride[0], dilation[0])
        left, right = _same_padding(in_shape[2], kw, stride[1], dilation[1])
    else:  # VALID
        top = bottom = left = right = 0
    symmetric = top == bottom and left == right
    conv = nn.Conv2d(
        in_ch,
        out_ch,
        (kh, kw),
        stride=stride,
        padding=(top, left) if symmetric else 0,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
        if bias is not None:
            conv.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    out, known = ctx.output_quant(op, ctx.fused(op))
    pad = (0, 0, 0, 0) if symmetric else (left, right, top, bottom)
    module = Conv(conv, pad, input_nhwc=ctx.layout.get(x) == "nhwc", out=out)
    return _Built(module, (x,), "nchw", known)


def _reshape(ctx: _Context, op: Operator) -> _Built:
    x = op.inputs[0]
    in_shape = ctx.graph.tensors[x].shape
    out_shape = ctx.graph.tensors[op.outputs[0]].shape
    if not out_shape:  # no static shape recorded: take it from the shape operand or the options
        given = ctx.constant(op.inputs[1]) if len(op.inputs) > 1 else op.options.get("new_shape")
        out_shape = tuple(int(d) for d in np.asarray(given).reshape(-1)) if given is not None else ()
    if not out_shape or not in_shape or out_shape[0] != in_shape[0] or -1 in out_shape[1:]:
        raise ExportError(
            f"{op.op} (operator {op.index}) {in_shape} -> {out_shape}: "
            "only batch-preserving static reshapes are supported"
        )
    out, known = ctx.output_quant(op, _UNBOUNDED, ctx.known.get(x, _ANY))
    nchw = ctx.layout.get(x) == "nchw" and len(in_shape) == 4
    return _Built(Reshape(out_shape, nchw, out), (x,), "nhwc", known)


def _concat(ctx: _Context, op: Operator) -> _Built:
    rank = len(ctx.graph.tensors[op.outputs[0]].shape)
    axis = int(op.options.get("axis", 0)) % max(rank, 1)
    if axis == 0:
        raise ExportError(f"CONCATENATION (operator {op.index}) along the batch axis is not supported")
    xs = op.inputs
    if any(ctx.constant(t) is not None for t in xs):
        raise ExportError(f"CONCATENATION (operator {op.index}) with a constant input is not supported")
    all_nchw = rank == 4 and all(ctx.layout.get(t) == "nchw" for t in xs)
    dim = _NCHW_AXIS[axis] if all_nchw else axis
    to_nhwc = [False] * len(xs) if all_nchw else [ctx.layout.get(t) == "nchw" for t in xs]
    ins = [ctx.known.get(t, _ANY) for t in xs]
    steps = {k.step for k in ins}
    union = Known(min(k.lo for k in ins), max(k.hi for k in ins), steps.pop() if len(steps) == 1 else None)
    out, known = ctx.output_quant(op, ctx.fused(op), union)
    return _Built(Concat(dim, to_nhwc, out), tuple(xs), "nchw" if all_nchw else "nhwc", known)


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ADD": torch.add,
    "SUB": torch.sub,
    "MUL": torch.mul,
}


def _binary(ctx: _Context, op: Operator) -> _Built:
    a, b = op.inputs[:2]
    consts = [ctx.constant(a), ctx.constant(b)]
    if consts[0] is not None and consts[1] is not None:
        raise ExportError(f"{op.op} (operator {op.index}) of two constants is not supported")
    slot = 0 if consts[0] is not None else 1
    constant = consts[slot]
    live = [t for t, c in zip((a, b), consts, strict=True) if c is None]
    layouts = {ctx.layout.get(t, "nhwc") for t in live}
    if constant is None and layouts == {"nchw"}:
        to_nhwc, layout = [False, False], "nchw"
    else:  # mixed layouts or a broadcast constant: compute in the file's NHWC layout
        to_nhwc, layout = [ctx.layout.get(t) == "nchw" for t in live], "nhwc"
    tensor = torch.from_numpy(np.ascontiguousarray(constant, dtype=np.float32)) if constant is not None else None
    out, known = ctx.output_quant(op, ctx.fused(op))
    module = Elementwise(_BINARY[op.op], tensor, slot, to_nhwc, out)
    return _Built(module, tuple(live), layout, known)


_UNARY: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Range]] = {
    "LOGISTIC": (torch.sigmoid, (0.0, 1.0)),
    "TANH": (torch.tanh, (-1.0, 1.0)),
    "RELU": (F.relu, (0.0, math.inf)),
    "RELU6": (lambda x: x.clamp(0.0, 6.0), (0.0, 6.0)),
    "RELU_N1_TO_1": (lambda x: x.clamp(-1.0, 1.0), (-1.0, 1.0)),
    "HARD_SWISH": (F.hardswish, (-0.375, math.inf)),
    # In a float graph (de)quantisation is the identity; the output clamp keeps QUANTIZE's saturation.
    "QUANTIZE": (lambda x: x, _UNBOUNDED),
    "DEQUANTIZE": (lambda x: x, _UNBOUNDED),
}


def _unary(ctx: _Context, op: Operator) -> _Built:
    x = op.inputs[0]
    fn, out_range = _UNARY[op.op]
    given = ctx.known.get(x, _ANY) if out_range == _UNBOUNDED else Known(*out_range)
    out, known = ctx.output_quant(op, _UNBOUNDED, given)
    return _Built(Unary(fn, out), (x,), ctx.layout.get(x, "nhwc"), known)


OP_BUILDERS: dict[str, Callable[[_Context, Operator], _Built]] = {
    "CONV_2D": lambda ctx, op: _conv(ctx, op, depthwise=False),
    "DEPTHWISE_CONV_2D": lambda ctx, op: _conv(ctx, op, depthwise=True),
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "CONCATENATION": _concat,
    **{name: _binary for name in _BINARY},
    **{name: _unary for name in _UNARY},
}


class TFLiteNetwork(nn.Module):
    """Runs the needed slice of a TFLite graph: one module per operator, wired by tensor index.

    Input: the graph input as normalised float NCHW [B, C, H, W]. Output: the requested tensors in the
    file's own layout (NHWC for 4-D), batch axis dynamic.
    """

    def __init__(
        self,
        input_tensor: int,
        outputs: Sequence[int],
        steps: Sequence[_Built],
        wiring: Sequence[int],
        nchw_outputs: Sequence[int],
    ) -> None:
        super().__init__()
        self.input_tensor = input_tensor
        self.output_tensors = tuple(outputs)
        self.ops = nn.ModuleList(step.module for step in steps)
        self.wiring = tuple((step.inputs, out) for step, out in zip(steps, wiring, strict=True))
        self.nchw_outputs = frozenset(nchw_outputs)  # returned as NHWC, like the file
        # Tensors to drop after each step (their last use), so eager runs hold only live activations.
        last_use = {t: i for i, step in enumerate(steps) for t in step.inputs}
        self.release = tuple(
            tuple(t for t in set(step.inputs) if last_use[t] == i and t not in self.output_tensors)
            for i, step in enumerate(steps)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = {self.input_tensor: x}
        for op, (inputs, out), done in zip(self.ops, self.wiring, self.release, strict=True):
            env[out] = op(*(env[t] for t in inputs))
            for t in done:
                del env[t]
        return tuple(_to_nhwc(env[t]) if t in self.nchw_outputs else env[t] for t in self.output_tensors)


def build_network(
    graph: Graph,
    outputs: Sequence[int],
    channel_perms: dict[int, np.ndarray] | None = None,
    numerics: Numerics = "float",
) -> TFLiteNetwork:
    """A float module computing `outputs` from the graph's single image input.

    `numerics`: "float" keeps the saturation of quantised tensors (clamps) but not their rounding;
    "fake_quant" also rounds every quantised activation to its uint8 grid, as the integer kernels do.

    `channel_perms` maps an operator index to a permutation of its output channels (applied to the
    weights, so it costs nothing at run time).
    """
    if len(graph.inputs) != 1:
        raise ExportError(f"expected one input tensor, the file has {len(graph.inputs)}")
    image = graph.inputs[0]
    ctx = _Context(graph, channel_perms=dict(channel_perms or {}), numerics=numerics)
    ctx.layout[image] = "nchw"
    if graph.tensors[image].quantization is not None and graph.tensors[image].is_quantized:
        q = graph.tensors[image].real_range()
        step = float(graph.tensors[image].quantization.scale[0]) if numerics == "fake_quant" else None
        ctx.known[image] = Known(*q, step) if q is not None else _ANY

    needed: set[int] = set()  # operator indices on a path from the input to an output
    stack = list(outputs)
    seen: set[int] = set()
    while stack:
        t = stack.pop()
        if t in seen or t == image or t < 0:
            continue
        seen.add(t)
        producer = graph.producer(t)
        if producer is None:
            if graph.tensors[t].data is None:
                raise ExportError(f"tensor {graph.tensors[t].name!r} has no producer and no data")
            continue
        if producer.op == "DEQUANTIZE" and ctx.constant(t) is not None:
            continue  # folded into the consumer as a constant
        needed.add(producer.index)
        stack.extend(producer.inputs)

    steps: list[_Built] = []
    wiring: list[int] = []
    for op in graph.operators:  # TFLite stores operators in execution order
        if op.index not in needed:
            continue
        builder = OP_BUILDERS.get(op.op)
        if builder is None:
            raise ExportError(
                f"unsupported TFLite operator {op.op} (operator {op.index}, output "
                f"{graph.tensors[op.outputs[0]].name!r}); supported: {', '.join(sorted(OP_BUILDERS))}"
            )
        if len(op.outputs) != 1:
            raise ExportError(f"{op.op} (operator {op.index}) has {len(op.outputs)} outputs; expected one")
        built = builder(ctx, op)
        out = op.outputs[0]
        ctx.layout[out] = built.layout
        ctx.known[out] = built.known
        steps.append(built)
        wiring.append(out)
    nchw_outputs = [t for t in outputs if ctx.layout.get(t) == "nchw"]
    return TFLiteNetwork(image, outputs, steps, wiring, nchw_outputs).eval()
