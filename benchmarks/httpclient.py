"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for the load generator only.

Why not httpx: the load generator shares the CPU with the server on small machines, and a bare client costs a
fraction of httpx's per-request overhead, so less of the measured time is the benchmark measuring itself.
It speaks just enough HTTP/1.1 for the server under test: one request at a time per connection, bodies
framed by Content-Length or chunked encoding, reconnect when the server says `Connection: close`.

Only loopback hosts are accepted (`check_loopback`): this tool must never load anything but the local machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-cased names; repeated headers keep the last value
    body: bytes


class HttpError(Exception):
    """The connection failed or the server sent something this client cannot parse."""


class Connection:
    """One keep-alive connection; requests on it are strictly sequential."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self._target.host, self._target.port)
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and read the whole response. Retries once on a connection the server had closed."""
        for attempt in (0, 1):
            fresh = self._writer is None
            if fresh:
                await self._connect()
            try:
                return await self._roundtrip(method, path, body, headers or {})
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError) as exc:
                self.abort()
                if fresh or attempt == 1:
                    raise HttpError(f"{method} {path}: {exc!r}") from exc
            except BaseException:  # cancelled or timed out mid-response: the stream state is unknown
                self.abort()
                raise
        raise AssertionError("unreachable")

    async def _roundtrip(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        assert self._reader is not None and self._writer is not None
        lines = [f"{method} {self._target.base_path}{path} HTTP/1.1", f"Host: {self._target.host}:{self._target.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self._writer.write(body)
        await self._writer.drain()

        status_and_headers = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = status_and_headers[:-4].decode("latin-1").split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise HttpError(f"bad status line {status_line!r}") from exc
        resp_headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            resp_headers[name.strip().lower()] = value.strip()

        if "chunked" in resp_headers.get("transfer-encoding", "").lower():
            payload = await self._read_chunked()
        elif "content-length" in resp_headers:
            payload = await self._reader.readexactly(int(resp_headers["content-length"]))
        elif status in (204, 304) or method == "HEAD":
            payload = b""
        else:  # body runs to the end of the connection
            payload = await self._reader.read()
            resp_headers["connection"] = "close"
        if resp_headers.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, resp_headers, payload)

    async def _read_chunked(self) -> bytes:
        assert self._reader is not None
        parts: list[bytes] = []
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # trailers (if any) end with an empty line
                while (await self._reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(await self._reader.readexactly(size))
            await self._reader.readexactly(2)

    def abort(self) -> None:
        """Drop the connection without waiting (safe inside a cancelled task)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


class ConnectionPool:
    """Idle connections reused LIFO; a request takes one (or opens one) and gives it back afterwards."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._idle: list[Connection] = []
        self._all: list[Connection] = []

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        conn = self._idle.pop() if self._idle else self._new()
        try:
            return await conn.request(method, path, body, headers)
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
