"""Which CPU this is, for the integer exports' arithmetic under ONNX Runtime: the session option that keeps it exact.

An integer export's convs multiply uint8 activations by int8 weights. ONNX Runtime's x86 U8S8 kernels without
VNNI (SSE4.1, AVX2, AVX-512 without VNNI) add each pair of products in 16 bits with saturation (VPMADDUBSW), so
a pair past 32767 is clamped and the detections differ from LiteRT's: on an AVX2 EPYC, 125 of LiteRT's
detections on the 52 test photos were missing. VNNI's VPDPBUSD sums into 32 bits: exact.

The session config entry `session.x64quantprecision` = "1" (`kOrtSessionOptionsAvx2PrecisionMode` in ORT's
`onnxruntime_session_options_config_keys.h`) has ORT rewrite each int8 weight as uint8 (w + 128, its zero point
moved with it: the same products) and run its exact U8U8 kernels. ORT applies it wherever its U8U8 and U8S8
kernels differ (`MlasPlatformU8S8Overflow`), VNNI CPUs included, where it would give up the symmetric kernels
that the zero-point-0 weights are for (model_export.tflite.symmetric). So it is asked for only where U8S8
saturates. Float exports have no int8 weights: the option changes nothing for them.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

X64_QUANT_PRECISION = "session.x64quantprecision"
X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # /proc/cpuinfo's names for AVX-512 VNNI and AVX-VNNI


def saturates(machine: str, cpu_flags: frozenset[str] | None) -> bool:
    """Whether ONNX Runtime's U8S8 kernels saturate on a CPU: x86 without VNNI. `cpu_flags` None: not known, which
    counts as saturating on x86 (exact results first)."""
    if machine.lower() not in X86:
        return False
    return cpu_flags is None or not VNNI_FLAGS & cpu_flags


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The first processor's flags in /proc/cpuinfo (None where there is no such file: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return frozenset(value.split())
    return None


@functools.cache
def u8s8_saturates() -> bool:
    """`saturates` for this machine."""
    return saturates(platform.machine(), cpu_flags())


def exact_integer_options(session_options: Any) -> Any:
    """`session_options` (an onnxruntime.SessionOptions) with what keeps integer exports exact on this CPU."""
    if u8s8_saturates():
        session_options.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return session_options


def exact_session(path: Path | str, session_options: Any = None) -> Any:
    """An onnxruntime CPU InferenceSession of `path` under `exact_integer_options` (default options otherwise)."""
    import onnxruntime as ort

    options = exact_integer_options(session_options if session_options is not None else ort.SessionOptions())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
