"""The connection side of the server: clients that leave, clients that are slow, and the drain at shutdown.

- `RequestGuard` (ASGI middleware): once a request's body has arrived it watches for the client leaving; if it
  leaves before the response, the request's work is cancelled wherever it is (decode queue, batcher queue) and
  the request is counted as 499 (nginx's "client closed request") and logged at INFO. A request cancelled by
  the shutdown's graceful timeout is answered JSON 503, not uvicorn's text/plain 500.
- `protocol_class(settings)`: uvicorn's httptools protocol with the bounds it lacks: a whole request (headers
  and body) must arrive within `client_timeout_s` (JSON 408, then closed; closed alone once a response was
  sent), the request line and headers within `max_header_bytes` (JSON 431), a new connection idle for
  `keep_alive_timeout_s` is closed like a kept-alive one, and its own protocol errors and concurrency-limit
  refusals are JSON.
  A request the app refuses at arrival (`answer_at_arrival`: admission is full) is answered by the protocol
  itself, before any ASGI task or middleware, and its connection then waits in a `RefusalGate`, so that a flood
  of refusals cannot hold back the requests being served.
- `DrainingServer`: uvicorn's server with a drain: on SIGTERM/SIGINT readiness fails at once (`on_drain`), the
  server keeps serving for `drain_s`, then stops accepting, lets in-flight requests finish (uvicorn's graceful
  shutdown, bounded) and exits 0. A second signal skips the rest of the drain; a third SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import signal
import time
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType
from typing import Any, NamedTuple

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import FlowControl, service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.errors import CLIENT_CLOSED, CLIENT_TIMEOUT, CLIENT_TIMEOUT_KEY

logger = logging.getLogger("server.connections")


def json_error_bytes(status: int, code: str, detail: str) -> bytes:
    """A whole HTTP/1.1 response with the JSON error shape that closes the connection (for the protocol layer)."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def _send_json(send: Send, status: int, code: str, detail: str, close: bool = False) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class EarlyResponse(NamedTuple):
    """A whole response the protocol sends for a request before any ASGI work (content-length is added)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RefusalGate:
    """Where a connection just refused at arrival waits before its next request is read: `per_turn` of them are
    let through per turn of the event loop, first come first served.

    A turn of the loop runs every connection that is ready. Under a flood that is every flooding connection,
    each resending the moment it is refused, so a turn lasts as long as a few hundred refusals, and an admitted
    request, which needs a dozen turns from its headers to its response, crawls. Through the gate a turn holds at
    most `per_turn` refusals: admitted requests advance every few refusals, the refusals still come as fast as
    the CPU allows, and each refused client waits its turn in the gate instead of in the loop."""

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self._waiting: collections.deque[FlowControl] = collections.deque()
        self._scheduled = False

    def hold(self, flow: FlowControl, loop: asyncio.AbstractEventLoop) -> None:
        flow.pause_reading()
        self._waiting.append(flow)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._release, loop)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        for _ in range(min(self.per_turn, len(self._waiting))):
            self._waiting.popleft().resume_reading()  # a no-op on a connection closed meanwhile
        self._scheduled = bool(self._waiting)
        if self._scheduled:
            loop.call_soon(self._release, loop)


# ------------------------------------------------------------------------------------------ ASGI middleware


class RequestGuard:
    """Cancel a request whose client left after sending it (499); JSON 503 for a shutdown's cancellation."""

    def __init__(self, app: ASGIApp, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        client_gone = False
        watcher: asyncio.Task[Message] | None = None
        task: asyncio.Task[None]

        def on_watch_done(done: asyncio.Task[Message]) -> None:
            nonlocal client_gone
            if done.cancelled() or started or done.result()["type"] != "http.disconnect":
                return
            client_gone = True
            task.cancel()

        async def guarded_receive() -> Message:
            nonlocal watcher
            if watcher is not None:  # asked again after the whole body: what the watcher sees
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                watcher = asyncio.ensure_future(receive())  # returns when the client disconnects
                watcher.add_done_callback(on_watch_done)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, guarded_receive, tracking_send))
        try:
            await task
        except asyncio.CancelledError:
            if client_gone:
                if self.on_reject is not None:
                    self.on_reject("client_disconnect")
                logger.info("%s %s: the client disconnected before the response (499)", scope["method"], scope["path"])
                # Never reaches the client (uvicorn drops it); labels the request in the metrics.
                await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            task.cancel()
            if not started:  # the shutdown's graceful timeout cancelled it
                logger.warning("%s %s: cancelled by the shutdown", scope["method"], scope["path"])
                await _send_json(send, 503, "shutting_down", "the server is shutting down; retry", close=True)
        finally:
            if watcher is not None:
                watcher.cancel()


