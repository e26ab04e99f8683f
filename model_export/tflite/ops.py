"""TFLite operators as PyTorch modules, and the interpreter that wires a file's own operator list.

Numerics, two modes:

- "float": each op in float on dequantised values. The saturation of a quantised tensor is kept as a clamp
  to its representable range (exactly what TF's FakeQuant nodes did in training); its rounding is dropped.
  The clamp matters: TOCO folds ReLU6 into the output range (the backbone convs of ssd_mobilenet_v1 have no
  fused activation, only a [0, 6] uint8 range), and the class-logit ranges cap the scores. Runs anywhere
  (TensorRT included); LiteRT's uint8 values are tracked to about one step.
- "integer": LiteRT's uint8 arithmetic, bit for bit. A conv accumulates (q - zero_point) products exactly
  in int32 and requantises as LiteRT's XNNPACK kernels do, float32(acc) * float32(s_in * s_w / s_out)
  rounded half to even; a requantising CONCATENATION uses TFLite's own formula (as QuantizeLinear ->
  DequantizeLinear where that is the same for all 256 values, see `Requantize`). In ONNX a conv is
  QuantizeLinear / DequantizeLinear around a float Conv, which ONNX Runtime fuses into an integer QLinearConv:
  the same arithmetic, at int8 speed. The weights travel as int8, which makes the QLinearConv u8 x s8, the form
  whose x86 kernels use the VNNI dot product: as w - zero_point with zero point 0 where every value fits int8,
  which ONNX Runtime runs on its faster symmetric kernels (a few activation channels are carried twice to make
  that so: `symmetric.py`), otherwise as w - 128 with zero point - 128. Both keep the differences
  w - zero_point, so the same accumulator. On x86 CPUs with AVX2 but no VNNI, ONNX Runtime's u8 x s8
  kernel sums pairs of products in saturating int16 (its documented caveat), which can differ from LiteRT.
  Activations travel between ops as their dequantised float values, so every other op and the post-processing
  see ordinary floats.

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
from model_export.spec import Numerics
from model_export.tflite.reader import Graph, Operator
from model_export.tflite.symmetric import channel_maps, copies_needed, split_over_copies

Layout = Literal["nchw", "nhwc"]
Range = tuple[float, float]  # (lo, hi); +-inf where unbounded
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
    """What is known of a tensor's values: their bounds."""

    lo: float = -math.inf
    hi: float = math.inf


_ANY = Known()


@dataclass(frozen=True)
class OutputQuant:
    """The clamp an op's output goes through (float numerics)."""

    lo: float
    hi: float


def _finish(x: torch.Tensor, spec: OutputQuant | None) -> torch.Tensor:
    if spec is None:
        return x
    lo, hi = spec.lo, spec.hi
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
    channel_maps: dict[int, np.ndarray] = field(default_factory=dict)  # integer numerics: symmetric.channel_maps

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
        """The clamp an op's output needs: fused activation ∩ the output tensor's quantised range. None where
        the input already satisfies it (e.g. RESHAPE)."""
        lo, hi = fused
        q = self.graph.tensors[op.outputs[0]].real_range()
        if q is not None:
            lo, hi = max(lo, q[0]), min(hi, q[1])
        if known.lo >= lo and known.hi <= hi:
            return None, known
        return OutputQuant(lo, hi), Known(max(lo, known.lo), min(hi, known.hi))

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


@dataclass(frozen=True)
class _ConvGeometry:
    """A TFLite conv's weights as PyTorch's [O, I / groups, kh, kw] (channel permutation applied), and its
    stride, dilation, groups and TF padding (left, right, top, bottom)."""

    weight: np.ndarray
    bias: np.ndarray | None
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: tuple[int, int, int, int]


