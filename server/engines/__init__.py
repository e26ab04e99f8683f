"""The engine registry: name -> engine class, imported on first use (torch and TensorRT are heavy or absent).

engine = ENGINES["onnxruntime"]()      # an Engine (server.engines.base)
metadata = engine.load(path, EngineOptions(...))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from server.engines.base import Engine


def _lazy(module: str, name: str) -> Callable[[], Engine]:
    def make() -> Engine:
        engine_class = getattr(importlib.import_module(module), name)
        return engine_class()

    make.__qualname__ = make.__name__ = name
    return make


ENGINES: dict[str, Callable[[], Engine]] = {
    "onnxruntime": _lazy("server.engines.onnxruntime", "OnnxRuntimeEngine"),
    "torch": _lazy("server.engines.torch", "TorchEngine"),
    "tensorrt": _lazy("server.engines.tensorrt", "TensorRTEngine"),
}

# File suffixes each engine reads; used to catch a mismatch before loading.
MODEL_SUFFIXES: dict[str, tuple[str, ...]] = {
    "onnxruntime": (".onnx",),
    "torch": (".onnx",),
    "tensorrt": (".engine", ".plan"),
}


def create_engine(name: str) -> Engine:
    try:
        make = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}") from None
    return make()
