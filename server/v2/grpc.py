"""KServe v2 over gRPC (`inference.GRPCInferenceService`, what tritonclient.grpc calls), with grpcio's asyncio
server on the app's own event loop, so requests share the pipelines, batchers and metrics with HTTP.

Started and stopped by the app's lifespan when settings.grpc_port is not 0. The messages come from
grpc_predict_v2.proto (generated modules next to this file).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from server.errors import InvalidTensor, ServerError
from server.metrics import Metrics
from server.models import ModelRegistry
from server.v2 import codec, service
from server.v2 import grpc_predict_v2_pb2 as pb
from server.v2.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server

logger = logging.getLogger("server.v2.grpc")

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: pb.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def infer_request(request: pb.ModelInferRequest) -> codec.InferRequest:
    """The protobuf request -> the codec's record; raw contents or typed contents, checked like HTTP's."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidTensor(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape = codec.check_shape(tensor.name, list(tensor.shape))
        if raw:
            data = codec.from_raw(tensor.name, tensor.datatype, shape, raw[index])
        else:
            field = CONTENTS_FIELDS.get(tensor.datatype)
            if field is None:
                raise InvalidTensor(f"input {tensor.name!r}: datatype {tensor.datatype!r} has no typed contents")
            values = list(getattr(tensor.contents, field))
            data = codec.from_values(tensor.name, tensor.datatype, shape, values)
        inputs.append(codec.Tensor(tensor.name, tensor.datatype, shape, data))
    return codec.InferRequest(
        inputs=inputs,
        outputs=[codec.RequestedOutput(output.name) for output in request.outputs],
        parameters={key: parameter_value(value) for key, value in request.parameters.items()},
        id=request.id,
    )


class InferenceServicer(GRPCInferenceServiceServicer):
    def __init__(self, models: ModelRegistry, metrics: Metrics) -> None:
        self.models = models
        self.metrics = metrics

    def _call(self, context: Any, method: str) -> _Call:
        return _Call(context, self.metrics, method)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=self.models.status != "failed")

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.models.status == "ready" and not self.models.admission.draining)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        async with self._call(context, "ModelReady"):
            pipeline = self.models.get(request.name)
            service.check_version(request.name, request.version)
            return pb.ModelReadyResponse(ready=pipeline.status == "ready")

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**service.server_metadata())

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        async with self._call(context, "ModelMetadata"):
            pipeline = self.models.get(request.name)
            service.check_version(request.name, request.version)
            metadata = service.model_metadata(request.name, pipeline)
            return pb.ModelMetadataResponse(
                name=metadata["name"],
                versions=metadata["versions"],
                platform=metadata["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**spec) for spec in metadata["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**spec) for spec in metadata["outputs"]],
            )

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        async with self._call(context, "ModelInfer"):
            pipeline = self.models.get(request.model_name)
            service.check_version(request.model_name, request.model_version)
            remaining_s = context.time_remaining()  # the client's gRPC deadline, if it set one
            with self.models.admission.admit(None if remaining_s is None else max(remaining_s * 1000, 1.0)) as ticket:
                outputs = await service.infer(pipeline, infer_request(request), ticket)
            return pb.ModelInferResponse(
                model_name=request.model_name,
                model_version=service.MODEL_VERSION,
                id=request.id,
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=list(t.shape))
                    for t in outputs
                ],
                raw_output_contents=[codec.to_raw(t) for t in outputs],
            )


class _Call:
    """One RPC: a domain error -> the gRPC status it maps to, with its message (the v2 error); counted in
    ssd_requests_total{endpoint="grpc/<method>", code=<the HTTP status it would have had>} and the duration
    histogram, like HTTP requests (ModelInfer also in ssd_requests_in_flight); refusals in ssd_rejected_requests."""

    def __init__(self, context: Any, metrics: Metrics, method: str) -> None:
        self.context, self.metrics, self.method = context, metrics, method
        self.endpoint = f"grpc/{method}"
        self.in_flight = method == "ModelInfer"
        self.started = 0.0

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()
        if self.in_flight:
            self.metrics.requests_in_flight.inc()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if self.in_flight:
            self.metrics.requests_in_flight.dec()
        status = 200 if exc is None else exc.status if isinstance(exc, ServerError) else 500
        self.metrics.request_duration.labels(endpoint=self.endpoint).observe(time.perf_counter() - self.started)
        self.metrics.requests.labels(endpoint=self.endpoint, code=str(status)).inc()
        if isinstance(exc, ServerError):
            if exc.reject_reason is not None:
                self.metrics.reject(exc.reject_reason)
            elif exc.status >= 500:
                logger.error("gRPC %s failed: %s", self.method, exc.detail)
            await self.context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.detail)
        return False


class GrpcServer:
    """grpc.aio server for `models` on host:port; `start` raises if the port cannot be bound."""

    def __init__(self, models: ModelRegistry, metrics: Metrics, host: str, port: int, max_message_bytes: int) -> None:
        self.address = f"{host}:{port}"
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a taken port is an error, not a second listener
        ]
        self._server = grpc.aio.server(options=options)
        add_GRPCInferenceServiceServicer_to_server(InferenceServicer(models, metrics), self._server)

    async def start(self) -> None:
        try:
            bound = self._server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen for gRPC on {self.address}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen for gRPC on {self.address}")
        await self._server.start()
        host = self.address.rsplit(":", 1)[0]
        logger.info("KServe v2 gRPC listening on %s:%d", host, bound)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._server.stop(grace_s)