def _conv_geometry(ctx: _Context, op: Operator, weight: np.ndarray, bias: np.ndarray | None) -> _ConvGeometry:
    """`weight` as stored (conv: [O, kh, kw, I]; depthwise: [1, kh, kw, I * M]), raw or dequantised."""
    in_shape = ctx.graph.tensors[op.inputs[0]].shape  # NHWC
    opts = op.options
    stride = (int(opts.get("stride_h", 1)), int(opts.get("stride_w", 1)))
    dilation = (int(opts.get("dilation_h_factor", 1) or 1), int(opts.get("dilation_w_factor", 1) or 1))
    in_ch = in_shape[3]
    if op.op == "DEPTHWISE_CONV_2D":
        w = np.transpose(weight, (3, 0, 1, 2))  # [I*M, 1, kh, kw]; output channel i*M + m reads input i
        groups = in_ch
        if weight.shape[3] % in_ch:
            raise ExportError(f"DEPTHWISE_CONV_2D (operator {op.index}): {weight.shape[3]} outputs for {in_ch} inputs")
    else:
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
    return _ConvGeometry(np.ascontiguousarray(w), bias, stride, dilation, groups, (left, right, top, bottom))


def _conv(ctx: _Context, op: Operator) -> _Built:
    x = op.inputs[0]
    weight, bias = _weights(ctx, op)
    geo = _conv_geometry(ctx, op, weight, bias)
    left, right, top, bottom = geo.pad
    symmetric = top == bottom and left == right
    out_ch, in_per_group, kh, kw = geo.weight.shape
    conv = nn.Conv2d(
        in_per_group * geo.groups,
        out_ch,
        (kh, kw),
        stride=geo.stride,
        padding=(top, left) if symmetric else 0,
        dilation=geo.dilation,
        groups=geo.groups,
        bias=geo.bias is not None,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(geo.weight.astype(np.float32)))
        if geo.bias is not None:
            conv.bias.copy_(torch.from_numpy(geo.bias.astype(np.float32)))
    out, known = ctx.output_quant(op, ctx.fused(op))
    module = Conv(conv, (0, 0, 0, 0) if symmetric else geo.pad, input_nhwc=ctx.layout.get(x) == "nhwc", out=out)
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
    union = Known(min(k.lo for k in ins), max(k.hi for k in ins))
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
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _conv,
    "RESHAPE": _reshape,
    "SQUEEZE": _reshape,
    "CONCATENATION": _concat,
    **{name: _binary for name in _BINARY},
    **{name: _unary for name in _UNARY},
}


# ---------------------------------------------------------------------------------------- integer numerics


@dataclass(frozen=True)
class Grid:
    """A per-tensor uint8 quantisation: real = scale * (q - zero_point), q an integer in [lo, hi]."""

    scale: np.float32
    zero_point: int
    lo: int = 0
    hi: int = 255

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """As ONNX DequantizeLinear and LiteRT compute it: float32(q - zero_point) * scale."""
        return (q.astype(np.int32) - self.zero_point).astype(np.float32) * self.scale


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's std::round (TFLite's TfLiteRound)."""
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def _grid(ctx: _Context, tensor: int, op: Operator) -> Grid:
    t = ctx.graph.tensors[tensor]
    q = t.quantization
    if t.dtype != np.uint8 or q is None or q.scale.size != 1:
        kind = f"{t.dtype}" + ("" if q is None else f" with {q.scale.size} scale(s)")
        raise ExportError(
            f"{op.op} (operator {op.index}): tensor {t.name!r} is {kind}; integer numerics need per-tensor "
            "uint8 quantisation (import with numerics='float')"
        )
    return Grid(np.float32(q.scale[0]), int(q.zero_point[0]))


def _output_grid(ctx: _Context, op: Operator) -> Grid:
    """The output tensor's grid narrowed by the fused activation, as TFLite's CalculateActivationRangeQuantized."""
    grid = _grid(ctx, op.outputs[0], op)
    lo, hi = ctx.fused(op)

    def quantize(f: float) -> int:
        return grid.zero_point + int(_round_half_away(np.float32(f) / grid.scale))

    return Grid(
        grid.scale,
        grid.zero_point,
        grid.lo if lo == -math.inf else max(grid.lo, quantize(lo)),
        grid.hi if hi == math.inf else min(grid.hi, quantize(hi)),
    )


@dataclass(frozen=True)
class _ConvParams:
    """A quantised conv's grids and geometry (the weights travel as tensors). Hashable, plain values only,
    so that the ONNX exporter can carry it to `_QuantizedConvFn.symbolic`."""

    x: Grid
    w: Grid  # int8: zero point in [-128, 127]
    out: Grid
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pad: tuple[int, int, int, int]  # (left, right, top, bottom)

    @property
    def multiplier(self) -> float:
        """acc -> output steps, in float32 and in this order, as XNNPACK and ONNX Runtime's QLinearConv do."""
        return float(np.float32(self.x.scale * self.w.scale / self.out.scale))


