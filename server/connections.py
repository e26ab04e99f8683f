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
  itself, before any ASGI task or middleware, and the answer goes out at its turn in a `RefusalGate`, which sends
  refusals at a bounded rate, so that a flood of refusals cannot take the CPU of the requests being served.
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
import math
import signal
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from types import FrameType
from typing import Any, NamedTuple

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.errors import CLIENT_CLOSED, CLIENT_TIMEOUT, CLIENT_TIMEOUT_KEY

logger = logging.getLogger("server.connections")


Headers = list[tuple[bytes, bytes]]


def json_error_bytes(status: int, code: str, detail: str, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response with the JSON error shape that closes the connection (for the protocol layer)."""
    body = json.dumps({"error": code, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n"
    ).encode()
    return head + b"".join(b"%s: %s\r\n" % pair for pair in extra_headers) + b"\r\n" + body


async def _send_json(send: Send, status: int, code: str, detail: str, close: bool = False,
                     extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": code, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
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
    """Paces the answers to requests refused at arrival: at most `per_second` of them are sent a second, in the
    order they were refused; each waits for its turn (`send`).

    A flooding client ignores Retry-After and resends the moment its 503 arrives, so unpaced refusals come as
    fast as the CPU allows and take the CPU the admitted requests need: on 2 cores a refusal of a ~100 KB upload
    costs the server ~60 us and a client on the same machine ~35 us, and at ~8,000 a second the flood took a
    core (goodput 49% of capacity, BENCHMARKS.md section 3). Paced, a refused client waits for its 503, which
    costs nothing, and the 503 arrives after (refusals waiting) / `per_second`: 46 ms for 184 at 4,000 a second.
    The request is still refused at arrival, from its headers; what waits is the answer, while the rest of the
    body is read and dropped as it comes (the connection is not paused: a paused one stalls the client's upload
    half-way, and the server then pays for resuming it).

    The schedule is GCRA's (an answer's turn is one interval after the previous one's, or now if that has
    passed). The gate wakes at most every TICK_S and sends every answer due by the next wake-up: a timer under
    libuv's 1 ms resolution would fire at once and spin, and each wake-up costs the loop and the woken clients
    about what a few refusals do (per refusal, server / client CPU: 74 / 41 us with 1 ms ticks, 59 / 33 us with
    4 ms, at 4,000 a second on 2 cores). An answer goes out at most TICK_S before its turn."""

    TICK_S = 0.004

    def __init__(self, per_second: float) -> None:
        if per_second <= 0:
            raise ValueError("the refusal rate must be > 0")
        self.interval = 1.0 / per_second
        self._waiting: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._last_turn = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def send(self, answer: Callable[[], None], loop: asyncio.AbstractEventLoop) -> None:
        """Call `answer` (it writes the refusal) now if its turn has come, else when it comes."""
        now = loop.time()
        self._last_turn = turn = max(now, self._last_turn + self.interval)
        if turn <= now + self.TICK_S and not self._waiting:
            answer()
            return
        self._waiting.append((turn, answer))
        if self._timer is None:
            self._wake_for_next(loop, now)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        while self._waiting and self._waiting[0][0] <= now + self.TICK_S:
            self._waiting.popleft()[1]()
        self._timer = None
        if self._waiting:
            self._wake_for_next(loop, now)

    def _wake_for_next(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._timer = loop.call_at(max(self._waiting[0][0], now + self.TICK_S), self._release, loop)


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
    # scope -> the refusal to answer with instead of running the app (it counts and logs it), or None: admitted
    # (the ticket is in the scope) or not a request admission applies to
    answer_at_arrival: Callable[[Scope], EarlyResponse | None] | None = None
    refusal_gate: RefusalGate  # set by protocol_class
    # request headers -> the CORS headers CORSMiddleware would add (server.browser.early_cors_headers), for the
    # answers this protocol gives to requests whose headers it read (a slow body's 408, 431, 503 over the
    # connection limit): a browser then sees the status, not a CORS failure
    cors_headers: Callable[[Headers], Headers] = staticmethod(lambda request_headers: [])

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer: asyncio.TimerHandle | None = None
        self._message_began: float | None = None  # loop time the request now arriving began; None between requests
        self._pending_answer: Callable[[], None] | None = None  # a refusal waiting for its turn (RefusalGate)
        self._refusing = False  # the request now arriving was refused from its headers: its body is dropped
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
        if self.transport.is_closing():
            return
        if self._awaiting_headers and seen == self._headers_seen:
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                logger.info("closing a connection: request headers over %d bytes", self.max_header_bytes)
                detail = f"the request line and headers exceed {self.max_header_bytes} bytes"
                self._refuse(431, "headers_too_large", detail, "headers_too_large")
                return
        # The whole-request timer starts only for a request still arriving once this data is parsed: most
        # requests arrive in one read, and a timer made and cancelled for each was a tenth of a refusal's cost.
        if self._message_began is not None and self._request_timer is None:
            self._request_timer = self.loop.call_at(self._message_began + self.client_timeout_s, self._client_timed_out)

    def on_message_begin(self) -> None:
        if self._pending_answer is not None:  # a pipelined request: the refusal before it goes out first
            self._pending_answer()
        super().on_message_begin()
        self._awaiting_headers = True
        self._cancel_request_timer()
        self._message_began = self.loop.time()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._headers_seen += 1
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        self._oversized = size > self.max_header_bytes  # arrived in one piece: answered by _start_asgi_task
        if not self._oversized and self._refused_at_arrival():
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._message_began = None
        self._cancel_request_timer()
        if self._refusing:
            self._refusing = False
            return
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
            app = functools.partial(_headers_too_large, self.max_header_bytes, self.cors_headers)
        elif app is service_unavailable:
            app = functools.partial(_over_connection_limit, self.cors_headers)
        super()._start_asgi_task(cycle, app)

    def _refused_at_arrival(self) -> bool:
        """Admission from the headers: True if `answer_at_arrival` refused the request that just arrived, which
        is then answered at its turn in the RefusalGate and whose body is dropped as it arrives (`on_body`).
        A request it admits carries its ticket in the scope into the app.

        This runs before uvicorn's own on_headers_complete, which would build the request's cycle (the ASGI
        messages, events and flow control of a request the app runs): under a flood nearly every request is
        refused, and a refusal without that costs the event loop a fifth less (BENCHMARKS.md, section 3).
        Requests this cannot read as plainly as uvicorn would (pipelined behind one still running, an upgrade,
        a percent-encoded or absolute-form path, over the connection limit) take uvicorn's way, and
        AdmissionMiddleware admits or refuses them."""
        if self.answer_at_arrival is None or self.parser.should_upgrade():
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        limit = self.limit_concurrency  # over it uvicorn answers service_unavailable (_start_asgi_task): no app
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            return False
        raw_path, _, query = self.url.partition(b"?")
        if not raw_path.startswith(b"/") or b"%" in raw_path:
            return False
        scope = self.scope  # uvicorn's, from on_message_begin: what answer_at_arrival reads of it, filled in here
        scope["method"] = self.parser.get_method().decode("ascii")
        scope["path"] = self.root_path + raw_path.decode("ascii")
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = query
        response = self.answer_at_arrival(scope)
        if response is None:
            return False
        # A client waiting for 100-continue may never send the body the parser expects: close, as it cannot be
        # told apart from the next request.
        keep_alive = (
            self.parser.get_http_version() != "1.0"
            and self.parser.should_keep_alive()
            and not self.expect_100_continue
        )
        headers = [
            *self.server_state.default_headers,
            *response.headers,
            (b"content-length", b"%d" % len(response.body)),
            *(() if keep_alive else ((b"connection", b"close"),)),
        ]
        head = STATUS_LINE[response.status] + b"".join(b"%s: %s\r\n" % pair for pair in headers) + b"\r\n"
        payload = head + response.body
        self._refusing = True

        def answer() -> None:
            if self._pending_answer is not answer:  # sent already, ahead of its turn (on_message_begin)
                return
            self._pending_answer = None
            if self.transport.is_closing():  # the client left while it waited
                return
            self.transport.write(payload)
            if not keep_alive:
                self.transport.close()
            self.on_response_complete()  # uvicorn's: counted, and a kept-alive connection waits for its next request

        self._pending_answer = answer
        self.refusal_gate.send(answer, self.loop)
        return True

    def _cancel_request_timer(self) -> None:
        if getattr(self, "_request_timer", None) is not None:
            self._request_timer.cancel()  # type: ignore[union-attr]
            self._request_timer = None

    def _client_timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing():
            return
        if self._refusing:  # answered (or about to be) from its headers: nothing more can be said
            logger.info("closing a connection: a refused request's body did not arrive in %g s", self.client_timeout_s)
            self.transport.close()
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
        if cycle is None:
            self._refuse(CLIENT_TIMEOUT, "client_timeout", detail, "client_timeout")
        else:
            self._refuse(CLIENT_TIMEOUT, "client_timeout", detail, None, cycle.scope["headers"])

    def _refuse(self, status: int, code: str, detail: str, reason: str | None,
                request_headers: Headers | None = None) -> None:
        """Answer and close; with CORS headers where the request's headers were read."""
        if reason is not None and self.on_reject is not None:
            self.on_reject(reason)
        cors = self.cors_headers(request_headers) if request_headers is not None else []
        self.transport.write(json_error_bytes(status, code, detail, cors))
        self.transport.close()


