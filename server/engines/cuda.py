"""The CUDA runtime calls the server's GPU engines need (devices, buffers, streams), through NVIDIA's cuda-python.

cuda-python is imported on first use, never at import time. Every call checks its status and raises
`CudaError` (a `ContractError`: one line for the user) naming the call and CUDA's own error text.
"""

from __future__ import annotations

import ctypes
import re

import numpy as np

from model_export.contract.cuda import Cuda as DeviceQuery

TENSORRT_HINT = (
    "pip install 'ssd-serve[gpu]' on a host with an NVIDIA GPU and a driver for CUDA 13 (>= 580), or run the "
    "NGC image (README, GPU section, lists the supported driver and CUDA pairs)"
)
_MISSING_LIBRARY = re.compile(r"(lib[\w.+-]+\.so[\w.]*)")


def missing_library(exc: BaseException) -> str | None:
    """The shared library a failed import names ("libcudart.so.13: cannot open shared object file"), if any."""
    match = _MISSING_LIBRARY.search(str(exc))
    return match.group(1) if match else None


class Cuda(DeviceQuery):
    """The contract's checked CUDA wrapper (which GPU), plus the device buffers and streams the engines use
    (device pointers and streams are plain ints)."""

    def set_device(self, device: int) -> None:
        self._check(self.rt.cudaSetDevice(device), f"cudaSetDevice({device})")

    # -- memory ----------------------------------------------------------------------------------------------
    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def malloc_host(self, nbytes: int) -> int:
        """Page-locked host memory: copies from and to it run asynchronously at full bandwidth."""
        return int(self._check(self.rt.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))

    def free_host(self, ptr: int) -> None:
        self._check(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync (host to device)")

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync (device to host)")

    # -- streams ---------------------------------------------------------------------------------------------
    def create_stream(self) -> int:
        return int(self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate"))

    def synchronize(self, stream: int) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: int) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")


def host_array(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A numpy view over `ptr` (page-locked memory from `Cuda.malloc_host`); valid until that memory is freed."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def visible_gpu_count() -> int:
    """NVIDIA GPUs the driver shows this process (CUDA driver API through ctypes: no CUDA runtime, no cuda-python).

    0 when there is no driver (libcuda.so.1 absent), no device, or CUDA_VISIBLE_DEVICES hides them all.
    onnxruntime-gpu lists CUDAExecutionProvider in get_available_providers() whether or not a GPU exists, so this,
    not that list, says whether a GPU is there."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True