class _QuantizedConvFn(torch.autograd.Function):
    """A conv in LiteRT's integer arithmetic on dequantised float input and output.

    Eager: the int32 accumulator is computed exactly (float64 conv of integers: every partial sum is far
    below 2**53), then requantised as float32(acc) * multiplier, rounded half to even, and clamped.
    ONNX: Q -> DQ -> Conv(DQ(uint8 weights), DQ(int32 bias)) -> Q [-> Clip] -> DQ, the pattern ONNX Runtime
    fuses into QLinearConv, whose MLAS kernel does that same arithmetic.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: _ConvParams
    ) -> torch.Tensor:
        q = torch.round(x / float(p.x.scale))  # q - zero_point, exactly: x is on its grid
        if any(p.pad):
            q = F.pad(q, p.pad)  # zero in (q - zero_point): the zero point, as TFLite pads
        centred = weight.double() - p.w.zero_point
        acc = F.conv2d(q.double(), centred, bias.double(), p.stride, 0, p.dilation, p.groups)
        multiplier = torch.tensor(p.multiplier, dtype=torch.float32, device=x.device)
        out = (torch.round(acc.float() * multiplier) + p.out.zero_point).clamp(p.out.lo, p.out.hi)
        return (out - p.out.zero_point) * torch.tensor(float(p.out.scale), dtype=torch.float32, device=x.device)

    @staticmethod
    def symbolic(g, x, weight, bias, p):  # type: ignore[no-untyped-def]
        def const(value: object, dtype: torch.dtype):  # type: ignore[no-untyped-def]
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        def grid(q: Grid, dtype: torch.dtype = torch.uint8):  # type: ignore[no-untyped-def]
            return const(float(q.scale), torch.float32), const(q.zero_point, dtype)

        x = g.op("DequantizeLinear", g.op("QuantizeLinear", x, *grid(p.x)), *grid(p.x))
        w = g.op("DequantizeLinear", weight, *grid(p.w, torch.int8))
        b_scale = const(float(np.float32(p.x.scale * p.w.scale)), torch.float32)
        b = g.op("DequantizeLinear", bias, b_scale, const(0, torch.int32))
        left, right, top, bottom = p.pad
        kernel = weight.type().sizes()[2:]
        y = g.op(
            "Conv",
            x,
            w,
            b,
            kernel_shape_i=kernel,
            strides_i=list(p.stride),
            pads_i=[top, left, bottom, right],
            dilations_i=list(p.dilation),
            group_i=p.groups,
        )
        y = g.op("QuantizeLinear", y, *grid(p.out))
        if (p.out.lo, p.out.hi) != (0, 255):  # a fused activation narrower than the tensor's range
            y = g.op("Clip", y, const(p.out.lo, torch.uint8), const(p.out.hi, torch.uint8))
        return g.op("DequantizeLinear", y, *grid(p.out))


class QuantizedConv(nn.Module):
    """CONV_2D / DEPTHWISE_CONV_2D with integer numerics, NCHW dequantised float in and out."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, params: _ConvParams, input_nhwc: bool) -> None:
        super().__init__()
        self.params = params
        self.input_nhwc = input_nhwc
        self.register_buffer("weight", torch.from_numpy(weight.astype(np.int8)))  # [O, I / groups, kh, kw]
        self.register_buffer("bias", torch.from_numpy(bias.astype(np.int32)))  # on the grid s_x * s_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_nhwc:
            x = _to_nchw(x)
        return _QuantizedConvFn.apply(x, self.weight, self.bias, self.params)


