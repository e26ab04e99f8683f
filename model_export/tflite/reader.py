"""A .tflite file as plain Python data: tensors (with constants and quantisation), operators, graph edges.

Reads the flatbuffer with the `tflite` package (generated schema bindings, no TensorFlow). Only the first
subgraph is read: TF Object Detection API SSD exports have one. Builtin options become a snake_case dict
(`{"stride_h": 2, "padding": 0, ...}`); custom options in FlexBuffer format are decoded to a dict too.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_export.errors import ExportError

# TFLite TensorType -> numpy dtype (the types an SSD file uses; others are reported, not guessed).
_DTYPES: dict[int, np.dtype] = {
    0: np.dtype(np.float32),
    1: np.dtype(np.float16),
    2: np.dtype(np.int32),
    3: np.dtype(np.uint8),
    4: np.dtype(np.int64),
    6: np.dtype(np.bool_),
    7: np.dtype(np.int16),
    9: np.dtype(np.int8),
    10: np.dtype(np.float64),
}


@dataclass(frozen=True)
class Quantization:
    """Affine quantisation: real = scale * (q - zero_point), per tensor or along `axis`."""

    scale: np.ndarray  # [1] or [n] float64
    zero_point: np.ndarray  # same length, int64
    axis: int

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        q = q.astype(np.float64)
        if self.scale.size == 1:
            return (self.scale[0] * (q - self.zero_point[0])).astype(np.float32)
        shape = [1] * q.ndim
        shape[self.axis] = -1
        scale = self.scale.reshape(shape)
        zero = self.zero_point.reshape(shape)
        return (scale * (q - zero)).astype(np.float32)


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quantization: Quantization | None
    data: np.ndarray | None  # the stored constant (raw, quantised if the tensor is), None for activations

    @property
    def is_quantized(self) -> bool:
        return self.quantization is not None and self.dtype.kind in "iu"

    def value(self) -> np.ndarray:
        """The constant as float32 (dequantised where quantised) or as stored for integer shape tensors."""
        if self.data is None:
            raise ExportError(f"tensor {self.name!r} is not a constant")
        if self.is_quantized and self.quantization is not None:
            return self.quantization.dequantize(self.data)
        if self.dtype.kind == "f":
            return self.data.astype(np.float32)
        return self.data

    def real_range(self) -> tuple[float, float] | None:
        """The real values a per-tensor quantised tensor can hold, e.g. uint8 s=6/255 z=0 -> (0, 6)."""
        if not self.is_quantized or self.quantization is None or self.quantization.scale.size != 1:
            return None
        info = np.iinfo(self.dtype)
        scale, zero = float(self.quantization.scale[0]), int(self.quantization.zero_point[0])
        return scale * (info.min - zero), scale * (info.max - zero)


@dataclass(frozen=True)
class Operator:
    index: int
    op: str  # builtin name ("CONV_2D") or, for custom ops, the custom code ("TFLite_Detection_PostProcess")
    inputs: tuple[int, ...]  # tensor indices; -1 for an omitted optional input
    outputs: tuple[int, ...]
    options: dict[str, Any]


@dataclass(frozen=True)
class Graph:
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    description: str
    _producers: dict[int, Operator] = field(default_factory=dict, repr=False)
    _consumers: dict[int, list[Operator]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for op in self.operators:
            for t in op.outputs:
                self._producers[t] = op
            for t in op.inputs:
                if t >= 0:
                    self._consumers.setdefault(t, []).append(op)

    def producer(self, tensor: int) -> Operator | None:
        return self._producers.get(tensor)

    def consumers(self, tensor: int) -> list[Operator]:
        return list(self._consumers.get(tensor, ()))

    def find(self, op_name: str) -> list[Operator]:
        return [op for op in self.operators if op.op == op_name]


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _enum_names(enum_cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def _table_to_dict(table: Any) -> dict[str, Any]:
    """Every scalar / vector field of a generated flatbuffer table object, keyed in snake_case."""
    out: dict[str, Any] = {}
    cls = type(table)
    for attr in dir(cls):
        if attr.startswith("_") or attr in ("Init",) or attr.startswith("GetRootAs"):
            continue
        if attr.endswith(("AsNumpy", "Length", "IsNone", "BufferHasIdentifier")):
            continue
        getter = getattr(table, attr)
        if hasattr(cls, attr + "AsNumpy"):
            value = getattr(table, attr + "AsNumpy")()
            out[_snake(attr)] = np.asarray(value) if not isinstance(value, int) else np.zeros(0, np.int64)
        else:
            try:
                out[_snake(attr)] = getter()
            except TypeError:  # a field that needs an index and has no numpy accessor
                continue
    return out


def _builtin_options(op: Any, option_names: dict[int, str]) -> dict[str, Any]:
    import tflite

    kind = op.BuiltinOptionsType()
    if kind == 0:
        return {}
    name = option_names.get(kind)
    cls = getattr(tflite, name, None) if name else None
    table = op.BuiltinOptions()
    if cls is None or table is None:
        return {}
    options = cls()
    options.Init(table.Bytes, table.Pos)
    return _table_to_dict(options)


def _custom_options(op: Any) -> dict[str, Any]:
    if op.CustomOptionsLength() == 0:
        return {}
    from flatbuffers import flexbuffers

    raw = op.CustomOptionsAsNumpy().tobytes()
    try:
        decoded = flexbuffers.Loads(raw)
    except Exception as exc:  # the format is not FlexBuffers: keep the bytes, let the op decide
        return {"_raw": raw, "_error": str(exc)}
    return decoded if isinstance(decoded, dict) else {"_value": decoded}


def _quantization(t: Any) -> Quantization | None:
    q = t.Quantization()
    if q is None or q.ScaleLength() == 0:
        return None
    scale = q.ScaleAsNumpy().astype(np.float64)
    zero = q.ZeroPointAsNumpy() if q.ZeroPointLength() else np.zeros(scale.shape, np.int64)
    zero = np.asarray(zero, dtype=np.int64)
    if zero.size == 1 and scale.size > 1:
        zero = np.full(scale.shape, int(zero[0]), np.int64)
    return Quantization(scale=scale, zero_point=zero, axis=int(q.QuantizedDimension()))


def read_tflite(path: Path) -> Graph:
    """Parse `path` into a `Graph`; any structural problem is an ExportError naming the file."""
    import tflite

    try:
        buf = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ExportError(f"{path} is not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() < 1:
            raise ExportError(f"{path} has no subgraph")
        graph = model.Subgraphs(0)
        builtin_names = _enum_names(tflite.BuiltinOperator)
        option_names = _enum_names(tflite.BuiltinOptions)

        tensors = []
        for i in range(graph.TensorsLength()):
            t = graph.Tensors(i)
            dtype = _DTYPES.get(t.Type())
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            data = None
            b = model.Buffers(t.Buffer()) if t.Buffer() < model.BuffersLength() else None
            if b is not None:
                if b.DataLength() > 0:
                    raw = b.DataAsNumpy().tobytes()
                elif b.Offset() > 1:  # large models keep buffers after the flatbuffer
                    raw = buf[b.Offset() : b.Offset() + b.Size()]
                else:
                    raw = b""
                if raw:
                    if dtype is None:
                        raise ExportError(f"constant tensor {t.Name().decode()!r} has an unsupported type {t.Type()}")
                    data = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            tensors.append(
                Tensor(
                    index=i,
                    name=t.Name().decode(errors="replace"),
                    shape=shape,
                    dtype=dtype if dtype is not None else np.dtype(np.void),
                    quantization=_quantization(t),
                    data=data,
                )
            )

        operators = []
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            name = builtin_names.get(builtin, f"BUILTIN_{builtin}")
            if name == "CUSTOM":
                name = (code.CustomCode() or b"CUSTOM").decode(errors="replace")
                options = _custom_options(op)
            else:
                options = _builtin_options(op, option_names)
            operators.append(
                Operator(
                    index=i,
                    op=name,
                    inputs=tuple(int(x) for x in op.InputsAsNumpy()) if op.InputsLength() else (),
                    outputs=tuple(int(x) for x in op.OutputsAsNumpy()) if op.OutputsLength() else (),
                    options=options,
                )
            )
        description = (model.Description() or b"").decode(errors="replace")
        return Graph(
            tensors=tuple(tensors),
            operators=tuple(operators),
            inputs=tuple(int(x) for x in graph.InputsAsNumpy()),
            outputs=tuple(int(x) for x in graph.OutputsAsNumpy()),
            description=description,
        )
    except ExportError:
        raise
    except Exception as exc:  # a truncated or corrupt flatbuffer surfaces as IndexError/struct.error/...
        raise ExportError(f"{path} is not a readable TFLite model: {type(exc).__name__}: {exc}") from exc


def embedded_files(path: Path) -> dict[str, bytes]:
    """Files packed into a TFLite model with metadata (a zip appended to the flatbuffer), e.g. labelmap.txt."""
    try:
        if not zipfile.is_zipfile(path):
            return {}
        with zipfile.ZipFile(path) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile):
        return {}
