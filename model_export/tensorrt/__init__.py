"""Exported ONNX -> TensorRT engine (`python -m model_export.tensorrt --onnx m.onnx --out m.engine`).

    device     the CUDA runtime calls the builder needs (cuda-python, imported lazily)
    preflight  graph checks TensorRT's parser would fail on (uint8 intermediates, TopK K > 3840)
    build      ONNX checks, TensorRT OnnxParser -> optimisation profile -> precision -> serialised engine
(The JSON an engine carries beside it is `model_export.contract.engine`: the server reads it too.)
    __main__ the command line

Importing this package imports neither TensorRT nor CUDA.
"""

from model_export.contract.engine import (
    BatchProfile,
    BuildFacts,
    EngineDescription,
    GpuFacts,
    batch_profile,
    check_compatible,
    read_engine_description,
)
from model_export.tensorrt.build import BuildOptions, build_engine, inspect_onnx

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