class _RequantizeFn(torch.autograd.Function):
    """x on any grid -> DequantizeLinear(QuantizeLinear(x, dst), dst): ONNX's pair, and in eager mode the
    same float32 arithmetic (x / scale, round half to even, saturate)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, dst: Grid) -> torch.Tensor:  # type: ignore[override]
        scale = torch.tensor(float(dst.scale), dtype=torch.float32, device=x.device)
        return torch.round(x / scale).clamp(dst.lo - dst.zero_point, dst.hi - dst.zero_point) * scale

    @staticmethod
    def symbolic(g, x, dst):  # type: ignore[no-untyped-def]
        scale = g.op("Constant", value_t=torch.tensor(float(dst.scale), dtype=torch.float32))
        zero_point = g.op("Constant", value_t=torch.tensor(dst.zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_point), scale, zero_point)


class Requantize(nn.Module):
    """A uint8 tensor moved to another grid as TFLite's uint8 CONCATENATION does (ConcatenationWithScaling):
    q' = clamp(std::round(q * scale + bias) + zero_point', 0, 255), scale = s * (1 / s') and bias = -zp * scale in
    float32 (`tflite_rescale`).

    Where QuantizeLinear of the dequantised value gives that same q' for all 256 q (every rescale of the COCO SSD
    MobileNet v1 file), it is that Q -> DQ pair, which ONNX Runtime runs ~15x faster than a 256-entry table
    lookup (Gather). Otherwise the formula itself, as float32 elementwise ops (std::round as
    sign(v) * floor(|v| + 0.5), checked exact for every q)."""

    def __init__(self, src: Grid, dst: Grid) -> None:
        super().__init__()
        self.src, self.dst = src, dst
        q = np.arange(256)
        expected = tflite_rescale(q, src, dst)
        by_quantize = np.clip(np.rint(src.dequantize(q) / dst.scale) + dst.zero_point, dst.lo, dst.hi)
        self.by_quantize = bool(np.array_equal(by_quantize, expected))
        if self.by_quantize:
            return
        scale, bias = _rescale_factors(src, dst)
        # floor(|v| + 0.5) in float32 is std::round unless |v| + 0.5 rounds up to the next integer
        in_float32 = _round_half_away(q.astype(np.float32) * scale + bias)
        if not np.array_equal(np.clip(in_float32 + dst.zero_point, dst.lo, dst.hi), expected):
            raise ExportError(f"CONCATENATION: the rescale from {src} to {dst} cannot be computed exactly in float32")
        for name, value in (("scale", scale), ("bias", bias), ("point_five", 0.5), ("out_scale", dst.scale)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.by_quantize:
            return _RequantizeFn.apply(x, self.dst)
        q = torch.round(x / float(self.src.scale)) + self.src.zero_point  # q, exactly
        v = q * self.scale + self.bias
        steps = torch.sign(v) * torch.floor(v.abs() + self.point_five)  # std::round: half away from zero
        zero = self.dst.zero_point  # (clamp(steps + zp', lo, hi) - zp') * s', the output grid's dequantised value
        return steps.clamp(self.dst.lo - zero, self.dst.hi - zero) * self.out_scale


def _rescale_factors(src: Grid, dst: Grid) -> tuple[np.float32, np.float32]:
    """TFLite's float32 (scale, bias) for moving `src` values to `dst`: s * (1 / s') and -zp * that."""
    scale = np.float32(src.scale * (np.float32(1.0) / dst.scale))
    return scale, np.float32(-np.float32(src.zero_point) * scale)


def tflite_rescale(q: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    """TFLite's ConcatenationWithScaling of uint8 values `q` (reference_ops.h), std::round done exactly (float64)."""
    scale, bias = _rescale_factors(src, dst)
    steps = _round_half_away((q.astype(np.float32) * scale + bias).astype(np.float64))
    return np.clip(steps + dst.zero_point, dst.lo, dst.hi).astype(np.int64)


class QuantizedConcat(nn.Module):
    """CONCATENATION with integer numerics: inputs on another grid than the output's are rescaled first."""

    def __init__(self, rescale: Sequence[Requantize | None], concat: Concat) -> None:
        super().__init__()
        self.rescale = nn.ModuleList(r if r is not None else nn.Identity() for r in rescale)
        self.concat = concat

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.concat(*(r(x) for r, x in zip(self.rescale, xs, strict=True)))


