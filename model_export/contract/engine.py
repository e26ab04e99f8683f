"""What a TensorRT engine says about itself (pure Python: the server reads it before touching TensorRT).

An engine `m.engine` is only usable with the JSON written beside it, `m.engine.json`: the model's own
description (the same `ModelMetadata` JSON the ONNX file carries) plus one `"tensorrt"` block with the facts
of the build. A serialised engine runs only under the TensorRT version and on the GPU model it was built
with, so those facts are checked before the engine is deserialised.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from model_export.contract.errors import ContractError
from model_export.contract.metadata import OUTPUT_NAMES, ModelMetadata, sidecar_path

Precision = Literal["fp32", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16")

# The model contract's output dtypes and ranks, by name.
OUTPUTS: dict[str, tuple[str, int]] = dict(
    zip(OUTPUT_NAMES, [("int32", 1), ("float32", 3), ("float32", 2), ("int32", 2)], strict=True)
)  # [B], [B, K, 4], [B, K], [B, K]
TENSORRT_KEY = "tensorrt"
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class BatchProfile:
    """The one optimisation profile of input `images`: batch sizes min <= opt <= max."""

    min: int
    opt: int
    max: int


def batch_profile(max_batch: int = DEFAULT_MAX_BATCH, opt_batch: int | None = None) -> BatchProfile:
    """min 1; opt as given, else half of max (the server's default max batch is half the engine's)."""
    if max_batch < 1:
        raise ContractError(f"--max-batch must be >= 1, got {max_batch}")
    opt = max(1, max_batch // 2) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ContractError(f"--opt-batch must be within [1, {max_batch}] (the max batch), got {opt}")
    return BatchProfile(min=1, opt=opt, max=max_batch)


@dataclass(frozen=True)
class GpuFacts:
    name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class BuildFacts:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: Precision
    profile: BatchProfile
    onnx_sha256: str


@dataclass(frozen=True)
class EngineDescription:
    metadata: ModelMetadata
    build: BuildFacts

    def to_json(self) -> str:
        data = asdict(self.metadata)
        data[TENSORRT_KEY] = asdict(self.build)
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EngineDescription:
        data = json.loads(text)
        if not isinstance(data, dict) or TENSORRT_KEY not in data:
            raise ValueError(f"no {TENSORRT_KEY!r} block: this is not the description of a TensorRT engine")
        block = dict(data.pop(TENSORRT_KEY))
        block["profile"] = BatchProfile(**block["profile"])
        if block["precision"] not in PRECISIONS:
            raise ValueError(f"unknown precision {block['precision']!r}")
        return cls(metadata=ModelMetadata.from_json(json.dumps(data)), build=BuildFacts(**block))


def read_engine_description(engine_path: Path) -> EngineDescription:
    path = sidecar_path(engine_path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ContractError(
            f"{path} is missing: a TensorRT engine is usable only with the JSON that "
            f"`python -m model_export.tensorrt` writes beside it; rebuild the engine"
        ) from None
    except OSError as exc:
        raise ContractError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return EngineDescription.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise ContractError(f"{path} is not a valid engine description: {exc}") from exc


def check_compatible(build: BuildFacts, *, tensorrt_version: str, gpu: GpuFacts, engine_path: Path) -> None:
    """Refuse an engine built under another TensorRT version or for another GPU model (one message, all reasons)."""
    reasons = []
    if build.tensorrt_version != tensorrt_version:
        reasons.append(f"TensorRT {build.tensorrt_version} (this host has {tensorrt_version})")
    if build.gpu_name != gpu.name:
        reasons.append(f"the GPU {build.gpu_name} (this host has {gpu.name})")
    if build.compute_capability != gpu.compute_capability:
        reasons.append(
            f"compute capability {build.compute_capability} (this GPU is {gpu.compute_capability})"
        )
    if reasons:
        raise ContractError(
            f"{engine_path} was built for " + " and ".join(reasons) + "; TensorRT engines run only on the GPU "
            "model and TensorRT version they were built with: rebuild it on this host with "
            f"`python -m model_export.tensorrt --onnx MODEL.onnx --out {engine_path}`"
        )
