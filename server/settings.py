"""Every server setting in one place: defaults here, overridden by `SSD_*` environment variables, then by flags.

`Settings` is built once (in `server.__main__`, or by a test) and passed into `create_app(settings)`;
nothing reads the environment after that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL_NAME = "ssd_mobilenet_v1_coco"
DEFAULT_MODEL_PATH = Path("weights") / f"{DEFAULT_MODEL_NAME}.onnx"

REFUSALS_PER_S_PER_CORE = 2000

LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]


class Settings(BaseSettings):
    """ssd-serve configuration (environment prefix `SSD_`, e.g. `SSD_MAX_BATCH_SIZE=16`)."""

    model_config = SettingsConfigDict(env_prefix="SSD_", extra="forbid", frozen=True)

    model: Annotated[tuple[Path, ...], NoDecode] = Field(
        (DEFAULT_MODEL_PATH,),
        description="exported model: .onnx (onnxruntime, torch) or .engine/.plan (tensorrt); "
        "the default is exported on first start if missing. Several models: repeat the flag or give a comma "
        "list; each is served under its file name without the suffix, the first is /detect's default",
    )
    engine: str = Field("onnxruntime", description="inference engine: onnxruntime | torch | tensorrt")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    fp16: bool = Field(False, description="torch engine on CUDA: run the network in float16")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port of the KServe v2 protocol (0: no gRPC)")

    max_batch_size: int = Field(32, ge=1, description="largest batch the batcher hands to the engine")
    max_queue_delay_ms: float = Field(
        2.0, ge=0, description="a batch closes this long after its first request, if not full before"
    )
    max_queue_size: int = Field(256, ge=1, description="images waiting for the engine; beyond it: 503")
    request_timeout_ms: float = Field(
        10_000,
        gt=0,
        description="end-to-end deadline from arrival, every stage included: past it the request is answered 504 "
        "and its work dropped (a client may ask for less: X-Request-Timeout-Ms header or timeout_ms query)",
    )
    max_in_flight: int = Field(
        0,
        ge=0,
        description="images admitted at once, from arrival to response; beyond it: 503 + Retry-After before the "
        "body is read (0: max_queue_size, so the batcher's queue never overflows after a decode). Lower while the "
        "engines' measured rate would not finish that many within half the request timeout",
    )
    refusal_rate: float = Field(
        0,
        ge=0,
        description="refusals at arrival answered per second at most; beyond it a refused request's 503 waits its "
        "turn, so clients that resend at once cannot take the CPU admitted requests need "
        "(server.connections.RefusalGate; 0: 2,000 per CPU core)",
    )
    drain_seconds: float = Field(
        5.0,
        ge=0,
        description="on SIGTERM/SIGINT: /readyz answers 503 at once and requests are still served this long, then "
        "the listener closes and in-flight requests finish (0: stop accepting at once)",
    )
    client_timeout_s: float = Field(
        30.0, gt=0, description="time a client has to send a whole request, headers and body (408, then closed)"
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle connection is closed after this long")
    max_connections: int = Field(
        0,
        ge=0,
        description="open connections at most (503, then closed, beyond; uvicorn's limit_concurrency); "
        "0: 1000, or fewer to stay 64 below the process's open-file limit",
    )
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, description="largest request line + headers (431 beyond)"
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest request body (413 beyond)")
    max_image_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, width x height (413 beyond)")
    max_images_per_request: int = Field(64, ge=1, description="most images in one /detect/batch request")
    instances: int = Field(
        0,
        ge=0,
        description="engine instances, each running its own batches side by side (Triton's instance group); "
        "0: 2 on a CPU with 2 or more cores, 1 on a GPU",
    )
    intra_op_threads: int = Field(
        0, ge=0, description="threads of each engine instance (0: the runtime's default, one per core)"
    )
    decode_workers: int = Field(0, ge=0, description="image decode threads (0: one per CPU core, at most 8)")
    jpeg_draft: bool = Field(
        False,
        description="trade accuracy for speed on large JPEGs: decode at a reduced DCT scale (1/2, 1/4, 1/8; both "
        "sides kept >= 2x the model input) before the resize; antialiased, so boxes and scores move slightly "
        "(measured in BENCHMARKS.md); off: every pixel decoded, the validated filter",
    )
    warmup: bool = Field(True, description="run batches of 1, 2, 4, ... max_batch_size once before reporting ready")

    weights_mirror: str | None = Field(
        None, description="offline folder the first-start export fetches weights from (SSD_WEIGHTS_MIRROR)"
    )
    log_level: LogLevel = Field("info", description="log level")
    access_log: bool = Field(
        False, description="log every request: request id, endpoint, status, latency, body bytes, image size"
    )
    log_format: LogFormat = Field("text", description="log lines: text, or json (one JSON object per line)")
    cors_origins: str = Field(
        "", description="comma-separated origins a browser may call the API from ('*': any); empty: CORS off"
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_from_file(cls, data: object) -> object:
        """A TensorRT engine file as the model picks the tensorrt engine unless one was named; TensorRT runs on
        CUDA, so it also picks device cuda unless one was named."""
        if not isinstance(data, dict):
            return data
        files = _split_models(data.get("model", ()))
        if "engine" not in data and any(str(file).lower().endswith((".engine", ".plan")) for file in files):
            data = {**data, "engine": "tensorrt"}
        if data.get("engine") == "tensorrt" and "device" not in data:
            data = {**data, "device": "cuda"}
        return data

    @field_validator("model", mode="before")
    @classmethod
    def _model_list(cls, value: object) -> tuple[Path, ...]:
        files = tuple(Path(file) for file in _split_models(value))
        if not files:
            raise ValueError("at least one model file is needed")
        names = [model_name(file) for file in files]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"two models would be served as {', '.join(twice)}: give the files different names")
        return files

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from server.engines import ENGINES

        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; known engines: {', '.join(sorted(ENGINES))}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind, _, index = value.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.fp16 and not self.device.startswith("cuda"):
            raise ValueError("fp16 needs a CUDA device (device=cuda); it is not available on the CPU")
        if self.engine == "tensorrt" and not self.device.startswith("cuda"):
            raise ValueError("the tensorrt engine runs on a GPU: device must be cuda or cuda:N")
        if self.fp16 and self.engine != "torch":
            raise ValueError(f"fp16 is a torch-engine option; {self.engine} precision is fixed by the model file")
        return self

    @property
    def effective_instances(self) -> int:
        if self.instances:
            return self.instances
        return 2 if self.device == "cpu" and (os.cpu_count() or 1) >= 2 else 1

    @property
    def effective_decode_workers(self) -> int:
        return self.decode_workers or min(8, os.cpu_count() or 1)

    @property
    def effective_refusal_rate(self) -> float:
        # A refusal of a ~100 KB upload costs the server ~60 us of CPU on 2 cores (and a client on the same
        # machine ~35 us): 2,000 a second per core keeps the server's refusals near an eighth of its CPU, and a
        # flood of 200 connections against 16 admitted gets its 503s in 46 ms (BENCHMARKS.md, section 3).
        return self.refusal_rate or REFUSALS_PER_S_PER_CORE * (os.cpu_count() or 1)

    @property
    def model_file(self) -> Path:
        """The first model: /detect's default, and the one a `for_model` copy serves."""
        return self.model[0]

    @property
    def effective_max_in_flight(self) -> int:
        # max_queue_size by default: everything admitted fits the batcher's queue, so no request is refused after
        # its decode was paid for, and after a flood at most max_queue_size images stand between a new request
        # and the engine. A bound above it (queue + batch + decode threads) lets each finished batch admit more
        # images than the queue can take, which are then decoded only to be refused (slow 503s, wasted CPU).
        # benchmarks/overload.py --set max_in_flight=N compares other bounds.
        return self.max_in_flight or self.max_queue_size

    @property
    def effective_max_connections(self) -> int:
        if self.max_connections:
            return self.max_connections
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, OSError, ValueError):  # not a POSIX system
            return 1000
        return 1000 if soft == resource.RLIM_INFINITY else max(16, min(1000, soft - 64))

    @property
    def is_default_model(self) -> bool:
        return self.model_file == DEFAULT_MODEL_PATH

    def for_model(self, file: Path) -> Settings:
        """These settings for one of the models (each model has its own pipeline)."""
        return self.model_copy(update={"model": (file,)})


def model_name(file: Path) -> str:
    """The name a model file is served under: /detect?model=NAME, /v2/models/NAME."""
    return Path(file).stem


def _split_models(value: object) -> list[str | Path]:
    """'a.onnx,b.onnx' | ['a.onnx', 'b.onnx,c.onnx'] | Path -> each file, in order."""
    items = value if isinstance(value, (list, tuple)) else [value]
    files: list[str | Path] = []
    for item in items:
        if isinstance(item, Path):
            files.append(item)
        else:
            files.extend(part.strip() for part in str(item).split(",") if part.strip())
    return files