def _integer_conv(ctx: _Context, op: Operator) -> _Built:
    x = op.inputs[0]
    weight = ctx.graph.tensors[op.inputs[1]]
    bias = ctx.graph.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    x_grid, w_grid, out_grid = _grid(ctx, x, op), _grid(ctx, op.inputs[1], op), _output_grid(ctx, op)
    if weight.data is None or (bias is not None and (bias.data is None or bias.dtype != np.int32)):
        raise ExportError(f"{op.op} (operator {op.index}): integer numerics need constant uint8 weights, int32 bias")
    geo = _conv_geometry(ctx, op, weight.data, bias.data if bias is not None else None)
    centred = geo.weight.astype(np.int32) - w_grid.zero_point  # w - zero_point: all the accumulator uses
    bias_q = geo.bias if geo.bias is not None else np.zeros(geo.weight.shape[0], np.int32)
    in_map, out_map = ctx.channel_maps.get(x), ctx.channel_maps.get(op.outputs[0])
    if out_map is not None:  # the tensor carries copies of some channels (symmetric.py): rows written twice
        if op.index in ctx.channel_perms:
            raise ExportError(f"{op.op} (operator {op.index}): channel copies and a channel permutation")
        centred, bias_q = centred[out_map], bias_q[out_map]
    if geo.groups == 1:
        groups = 1
        centred, symmetric = split_over_copies(centred, in_map)
    else:  # depthwise: its input's channel map is its output's, applied above
        groups = geo.groups if in_map is None else in_map.size
        symmetric = bool(np.all(copies_needed(centred) == 1))
    # Zero point 0 where v fits int8 (ONNX Runtime's symmetric kernels); otherwise w - 128 and zero point - 128,
    # the same differences w - zero_point as int8.
    zero_point = 0 if symmetric else w_grid.zero_point - 128
    params = _ConvParams(x_grid, Grid(w_grid.scale, zero_point, -128, 127), out_grid, geo.stride, geo.dilation,
                         groups, geo.pad)
    weight_s8 = (centred + zero_point).astype(np.int8)
    module = QuantizedConv(weight_s8, bias_q, params, input_nhwc=ctx.layout.get(x) == "nhwc")
    return _Built(module, (x,), "nchw", _ANY)


def _integer_reshape(ctx: _Context, op: Operator) -> _Built:
    if _grid(ctx, op.inputs[0], op) != _grid(ctx, op.outputs[0], op):
        raise ExportError(f"{op.op} (operator {op.index}) changes the quantisation, which TFLite does not do")
    built = _reshape(ctx, op)
    assert isinstance(built.module, Reshape)
    built.module.out = None  # integer values never leave their grid's range: no clamp
    return built


def _integer_concat(ctx: _Context, op: Operator) -> _Built:
    if ctx.fused(op) != _UNBOUNDED:
        raise ExportError(f"CONCATENATION (operator {op.index}) with a fused activation has no uint8 kernel")
    built = _concat(ctx, op)
    dst = _grid(ctx, op.outputs[0], op)
    grids = [_grid(ctx, t, op) for t in op.inputs]
    rescale = [Requantize(g, dst) if g != dst else None for g in grids]
    assert isinstance(built.module, Concat)
    built.module.out = None  # the rescaled inputs are on the output's grid already
    built.module = QuantizedConcat(rescale, built.module)
    return built


INTEGER_OP_BUILDERS: dict[str, Callable[[_Context, Operator], _Built]] = {
    "CONV_2D": _integer_conv,
    "DEPTHWISE_CONV_2D": _integer_conv,
    "RESHAPE": _integer_reshape,
    "SQUEEZE": _integer_reshape,
    "CONCATENATION": _integer_concat,
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
    "integer" reproduces LiteRT's uint8 kernels exactly (see the module docstring).

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
        ctx.known[image] = Known(*q) if q is not None else _ANY

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

    if numerics == "integer":
        ops = [op for op in graph.operators if op.index in needed]
        ctx.channel_maps = channel_maps(graph, ops, set(outputs))
    steps: list[_Built] = []
    wiring: list[int] = []
    for op in graph.operators:  # TFLite stores operators in execution order
        if op.index not in needed:
            continue
        builders = INTEGER_OP_BUILDERS if numerics == "integer" else OP_BUILDERS
        builder = builders.get(op.op)
        if builder is None:
            hint = " with integer numerics (import with numerics='float')" if op.op in OP_BUILDERS else ""
            raise ExportError(
                f"unsupported TFLite operator {op.op}{hint} (operator {op.index}, output "
                f"{graph.tensors[op.outputs[0]].name!r}); supported: {', '.join(sorted(builders))}"
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
