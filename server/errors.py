"""Domain exceptions and the one place that maps them to HTTP responses.

Every error body is JSON `{"error": <code>, "detail": <text>}`. The modules that detect a problem raise a
`ServerError` subclass and know nothing about HTTP; `install_error_handlers` turns them into responses, whose
bodies also carry `"request_id"` (the request's X-Request-ID, server.requestid).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from server import requestid

logger = logging.getLogger("server.errors")

# nginx's code for "the client closed the connection before the response": not a server error (never sent).
CLIENT_CLOSED = 499
CLIENT_TIMEOUT = 408
# Set in the ASGI scope by the protocol (server.connections) when it closed a request that took too long to arrive.
CLIENT_TIMEOUT_KEY = "ssd.client_timeout"


class ServerError(Exception):
    """Base class: `code` is the machine-readable error, `status` the HTTP status it maps to."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    # Label of ssd_rejected_requests_total{reason}; None: not a rejection (server-side failure).
    reject_reason: ClassVar[str | None] = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str] | None:
        return None

    def body(self) -> dict[str, object]:
        return {"error": self.code, "detail": self.detail}


class EmptyBody(ServerError):
    code, status, reject_reason = "empty_body", 400, "empty_body"


class InvalidImage(ServerError):
    code, status, reject_reason = "invalid_image", 400, "invalid_image"


class MissingField(ServerError):
    code, status, reject_reason = "missing_field", 422, "validation_error"


class InvalidParameter(ServerError):
    code, status, reject_reason = "validation_error", 422, "validation_error"


class InvalidTensor(ServerError):
    """A KServe v2 request whose tensors do not fit the model's interface (name, datatype, shape, data)."""

    code, status, reject_reason = "invalid_tensor", 400, "validation_error"


class ModelNotFound(ServerError):
    code, status, reject_reason = "model_not_found", 404, "model_not_found"


class UnsupportedMediaType(ServerError):
    code, status, reject_reason = "unsupported_media_type", 415, "unsupported_media_type"


class PayloadTooLarge(ServerError):
    code, status, reject_reason = "payload_too_large", 413, "payload_too_large"

    def headers(self) -> dict[str, str]:
        # The rest of the body was never read: the connection cannot carry another request.
        return {"Connection": "close"}


class ImageTooLarge(ServerError):
    code, status, reject_reason = "image_too_large", 413, "image_too_large"


class TooManyImages(ServerError):
    code, status, reject_reason = "too_many_images", 413, "too_many_images"


class TooManyFields(ServerError):
    code, status, reject_reason = "too_many_fields", 413, "too_many_fields"


class PartTooLarge(ServerError):
    code, status, reject_reason = "part_too_large", 413, "part_too_large"


class QueueFull(ServerError):
    code, status, reject_reason = "queue_full", 503, "queue_full"

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Overloaded(QueueFull):
    """Refused at arrival (server.admission): too many images in flight."""

    code, status, reject_reason = "overloaded", 503, "overloaded"


class RequestTimeout(ServerError):
    code, status, reject_reason = "timeout", 504, "timeout"


class NotReady(ServerError):
    code, status, reject_reason = "not_ready", 503, "not_ready"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class EngineError(ServerError):
    code, status = "engine_error", 500


def with_request_id(body: dict[str, object]) -> dict[str, object]:
    """A response's error body plus the request's id (server.requestid), when there is one."""
    request_id = requestid.current()
    return body if request_id is None else {**body, "request_id": request_id}


def error_response(exc: ServerError) -> JSONResponse:
    return JSONResponse(with_request_id(exc.body()), status_code=exc.status, headers=exc.headers())


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI, on_reject: Callable[[str], None] | None = None) -> None:
    """Map domain errors, request validation errors and HTTP errors to the JSON error shape.

    `on_reject(reason)` is called for each rejected request (client-side errors), for the metrics.
    """

    def reject(reason: str | None) -> None:
        if reason is not None and on_reject is not None:
            on_reject(reason)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServerError)
        if exc.status >= 500 and exc.reject_reason is None:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.detail)
        reject(exc.reject_reason)
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        reject("validation_error")
        body = with_request_id({"error": "validation_error", "detail": _validation_detail(exc)})
        return JSONResponse(body, status_code=422)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            with_request_id({"error": code, "detail": str(exc.detail)}),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def client_disconnect(request: Request, exc: Exception) -> Response:
        timed_out = bool(request.scope.get(CLIENT_TIMEOUT_KEY))
        reject("client_timeout" if timed_out else "client_disconnect")
        logger.info(
            "%s %s: %s before the request body arrived",
            request.method,
            request.url.path,
            "client timeout" if timed_out else "the client disconnected",
        )
        return Response(status_code=CLIENT_TIMEOUT if timed_out else CLIENT_CLOSED)  # labels the metrics only

    app.add_exception_handler(ServerError, server_error)
    app.add_exception_handler(ClientDisconnect, client_disconnect)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
