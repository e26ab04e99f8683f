"""TensorRT engine: a `.engine` built by `python -m model_export.tensorrt`, with its `.engine.json` beside it.

load    read the JSON -> refuse another TensorRT version / GPU model -> deserialise -> one execution context,
        device and page-locked host buffers for `max_batch_size` images, each tensor bound by name once
infer   copy the batch in -> set the input shape -> execute_async_v3 on our stream -> copy the four outputs back

TensorRT and cuda-python are imported in `load`, never at import time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from model_export.contract.errors import ContractError
from model_export.contract.metadata import INPUT_NAME, ModelMetadata
from model_export.contract.engine import (
    OUTPUTS,
    check_compatible,
    read_engine_description,
)
from server.engines.cuda import TENSORRT_HINT, Cuda, host_array, missing_library
from server.engines.base import EngineOptions, EngineOutput

TENSOR_DTYPES = {INPUT_NAME: np.dtype(np.uint8)} | {name: np.dtype(dtype) for name, (dtype, _) in OUTPUTS.items()}


class TensorRTEngineError(ContractError):
    """The engine file cannot be loaded here, or a batch could not run."""


MIN_TENSORRT_MAJOR = 10


def import_tensorrt() -> ModuleType:
    """The tensorrt module, or an error naming what is missing (the wheel, or a shared library it loads)."""
    try:
        import tensorrt
    except ImportError as exc:
        missing = missing_library(exc)
        if missing is None:
            raise TensorRTEngineError(f"TensorRT is not installed: {TENSORRT_HINT}") from None
        raise TensorRTEngineError(f"TensorRT is installed but cannot load {missing}: {TENSORRT_HINT}") from None
    if int(tensorrt.__version__.split(".", 1)[0]) < MIN_TENSORRT_MAJOR:
        raise TensorRTEngineError(f"TensorRT {tensorrt.__version__} is too old: {MIN_TENSORRT_MAJOR}.0 or later is needed")
    return tensorrt


@dataclass
class _Binding:
    """One I/O tensor: a device buffer and a page-locked host buffer, both sized for the max batch."""

    name: str
    row_shape: tuple[int, ...]  # shape of one image's slice: [H, W, 3], [], [K, 4], [K]
    dtype: np.dtype
    device_ptr: int
    host_ptr: int
    host: np.ndarray  # [max_batch, *row_shape] view over host_ptr

    def nbytes(self, batch: int) -> int:
        return batch * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def cuda_device_index(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N; anything else is refused (a TensorRT engine runs only on a GPU)."""
    if device == "cuda":
        return 0
    prefix, _, index = device.partition(":")
    if prefix == "cuda" and index.isdigit():
        return int(index)
    raise TensorRTEngineError(f"the TensorRT engine runs on a GPU: device must be 'cuda' or 'cuda:N', not {device!r}")


def check_batch(images: np.ndarray, input_size: tuple[int, int], max_batch: int) -> None:
    height, width = input_size
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1:] != (height, width, 3):
        raise ValueError(f"expected images [B, {height}, {width}, 3], got {list(images.shape)}")
    if not 1 <= images.shape[0] <= max_batch:
        raise ValueError(f"batch of {images.shape[0]} images: this engine takes 1 to {max_batch}")


