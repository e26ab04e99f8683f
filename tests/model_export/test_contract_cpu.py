"""model_export.contract.cpu: which CPUs saturate ONNX Runtime's U8S8 convs, and the sessions that stay exact there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from model_export.contract.cpu import (
    X64_QUANT_PRECISION,
    cpu_flags,
    exact_integer_options,
    exact_session,
    saturates,
    u8s8_saturates,
)


def test_x86_without_vnni_saturates_and_everything_else_does_not() -> None:
    avx2 = frozenset({"sse4_1", "avx2", "fma"})
    assert saturates("x86_64", avx2)
    assert saturates("x86_64", avx2 | {"avx512f", "avx512bw"})  # AVX-512 without VNNI: VPMADDUBSW too
    assert not saturates("x86_64", avx2 | {"avx512_vnni"})
    assert not saturates("AMD64", avx2 | {"avx_vnni"})  # Windows' name for the machine
    assert saturates("x86_64", None)  # flags unknown: exact first
    assert not saturates("aarch64", None) and not saturates("arm64", frozenset())


def test_cpu_flags_come_from_the_first_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") is None


def test_the_precision_option_is_set_exactly_where_u8s8_saturates() -> None:
    options = exact_integer_options(ort.SessionOptions())
    try:
        entry: str | None = options.get_session_config_entry(X64_QUANT_PRECISION)
    except RuntimeError:  # ORT raises for a key never set: what a CPU with VNNI gets
        entry = None
    assert (entry == "1") == u8s8_saturates()


def test_an_int8_conv_whose_pairs_overflow_16_bits_is_exact(tmp_path: Path) -> None:
    """255 x 127 + 255 x 127 > 32767: VPMADDUBSW (U8S8 on x86 without VNNI) would clamp each such pair. Measured
    on an AVX2 EPYC: plain ORT is off by up to 112 here, exact_session by 0."""
    channels, kernels, size = 64, 8, 4
    x = np.full((1, channels, size, size), 255, np.uint8)
    w = np.random.default_rng(0).choice(np.array([127, 120, 100], np.int8), (kernels, channels, 1, 1))
    accumulator = np.einsum("nchw,kc->nkhw", x.astype(np.int64), w[:, :, 0, 0].astype(np.int64))
    y_scale = float(accumulator.max()) / 250
    constants = {
        "x_scale": np.array(1.0, np.float32), "x_zero": np.array(0, np.uint8), "w": w,
        "w_scale": np.array(1.0, np.float32), "w_zero": np.array(0, np.int8),
        "y_scale": np.array(y_scale, np.float32), "y_zero": np.array(0, np.uint8),
    }  # fmt: skip
    node = helper.make_node("QLinearConv", ["x", *constants], ["y"])
    graph = helper.make_graph(
        [node],
        "int8_conv",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, kernels, size, size])],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "int8_conv.onnx"
    onnx.save(model, str(path))
    expected = np.clip(np.round(accumulator / y_scale), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(exact_session(path).run(None, {"x": x})[0], expected)
