"""A minimal keep-alive HTTP/1.1 client on an asyncio protocol, for the load generator only.

Why not httpx: the load generator shares the CPU with the server on small machines, and a bare client costs a
fraction of httpx's per-request overhead, so less of the measured time is the benchmark measuring itself.
It speaks just enough HTTP/1.1 for the server under test: one request at a time per connection, bodies
framed by Content-Length or chunked encoding, reconnect when the server says `Connection: close`.

Only loopback hosts are accepted (`check_loopback`): this tool must never load anything but the local machine.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class NotLoopback(ValueError):
    """The target is not this machine's loopback interface."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    base_path: str  # "" or "/prefix" without the trailing slash

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.base_path}"


def check_loopback(url: str) -> Target:
    """Parse `url` and refuse anything but plain HTTP to 127.0.0.0/8, ::1 or localhost."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise NotLoopback(f"only plain http:// to the loopback interface is allowed, got {url!r}")
    host = parts.hostname or ""
    if host not in LOOPBACK_NAMES:
        try:
            is_loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            is_loopback = False
        if not is_loopback:
            raise NotLoopback(f"refusing to load {host!r}: the benchmark only targets 127.0.0.1 / localhost")
    if host == "localhost":
        host = "127.0.0.1"
    return Target(host=host, port=parts.port or 80, base_path=parts.path.rstrip("/"))


class Response(NamedTuple):  # a tuple: cheaper to make than a frozen dataclass, ~5,000 a second in a flood
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers keep the last value
    body: bytes


class HttpError(Exception):
    """The connection failed or the server sent something this client cannot parse."""


class _ResponseReader(asyncio.Protocol):
    """One connection's protocol: parses the response to the request in flight as its bytes arrive, with no
    stream buffers or per-request tasks (a load generator's CPU is taken from the server it shares a machine
    with: ~31-41 us a request on uvloop, against ~53 us on asyncio streams; BENCHMARKS.md section 3)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._no_body = False  # the request in flight was a HEAD
        self._head: tuple[int, dict[str, str], int] | None = None  # status, headers, where the body starts
        self._timer: asyncio.TimerHandle | None = None
        self.lost: Exception | None = None  # set once the connection is closed, by either side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def exchange(self, head: bytes, body: bytes, head_only: bool, timeout_s: float | None) -> asyncio.Future[Response]:
        """Send one request; the future gets its response (TimeoutError after `timeout_s`: one timer, not a task
        or an asyncio.timeout scope, which cost a flood client ~10 us a request)."""
        waiter = self._waiter = self._loop.create_future()
        self._no_body, self._head = head_only, None
        if self.lost is not None:
            waiter.set_exception(ConnectionResetError(f"connection closed: {self.lost!r}"))
            return waiter
        assert self.transport is not None
        self.transport.writelines((head, body))  # one writev; the body is not copied
        if timeout_s is not None:
            self._timer = self._loop.call_later(timeout_s, self._time_out, timeout_s)
        if self._buffer:  # the server spoke first (an early answer, or one it sends before closing)
            self.data_received(b"")
        return waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._advance(eof=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError("closed by the server")
        self._advance(eof=True)

    def _advance(self, eof: bool) -> None:
        """Answer the request in flight if its whole response is in (or, at `eof`, fail it if not)."""
        if self._waiter is None or self._waiter.done():
            return
        try:
            response = self._parse(eof)
        except HttpError as exc:
            self._finish(exc)
            return
        if response is not None:
            self._finish(response)
        elif eof:
            self._finish(ConnectionResetError(f"connection closed mid-response: {self.lost!r}"))

    def _time_out(self, timeout_s: float) -> None:
        self._timer = None
        self._finish(TimeoutError(f"no response within {timeout_s:g} s"))

    def _finish(self, outcome: Response | Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(outcome, Exception):
            self.close()  # the stream's state is unknown
            if waiter is not None and not waiter.done():
                waiter.set_exception(outcome)
            return
        if outcome.headers.get("connection", "").lower() == "close":
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

    def close(self) -> None:
        if self.lost is None:
            self.lost = ConnectionResetError("closed by this client")
        if self.transport is not None:
            self.transport.close()

    def _parse(self, eof: bool) -> Response | None:
        """The whole response once its bytes are in the buffer (removed from it), else None."""
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            status_line, *header_lines = self._buffer[:end].decode("latin-1").split("\r\n")
            try:
                status = int(status_line.split(" ", 2)[1])
            except (IndexError, ValueError) as exc:
                raise HttpError(f"bad status line {status_line!r}") from exc
            pairs = (line.split(":", 1) for line in header_lines)
            headers = {pair[0].strip().lower(): pair[1].strip() if len(pair) == 2 else "" for pair in pairs}
            self._head = status, headers, end + 4
        status, headers, start = self._head
        if "chunked" in headers.get("transfer-encoding", "").lower():
            framed = self._chunked(start)
            if framed is None:
                return None
            body, used = framed
        elif "content-length" in headers:
            used = start + int(headers["content-length"])
            if len(self._buffer) < used:
                return None
            body = bytes(self._buffer[start:used])
        elif status in (204, 304) or self._no_body:
            body, used = b"", start
        else:  # the body runs to the end of the connection
            if not eof:
                return None
            body, used = bytes(self._buffer[start:]), len(self._buffer)
            headers["connection"] = "close"
        del self._buffer[:used]
        return Response(status, headers, body)

    def _chunked(self, position: int) -> tuple[bytes, int] | None:
        """(body, end) of a chunked body starting at `position` once all of it has arrived, else None."""
        parts: list[bytes] = []
        while True:
            line_end = self._buffer.find(b"\r\n", position)
            if line_end < 0:
                return None
            try:
                size = int(bytes(self._buffer[position:line_end]).split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise HttpError(f"bad chunk size line {bytes(self._buffer[position:line_end])!r}") from exc
            position = line_end + 2
            if size == 0:
                while True:  # trailers (if any), then the empty line that ends the body
                    line_end = self._buffer.find(b"\r\n", position)
                    if line_end < 0:
                        return None
                    empty = line_end == position
                    position = line_end + 2
                    if empty:
                        return b"".join(parts), position
            if len(self._buffer) < position + size + 2:
                return None
            parts.append(bytes(self._buffer[position : position + size]))
            position += size + 2


@functools.lru_cache(maxsize=1024)
def _request_head(
    method: str, path: str, host: str, port: int, headers: tuple[tuple[str, str], ...], length: int
) -> bytes:
    """The request line and headers; a load generator sends the same few again and again."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Connection:
    """One keep-alive connection; requests on it are strictly sequential."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._protocol: _ResponseReader | None = None

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self._protocol = await loop.create_connection(
            lambda: _ResponseReader(loop), self._target.host, self._target.port
        )

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send one request and read the whole response. Retries once on a connection the server had closed.
        `timeout_s`: TimeoutError if the connect or the response takes longer."""
        target = self._target
        head = _request_head(
            method, target.base_path + path, target.host, target.port, tuple((headers or {}).items()), len(body)
        )
        for attempt in (0, 1):
            fresh = self._protocol is None or self._protocol.lost is not None
            if fresh:
                await asyncio.wait_for(self._connect(), timeout_s)
            assert self._protocol is not None
            try:
                return await self._protocol.exchange(head, body, method == "HEAD", timeout_s)
            except (ConnectionError, HttpError) as exc:
                self.abort()
                if fresh or attempt == 1:
                    raise HttpError(f"{method} {path}: {exc!r}") from exc
            except BaseException:  # cancelled or timed out mid-response: the stream state is unknown
                self.abort()
                raise
        raise AssertionError("unreachable")

    def abort(self) -> None:
        """Drop the connection without waiting (safe inside a cancelled task)."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.close()

    async def close(self) -> None:
        self.abort()


class ConnectionPool:
    """Idle connections reused LIFO; a request takes one (or opens one) and gives it back afterwards."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._idle: list[Connection] = []
        self._all: list[Connection] = []

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        conn = self._idle.pop() if self._idle else self._new()
        try:
            return await conn.request(method, path, body, headers, timeout_s)
        finally:
            self._idle.append(conn)

    def _new(self) -> Connection:
        conn = Connection(self.target)
        self._all.append(conn)
        return conn

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()
        self._idle.clear()
        self._all.clear()


def multipart_body(field: str, files: list[tuple[str, bytes]], content_type: str = "image/jpeg") -> tuple[bytes, str]:
    """Encode files under one form field as multipart/form-data; returns (body, Content-Type header)."""
    boundary = "ssdbench7c1f0e9a4b2d"
    chunks: list[bytes] = []
    for filename, data in files:
        chunks.append(
            (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode("latin-1")
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("latin-1"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"
