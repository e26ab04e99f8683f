"""Which GPU this is, through NVIDIA's cuda-python: what the TensorRT builder records and the server's engines
check an engine against. The engines add their buffers and streams (`server.engines.cuda`).

cuda-python is imported on first use, never at import time. Every call checks its status and raises
`CudaError` (a `ContractError`: one line for the user) naming the call and CUDA's own error text.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from model_export.contract.engine import GpuFacts
from model_export.contract.errors import ContractError

CUDA_PYTHON_HINT = "pip install cuda-python (its CUDA major version must not exceed what the NVIDIA driver supports)"


class CudaError(ContractError):
    """A CUDA runtime call failed, or no usable GPU is visible."""


def import_cudart() -> ModuleType:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python >= 12.6) or the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise CudaError(f"cuda-python is not installed: {CUDA_PYTHON_HINT}") from None
    return runtime


class Cuda:
    """A thin, checked wrapper over the CUDA runtime: the GPU facts a build records and an engine checks."""

    def __init__(self, runtime: ModuleType | None = None) -> None:
        self.rt = runtime if runtime is not None else import_cudart()

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CudaError(f"{what} failed: {self.describe(err)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def describe(self, err: Any) -> str:
        _, name = self.rt.cudaGetErrorName(err)
        _, text = self.rt.cudaGetErrorString(err)
        return f"{_text(name)} ({_text(text)})"

    # -- devices -------------------------------------------------------------------------------------------
    def gpu(self, device: int = 0) -> GpuFacts:
        """Name and compute capability of `device`; a clear error when no GPU (or no usable driver) is visible."""
        err, count = self.rt.cudaGetDeviceCount()
        codes = self.rt.cudaError_t
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if err == codes.cudaErrorNoDevice or (err == codes.cudaSuccess and count == 0):
            where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise CudaError(f"no NVIDIA GPU is visible{where}: TensorRT needs one")
        if err == codes.cudaErrorInsufficientDriver:
            raise CudaError(
                "no usable NVIDIA driver: either this host has no NVIDIA GPU and driver, or the driver is older "
                f"than the CUDA runtime cuda-python was built for; CUDA says {self.describe(err)}"
            )
        if err != codes.cudaSuccess:
            raise CudaError(f"cannot list the GPUs: {self.describe(err)}")
        if not 0 <= device < count:
            raise CudaError(f"there is no GPU cuda:{device}: {count} visible")
        props = self._check(self.rt.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
        return GpuFacts(name=_text(props.name), compute_capability=f"{props.major}.{props.minor}")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return str(value)
