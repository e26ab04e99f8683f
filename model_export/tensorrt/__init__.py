"""Exported ONNX -> TensorRT engine (`python -m model_export.tensorrt --onnx m.onnx --out m.engine`).

    facts   the JSON an engine carries beside it (model description + build facts), compatibility check
    device  the CUDA runtime calls the builder and the server engine share (cuda-python, imported lazily)
    build   ONNX checks, TensorRT OnnxParser -> optimisation profile -> precision -> serialised engine
    __main__ the command line

Importing this package imports neither TensorRT nor CUDA.
"""

from model_export.tensorrt.build import BuildOptions, build_engine, inspect_onnx
from model_export.tensorrt.facts import (
    BatchProfile,
    BuildFacts,
    EngineDescription,
    GpuFacts,
    batch_profile,
    check_compatible,
    read_engine_description,
)

__all__ = [
    "BatchProfile",
    "BuildFacts",
    "BuildOptions",
    "EngineDescription",
    "GpuFacts",
    "batch_profile",
    "build_engine",
    "check_compatible",
    "inspect_onnx",
    "read_engine_description",
]