# ------------------------------------------------------------------------------------------ uvicorn protocol


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus a whole-request timeout, a header size bound, an idle timeout for new
    connections and JSON for its own errors. Configured through `protocol_class`."""

    client_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    on_reject: Callable[[str], None] | None = None  # counts what is refused here, before any ASGI request
    # scope -> the response to send now instead of running the app (it counts and logs it), or None
    answer_at_arrival: Callable[[Scope], EarlyResponse | None] | None = None
    refusal_gate: RefusalGate  # set by protocol_class

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = True
        self._header_bytes = 0
        self._headers_seen = 0
        if self.limit_concurrency is not None and len(self.connections) > self.limit_concurrency:
            # Over the bound on open connections: refused at once, so descriptors stay bounded too.
            detail = "the server has too many open connections; retry"
            self._refuse(503, "too_many_connections", detail, "too_many_connections")
            return
        # A new connection waits for its first request as a kept-alive one waits for its next.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        seen = self._headers_seen
        super().data_received(data)
        if self._awaiting_headers and seen == self._headers_seen and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                logger.info("closing a connection: request headers over %d bytes", self.max_header_bytes)
                detail = f"the request line and headers exceed {self.max_header_bytes} bytes"
                self._refuse(431, "headers_too_large", detail, "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        self._cancel_request_timer()
        self._request_timer = self.loop.call_later(self.client_timeout_s, self._client_timed_out)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._headers_seen += 1
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        self._oversized = size > self.max_header_bytes  # arrived in one piece: answered by _start_asgi_task
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_request_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # A request answered before its body was read (a 503 at admission, a 413) keeps what had arrived of the
        # body in its cycle until the connection's next request: ~one body per idle connection. Not needed now.
        if self.cycle is not None and self.cycle.response_complete:
            self.cycle.body = bytearray()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "bad_request", msg, "bad_request")

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if getattr(self, "_oversized", False):
            self._oversized = False
            logger.info("refusing a request: headers over %d bytes", self.max_header_bytes)
            app = functools.partial(_headers_too_large, self.max_header_bytes)
        elif app is service_unavailable:
            app = _over_connection_limit
        elif self.answer_at_arrival is not None:
            response = self.answer_at_arrival(cycle.scope)
            if response is not None:
                self._answer_now(cycle, response)
                return
        super()._start_asgi_task(cycle, app)

    def _answer_now(self, cycle: Any, response: EarlyResponse) -> None:
        """Send `response` as the cycle's whole answer; the body still arriving is discarded (`on_body`)."""
        # A client waiting for 100-continue may never send the body the parser expects: close, as it cannot be
        # told apart from the next request.
        keep_alive = cycle.keep_alive and not cycle.waiting_for_100_continue
        status_line = b"HTTP/1.1 %d %s\r\n" % (response.status, HTTPStatus(response.status).phrase.encode())
        headers = [
            *self.server_state.default_headers,
            *response.headers,
            (b"content-length", b"%d" % len(response.body)),
            *(() if keep_alive else ((b"connection", b"close"),)),
        ]
        self.transport.write(status_line + b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n" + response.body)
        cycle.response_started = cycle.response_complete = True
        if not keep_alive:
            self.transport.close()
        cycle.on_response()
        if keep_alive:
            self.refusal_gate.hold(self.flow, self.loop)

    def _cancel_request_timer(self) -> None:
        if getattr(self, "_request_timer", None) is not None:
            self._request_timer.cancel()  # type: ignore[union-attr]
            self._request_timer = None

    def _client_timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing():
            return
        cycle = None if self._awaiting_headers else self.cycle
        logger.info(
            "closing a connection: the request did not arrive within %g s (%s)",
            self.client_timeout_s,
            "headers" if cycle is None else "body",
        )
        if cycle is not None:
            if cycle.response_started:  # answered already (e.g. refused early): nothing more can be said
                self.transport.close()
                return
            cycle.scope[CLIENT_TIMEOUT_KEY] = True  # the app's view of it: 408, not a disconnect (counted there)
            cycle.disconnected = True  # nothing the app sends from now on reaches the socket
            cycle.message_event.set()
        detail = f"the request did not arrive within {self.client_timeout_s:g} s"
        self._refuse(CLIENT_TIMEOUT, "client_timeout", detail, "client_timeout" if cycle is None else None)

    def _refuse(self, status: int, code: str, detail: str, reason: str | None) -> None:
        if reason is not None and self.on_reject is not None:
            self.on_reject(reason)
        self.transport.write(json_error_bytes(status, code, detail))
        self.transport.close()


async def _headers_too_large(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    detail = f"the request line and headers exceed {limit} bytes"
    await _send_json(send, 431, "headers_too_large", detail, close=True)


async def _over_connection_limit(scope: Scope, receive: Receive, send: Send) -> None:
    await _send_json(send, 503, "too_many_connections", "the server has too many open connections; retry", True)


def protocol_class(
    client_timeout_s: float,
    max_header_bytes: int,
    refusals_per_turn: int,
    on_reject: Callable[[str], None] | None = None,
    answer_at_arrival: Callable[[Scope], EarlyResponse | None] | None = None,
) -> type[GuardedHttpToolsProtocol]:
    """The protocol for uvicorn.Config(http=...), with these bounds; `on_reject(reason)` counts its refusals,
    `answer_at_arrival` answers requests the app refuses before any ASGI work, and the connections it refuses
    wait in a RefusalGate letting `refusals_per_turn` through per turn of the event loop."""
    attributes: dict[str, object] = {
        "client_timeout_s": client_timeout_s,
        "max_header_bytes": max_header_bytes,
        "refusal_gate": RefusalGate(refusals_per_turn),
    }
    for name, hook in (("on_reject", on_reject), ("answer_at_arrival", answer_at_arrival)):
        if hook is not None:
            attributes[name] = staticmethod(hook)
    return type("ServerHttpProtocol", (GuardedHttpToolsProtocol,), attributes)


# ------------------------------------------------------------------------------------------ drain


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains for `drain_s` on SIGTERM/SIGINT before its graceful shutdown, then exits 0.
    drain_s == 0: uvicorn's own behaviour (stop accepting at once, re-raise the signal on exit)."""

    def __init__(self, config: uvicorn.Config, drain_s: float, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self._on_drain = on_drain
        self._drain_started: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: no logging here (it takes locks); on_tick reports it.
        self._on_drain()
        if self.drain_s <= 0:
            super().handle_exit(sig, frame)
        elif self._drain_started is None:
            self._drain_started = time.monotonic()
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True  # a second signal: stop draining now

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None:
            if not self._drain_logged:
                self._drain_logged = True
                logger.info("draining: /readyz answers 503; serving for %g s more, then shutting down", self.drain_s)
            if time.monotonic() - self._drain_started >= self.drain_s:
                self.should_exit = True
        return await super().on_tick(counter)