class TensorRTEngine:
    """The Engine protocol over one TensorRT execution context (one batch at a time)."""

    def __init__(self, cuda: Cuda | None = None, tensorrt: ModuleType | None = None) -> None:
        self._cuda_given, self._trt_given = cuda, tensorrt  # injected in tests; imported in load otherwise
        self._lock = threading.Lock()
        self._cuda: Cuda | None = None
        self._logger: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: int | None = None
        self._bindings: dict[str, _Binding] = {}
        self._device = 0
        self._max_batch = 0
        self._input_size = (0, 0)

    def load(self, path: Path, options: EngineOptions) -> ModelMetadata:
        self.close()  # a second load replaces the first
        if not path.is_file():
            raise TensorRTEngineError(f"model file not found: {path}")
        description = read_engine_description(path)
        metadata, build = description.metadata, description.build
        device = cuda_device_index(options.device)
        if options.fp16 and build.precision != "fp16":
            raise TensorRTEngineError(
                f"fp16 was asked for but {path} was built {build.precision} (TensorRT fixes precision at build "
                "time): turn fp16 off, or rebuild the engine with --fp16"
            )
        if options.max_batch_size > build.profile.max:
            raise TensorRTEngineError(
                f"max batch size {options.max_batch_size} exceeds what {path} was built for "
                f"({build.profile.max}): lower it, or rebuild the engine with --max-batch {options.max_batch_size}"
            )
        trt = self._trt_given if self._trt_given is not None else import_tensorrt()
        cuda = self._cuda_given if self._cuda_given is not None else Cuda()
        check_compatible(build, tensorrt_version=trt.__version__, gpu=cuda.gpu(device), engine_path=path)

        self._cuda, self._device = cuda, device
        self._max_batch, self._input_size = options.max_batch_size, tuple(metadata.input_size)
        try:
            cuda.set_device(device)
            self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise TensorRTEngineError(f"TensorRT could not deserialise {path} (its messages are above)")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise TensorRTEngineError(f"TensorRT could not create an execution context for {path}")
            self._bind(trt, cuda, metadata)
            self._stream = cuda.create_stream()
        except BaseException:
            try:
                self.close()
            except ContractError:
                pass  # the load failure is the error to report
            raise
        return metadata

    def _bind(self, trt: ModuleType, cuda: Cuda, metadata: ModelMetadata) -> None:
        """Size every I/O tensor for the max batch, check it against the contract, and bind it by name."""
        engine, context = self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(TENSOR_DTYPES):
            raise TensorRTEngineError(f"engine tensors {names} are not the model contract's {list(TENSOR_DTYPES)}")
        if engine.get_tensor_mode(INPUT_NAME) != trt.TensorIOMode.INPUT:
            raise TensorRTEngineError(f"engine tensor {INPUT_NAME!r} is not an input")
        height, width = self._input_size
        if not context.set_input_shape(INPUT_NAME, (self._max_batch, height, width, 3)):
            raise TensorRTEngineError(f"the engine refuses input shape {[self._max_batch, height, width, 3]}")
        k = metadata.max_detections
        expected_rows = {INPUT_NAME: (height, width, 3), "num_detections": (), "boxes": (k, 4), "scores": (k,),
                         "classes": (k,)}
        for name in names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            if dtype != TENSOR_DTYPES[name]:
                raise TensorRTEngineError(f"engine tensor {name!r} is {dtype}, the contract says {TENSOR_DTYPES[name]}")
            if shape != (self._max_batch, *expected_rows[name]):
                raise TensorRTEngineError(
                    f"engine tensor {name!r} has shape {list(shape)} at batch {self._max_batch}, "
                    f"expected {[self._max_batch, *expected_rows[name]]}"
                )
            binding = _Binding(name, shape[1:], dtype, device_ptr=0, host_ptr=0, host=np.empty(0))
            self._bindings[name] = binding  # registered before allocating, so close() frees what was allocated
            size = binding.nbytes(self._max_batch)
            binding.device_ptr = cuda.malloc(size)
            binding.host_ptr = cuda.malloc_host(size)
            binding.host = host_array(binding.host_ptr, shape, dtype)
            if not context.set_tensor_address(name, binding.device_ptr):
                raise TensorRTEngineError(f"TensorRT refused the address of tensor {name!r}")

    def infer(self, images: np.ndarray) -> EngineOutput:
        with self._lock:
            if self._context is None or self._cuda is None or self._stream is None:
                raise TensorRTEngineError("the TensorRT engine is not loaded")
            check_batch(images, self._input_size, self._max_batch)
            cuda, stream, batch = self._cuda, self._stream, images.shape[0]
            cuda.set_device(self._device)  # the CUDA device is per host thread; infer may run on another one
            source = self._bindings[INPUT_NAME]
            np.copyto(source.host[:batch], images)
            if not self._context.set_input_shape(INPUT_NAME, images.shape):
                raise TensorRTEngineError(f"the engine refuses input shape {list(images.shape)}")
            cuda.copy_to_device(source.device_ptr, source.host_ptr, source.nbytes(batch), stream)
            if not self._context.execute_async_v3(stream):
                raise TensorRTEngineError("TensorRT failed to enqueue the batch (execute_async_v3 returned False)")
            for name in OUTPUTS:
                out = self._bindings[name]
                shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
                if shape != (batch, *out.row_shape):
                    raise TensorRTEngineError(f"output {name!r} has shape {list(shape)} for a batch of {batch}")
                cuda.copy_to_host(out.host_ptr, out.device_ptr, out.nbytes(batch), stream)
            cuda.synchronize(stream)
            # Copies: the page-locked buffers are reused by the next batch.
            result = {name: self._bindings[name].host[:batch].copy() for name in OUTPUTS}
        return EngineOutput(**result)

    def close(self) -> None:
        """Release the context, the engine and every buffer; safe to call twice and after a failed load.

        Every release is attempted; the first CUDA error, if any, is raised at the end."""
        with self._lock:
            cuda, bindings, stream = self._cuda, self._bindings, self._stream
            self._bindings, self._stream = {}, None
            # context before engine before runtime (before its logger)
            self._context = self._engine = self._runtime = self._logger = None
            if cuda is None:
                return
            releases: list[tuple[Any, int]] = []
            if stream is not None:
                releases += [(cuda.synchronize, stream), (cuda.destroy_stream, stream)]
            for binding in bindings.values():
                binding.host = np.empty(0)  # no view may outlive its page-locked memory
                releases += [(cuda.free, binding.device_ptr)] if binding.device_ptr else []
                releases += [(cuda.free_host, binding.host_ptr)] if binding.host_ptr else []
            first_error: ContractError | None = None
            for release, handle in releases:
                try:
                    release(handle)
                except ContractError as exc:
                    first_error = first_error or exc
            if first_error is not None:
                raise first_error
