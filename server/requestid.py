"""Request ids and the access log: one pure ASGI middleware, outermost, so it sees every response.

- `X-Request-ID` is echoed when the client sends a usable one (1-128 characters of `A-Za-z0-9._:-`), else a new
  one is generated; either way it is on the response, in the access log line and (via `current()`) in error
  bodies and in every log record written while the request runs (`server.logs`).
- The access log (`SSD_ACCESS_LOG`): one line per request on logger `server.access` with method, path, endpoint,
  status, latency, body bytes and the decoded image size(s), which the pipeline reports through `note_image`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
HEADER_KEY = HEADER.lower().encode()
_USABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

access_logger = logging.getLogger("server.access")


@dataclass
class RequestRecord:
    """What the access log says about one request; code deeper in the request adds to it."""

    request_id: str
    images: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each decoded image


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar("request", default=None)


def current() -> str | None:
    """The id of the request being handled (None outside a request)."""
    record = _current.get()
    return record.request_id if record is not None else None


def note_image(width: int, height: int) -> None:
    """Called where an image is decoded: its size goes into the request's access log line."""
    record = _current.get()
    if record is not None:
        record.images.append((width, height))


def incoming_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == HEADER_KEY:
            text = value.decode("latin-1").strip()
            if _USABLE.fullmatch(text):
                return text
            break
    return new_id()


class _RandomIds:
    """128-bit random ids as 32 hex digits (uuid4().hex's form), os.urandom drawn 4 KiB at a time: a getrandom
    call per request cost ~4 us of the ~30 us a refusal takes the event loop (BENCHMARKS.md, section 3)."""

    SIZE = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the gRPC front end runs requests on other threads
        self._pool = b""
        self._used = 0

    def __call__(self) -> str:
        with self._lock:
            if self._used == len(self._pool):
                self._pool, self._used = os.urandom(256 * self.SIZE), 0
            chunk = self._pool[self._used : self._used + self.SIZE]
            self._used += self.SIZE
        return chunk.hex()


new_id = _RandomIds()


class RequestIdMiddleware:
    """Sets the request id, adds `X-Request-ID` to the response, and writes the access log line."""

    def __init__(self, app: ASGIApp, *, endpoints: frozenset[str], access_log: bool) -> None:
        self.app = app
        self.endpoints = endpoints
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(incoming_id(scope))
        token = _current.set(record)
        header = (HEADER_KEY, record.request_id.encode())
        status = 500
        body_bytes = 0
        started = time.perf_counter()

        async def counting_receive() -> Message:
            nonlocal body_bytes
            message = await receive()
            if message["type"] == "http.request":
                body_bytes += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER_KEY]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        finally:
            if self.access_log:
                log_access(scope, record, status, time.perf_counter() - started, body_bytes, self.endpoints)
            _current.reset(token)


def log_access(
    scope: Scope, record: RequestRecord, status: int, latency_s: float, body_bytes: int, endpoints: frozenset[str]
) -> None:
    """The access log line of one request (also for those answered before any ASGI work, server.connections)."""
    path = scope["path"]
    client = scope.get("client")
    images = ["%dx%d" % size for size in record.images]
    latency_ms = round(latency_s * 1000, 3)
    access_logger.info(
        '%s "%s %s" %d %.1f ms%s',
        f"{client[0]}:{client[1]}" if client else "-",
        scope["method"],
        path,
        status,
        latency_ms,
        f" image {','.join(images)}" if images else "",
        extra={
            "request_id": record.request_id,  # also where no request context is set (server.logs.RequestIdFilter)
            "http": {
                "method": scope["method"],
                "path": path,
                "endpoint": path if path in endpoints else "other",
                "status": status,
                "latency_ms": latency_ms,
                "body_bytes": body_bytes,
                "images": images,
                "client": client[0] if client else None,
            }
        },
    )
