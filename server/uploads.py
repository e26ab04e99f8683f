"""Getting image bytes out of a request: a raw body with an image content type, or multipart parts.

Also the body-size guard: a pure ASGI middleware that refuses a body over the limit from its Content-Length
before reading it, and otherwise counts the bytes as they stream in and stops at the limit.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import (
    EmptyBody,
    InvalidImage,
    MissingField,
    PartTooLarge,
    PayloadTooLarge,
    TooManyFields,
    TooManyImages,
    UnsupportedMediaType,
    with_request_id,
)
from server.preprocess import check_content_type, media_type

MULTIPART = "multipart/form-data"
SINGLE_FIELD = "image"
BATCH_FIELD = "images"


@dataclass(frozen=True)
class Upload:
    data: bytes
    content_type: str | None
    name: str | None = None  # the part's file name, when there is one


async def single_image(request: Request) -> Upload:
    """POST /detect: multipart field `image`, or the whole body with an image (or octet-stream) content type."""
    content_type = request.headers.get("content-type")
    if media_type(content_type) == MULTIPART:
        async with _form(request, max_files=1) as form:
            part = form.get(SINGLE_FIELD)
            if part is None:
                raise MissingField(f"the multipart body has no {SINGLE_FIELD!r} field")
            upload = await _part(part, SINGLE_FIELD)
    else:
        check_content_type(content_type)
        upload = Upload(data=await request.body(), content_type=content_type)
    if not upload.data:
        raise EmptyBody("the request carries no image data")
    return upload


async def batch_images(request: Request, max_images: int) -> list[Upload]:
    """POST /detect/batch: one multipart part per image, field `images` (or `image`), in order.

    Parts are not checked here (an empty or non-image part becomes that image's own error entry).
    """
    content_type = request.headers.get("content-type")
    if media_type(content_type) != MULTIPART:
        raise UnsupportedMediaType(
            f"/detect/batch takes multipart/form-data with one {BATCH_FIELD!r} part per image, got {media_type(content_type)!r}"
        )
    async with _form(request, max_files=max_images) as form:
        parts = form.getlist(BATCH_FIELD) or form.getlist(SINGLE_FIELD)
        if not parts:
            raise MissingField(f"the multipart body has no {BATCH_FIELD!r} parts")
        if len(parts) > max_images:
            raise TooManyImages(f"{len(parts)} images in one request; the limit is {max_images}")
        return [await _part(part, BATCH_FIELD) for part in parts]


@contextlib.asynccontextmanager
async def _form(request: Request, max_files: int) -> AsyncIterator[FormData]:
    """The parsed multipart body, closed on exit (each part is spooled to a file object; its bytes are read by
    then). Starlette's limit errors become the server's own."""
    try:
        form = await request.form(max_files=max_files, max_fields=max_files + 16)
    except (HTTPException, MultiPartException) as exc:  # inside an app Starlette turns the latter into HTTP 400
        detail = str(exc.detail) if isinstance(exc, HTTPException) else exc.message
        if "Too many files" in detail:
            raise TooManyImages(f"too many images in one request; the limit is {max_files}") from None
        if "Too many fields" in detail:
            raise TooManyFields(f"too many multipart fields: {detail}") from None
        if "exceeded maximum size" in detail:  # "Part ..." / "Field ...": a text field over max_part_size
            raise PartTooLarge(f"a multipart text field is too large: {detail}") from None
        raise InvalidImage(f"malformed multipart body: {detail}") from None
    try:
        yield form
    finally:
        await form.close()


async def _part(part: UploadFile | str, field: str) -> Upload:
    if not isinstance(part, UploadFile):
        raise MissingField(f"the {field!r} field must be a file part (multipart with a filename), not a text field")
    return Upload(data=await part.read(), content_type=part.content_type, name=part.filename)


class BodyLimitMiddleware:
    """413 for a body over `max_body_bytes`: from Content-Length before reading, else while streaming."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send, f"the body has {declared} bytes; the limit is {self.max_body_bytes}")
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(f"the body exceeds the limit of {self.max_body_bytes} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:  # raised where no handler caught it (outside a route)
            if started:
                raise
            await self._refuse(send, exc.detail)

    async def _refuse(self, send: Send, detail: str) -> None:
        if self.on_reject is not None:
            self.on_reject(PayloadTooLarge.reject_reason or "payload_too_large")
        body = json.dumps(with_request_id({"error": PayloadTooLarge.code, "detail": detail})).encode()
        await send(
            {
                "type": "http.response.start",
                "status": PayloadTooLarge.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
