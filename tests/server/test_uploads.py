"""The body-size guard (pure ASGI, driven directly) and reading images out of requests."""

from __future__ import annotations

import asyncio
import gc
import json
import warnings

import pytest
from starlette.requests import Request

from server.errors import EmptyBody, MissingField, PayloadTooLarge, TooManyImages, UnsupportedMediaType
from server.uploads import BodyLimitMiddleware, batch_images, single_image


def http_scope(headers: dict[str, str]) -> dict[str, object]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/detect",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }


def drive(app, scope, chunks: list[bytes]) -> tuple[list[dict], int]:  # type: ignore[no-untyped-def]
    """Run an ASGI app on a body sent in `chunks`; returns the sent messages and how many chunks were read."""
    sent: list[dict] = []
    read = 0

    async def receive() -> dict:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, read


async def echo_length(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    body = await Request(scope, receive).body()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    rejected: list[str] = []
    app = BodyLimitMiddleware(echo_length, max_body_bytes=100, on_reject=rejected.append)
    sent, read = drive(app, http_scope({"content-length": "101"}), [b"x" * 101])
    assert read == 0
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"] == "payload_too_large"
    assert rejected == ["payload_too_large"]


def test_a_streamed_body_is_stopped_at_the_limit() -> None:
    rejected: list[str] = []
    app = BodyLimitMiddleware(echo_length, max_body_bytes=100, on_reject=rejected.append)
    sent, read = drive(app, http_scope({"transfer-encoding": "chunked"}), [b"x" * 60] * 10)
    assert read == 2  # stopped at the first chunk past the limit, not at the end of the body
    assert sent[0]["status"] == 413
    assert rejected == ["payload_too_large"]


def test_a_body_within_the_limit_passes() -> None:
    app = BodyLimitMiddleware(echo_length, max_body_bytes=100)
    sent, _ = drive(app, http_scope({"content-length": "100"}), [b"x" * 50, b"x" * 50])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"100"


def test_inside_a_route_the_limit_raises_the_domain_error() -> None:
    seen: list[BaseException] = []

    async def route(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await Request(scope, receive).body()
        except PayloadTooLarge as exc:  # the app's error handler answers it
            seen.append(exc)
            await send({"type": "http.response.start", "status": 413, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    drive(BodyLimitMiddleware(route, max_body_bytes=10), http_scope({}), [b"x" * 8, b"x" * 8])
    assert len(seen) == 1


def make_request(body: bytes, content_type: str | None) -> Request:
    headers = {"content-length": str(len(body))}
    if content_type is not None:
        headers["content-type"] = content_type
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return Request(http_scope(headers), receive)


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    boundary = "testboundary"
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def test_raw_body_with_an_image_type() -> None:
    upload = asyncio.run(single_image(make_request(b"abc", "image/png")))
    assert (upload.data, upload.content_type) == (b"abc", "image/png")


def test_raw_body_without_a_type_is_sniffed_later() -> None:
    assert asyncio.run(single_image(make_request(b"abc", None))).data == b"abc"


def test_raw_body_with_a_text_type_is_refused() -> None:
    with pytest.raises(UnsupportedMediaType):
        asyncio.run(single_image(make_request(b"abc", "text/plain")))


def test_empty_raw_body() -> None:
    with pytest.raises(EmptyBody):
        asyncio.run(single_image(make_request(b"", "image/jpeg")))


def test_multipart_image_field() -> None:
    body, ctype = multipart([("image", "a.jpg", b"JPEGDATA")])
    upload = asyncio.run(single_image(make_request(body, ctype)))
    assert (upload.data, upload.name, upload.content_type) == (b"JPEGDATA", "a.jpg", "image/jpeg")


def test_multipart_without_the_field() -> None:
    body, ctype = multipart([("picture", "a.jpg", b"JPEGDATA")])
    with pytest.raises(MissingField):
        asyncio.run(single_image(make_request(body, ctype)))


def test_multipart_text_field_is_not_a_file() -> None:
    body, ctype = multipart([("image", None, b"JPEGDATA")])
    with pytest.raises(MissingField):
        asyncio.run(single_image(make_request(body, ctype)))


def test_multipart_parts_are_closed_once_read() -> None:
    """Each part is spooled to a file object; an unclosed one is left to the garbage collector (ResourceWarning)."""
    single, single_type = multipart([("image", "a.jpg", b"JPEGDATA")])
    batch, batch_type = multipart([("images", f"{i}.jpg", b"x") for i in range(3)])
    missing, missing_type = multipart([("picture", "a.jpg", b"JPEGDATA")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(single_image(make_request(single, single_type)))
        asyncio.run(batch_images(make_request(batch, batch_type), max_images=4))
        with pytest.raises(MissingField):
            asyncio.run(single_image(make_request(missing, missing_type)))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_batch_parts_keep_their_order() -> None:
    body, ctype = multipart([("images", f"{i}.jpg", bytes([i]) * 3) for i in range(5)])
    uploads = asyncio.run(batch_images(make_request(body, ctype), max_images=8))
    assert [u.data for u in uploads] == [bytes([i]) * 3 for i in range(5)]


def test_batch_refuses_too_many_images_and_raw_bodies() -> None:
    body, ctype = multipart([("images", f"{i}.jpg", b"x") for i in range(5)])
    with pytest.raises(TooManyImages):
        asyncio.run(batch_images(make_request(body, ctype), max_images=4))
    with pytest.raises(UnsupportedMediaType):
        asyncio.run(batch_images(make_request(b"x", "image/jpeg"), max_images=4))