async def _headers_too_large(limit: int, cors_headers: Callable[[Headers], Headers], scope: Scope, receive: Receive,
                             send: Send) -> None:
    detail = f"the request line and headers exceed {limit} bytes"
    await _send_json(send, 431, "headers_too_large", detail, True, cors_headers(scope["headers"]))


async def _over_connection_limit(cors_headers: Callable[[Headers], Headers], scope: Scope, receive: Receive,
                                 send: Send) -> None:
    detail = "the server has too many open connections; retry"
    await _send_json(send, 503, "too_many_connections", detail, True, cors_headers(scope["headers"]))


def protocol_class(
    client_timeout_s: float,
    max_header_bytes: int,
    refusals_per_s: float,
    on_reject: Callable[[str], None] | None = None,
    answer_at_arrival: Callable[[Scope], EarlyResponse | None] | None = None,
    cors_headers: Callable[[Headers], Headers] | None = None,
) -> type[GuardedHttpToolsProtocol]:
    """The protocol for uvicorn.Config(http=...), with these bounds; `on_reject(reason)` counts its refusals,
    `answer_at_arrival` answers requests the app refuses before any ASGI work, and those answers are sent by a
    RefusalGate at `refusals_per_s` at most."""
    attributes: dict[str, object] = {
        "client_timeout_s": client_timeout_s,
        "max_header_bytes": max_header_bytes,
        "refusal_gate": RefusalGate(refusals_per_s),
    }
    for name, hook in (("on_reject", on_reject), ("answer_at_arrival", answer_at_arrival),
                       ("cors_headers", cors_headers)):
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
