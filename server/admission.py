"""Admission at arrival and the end-to-end deadline, for every front end (HTTP here, gRPC or others alike).

    with pipeline.admission.admit(timeout_ms=None) as ticket:   # Overloaded (503 + Retry-After) when full
        upload = ...read the request...                         # nothing decoded before admission
        result = await pipeline.detect(upload, options, ticket=ticket)

HTTP admits in uvicorn's protocol once a request's headers are in (`acquire_or_refusal`, through server.app's
`arrival_refusals` and server.connections): a refusal is answered there, before any ASGI work, which is what a
flood of refusals costs, and an admitted request carries its ticket into the app. `AdmissionMiddleware`, the
first thing after the metrics, before routing and before the body is read, admits the requests the protocol
left to uvicorn's own parsing; the route takes the ticket with `admitted(request.scope)` and shortens its
deadline to the client's (`shorten`).

`admit` is called when a request arrives, before its body is read or decoded. It refuses at once when
`bound()` images are already in flight (read, queued for decode, decoding, queued for the engine, in the
engine), so a flood is shed in microseconds instead of after a decode. The bound is `limit`, or fewer where
the engines' recent rate (`rate`) would not finish that many within DEADLINE_SHARE of the default deadline
(Little's law): a request that would only wait out its deadline is refused at arrival, before its decode
takes CPU from those that can still make theirs. The ticket carries the request's
deadline: `request_timeout_ms` from arrival, or the client's shorter one (`timeout_ms`). Every stage checks it
(`check`) or waits no longer than it (`wait`): work for a request past its deadline is dropped before decode,
before it joins a batch and before its result is encoded, and the request is answered RequestTimeout (504).
A batch request charges one image at arrival and the rest once its parts are known (`reserve`).

`draining` turns true on SIGTERM/SIGINT (readiness then fails while requests are still served).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from fastapi import Depends, Header, Query
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import Overloaded, RequestTimeout, error_response

T = TypeVar("T")
RETRY_AFTER_S = 1
# The share of the default deadline that the images admitted ahead of a request may take to drain at the engines'
# rate; the rest is the request's own decode, batch and inference, and the rate's noise. Measured with
# `benchmarks.overload --only deadline` (BENCHMARKS.md section 3).
DEADLINE_SHARE = 0.5


class Ticket:
    """One admitted request: its arrival, its deadline (perf_counter seconds) and the images it holds."""

    def __init__(self, admission: Admission, timeout_s: float) -> None:
        self._admission = admission
        self.arrived_at = time.perf_counter()
        self.timeout_s = timeout_s
        self.deadline = self.arrived_at + timeout_s
        self.images = 1
        self._released = False

    def release(self) -> None:
        """Give the images back (once; `Admission.admit` does it on exit)."""
        if not self._released:
            self._released = True
            self._admission.in_flight -= self.images

    def shorten(self, timeout_ms: float | None) -> None:
        """Apply the client's own deadline (ms from arrival) when it is shorter than the one admitted with."""
        if timeout_ms is not None and timeout_ms / 1000.0 < self.timeout_s:
            self.timeout_s = timeout_ms / 1000.0
            self.deadline = self.arrived_at + self.timeout_s

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once past)."""
        return self.deadline - time.perf_counter()

    def check(self, stage: str) -> None:
        """RequestTimeout if the deadline has passed; `stage` names what would have come next."""
        if time.perf_counter() > self.deadline:
            raise RequestTimeout(self._late(stage))

    async def wait(self, awaitable: Awaitable[T], stage: str) -> T:
        """Await no longer than the deadline; on expiry the awaited work is cancelled (dropped where it is)."""
        self.check(stage)
        try:
            return await asyncio.wait_for(awaitable, self.remaining())
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11
            raise RequestTimeout(self._late(stage)) from None

    def reserve(self, images: int) -> None:
        """Hold `images` in all (a batch request, once its parts are counted); Overloaded if they do not fit.
        A request alone in the server is always admitted, however many images it carries."""
        extra = images - self.images
        if extra > 0:
            self._admission._take(extra, alone_ok=self._admission.in_flight == self.images)
            self.images = images

    def _late(self, stage: str) -> str:
        return (
            f"the request's deadline of {self.timeout_s * 1000:.0f} ms passed "
            f"({(time.perf_counter() - self.arrived_at) * 1000:.0f} ms since arrival) before {stage}"
        )


class Admission:
    """The bound on images in flight and the default deadline. Refusals are counted where they are answered
    (the error handler of each front end), like every other ServerError."""

    def __init__(self, limit: int, timeout_s: float) -> None:
        if limit < 1:
            raise ValueError("the admission limit must be at least 1")
        if timeout_s <= 0:
            raise ValueError("the request timeout must be > 0")
        self.limit = limit
        self.timeout_s = timeout_s
        # Images per second the engines finish with every instance busy; 0 while not known (set by server.models).
        self.rate: Callable[[], float] = lambda: 0.0
        self.in_flight = 0
        self.arrivals = 0  # every request that asked, admitted or not
        self.draining = False

    def timeout_for(self, timeout_ms: float | None) -> float:
        """The deadline for a request that asked for `timeout_ms` (None: the server's): never longer than it."""
        if timeout_ms is None:
            return self.timeout_s
        if timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        return min(self.timeout_s, timeout_ms / 1000.0)

    @contextlib.contextmanager
    def admit(self, timeout_ms: float | None = None) -> Iterator[Ticket]:
        """Admit one request (one image) or raise Overloaded; its images are released on exit."""
        ticket = self.acquire(timeout_ms)
        try:
            yield ticket
        finally:
            ticket.release()

    def untracked(self, arrived_at: float | None = None) -> Ticket:
        """A ticket with the default deadline from `arrived_at` (default: now) that holds no images (for a
        caller that bypasses admission)."""
        ticket = Ticket(self, self.timeout_s)
        ticket.images, ticket._released = 0, True
        if arrived_at is not None:
            ticket.arrived_at, ticket.deadline = arrived_at, arrived_at + self.timeout_s
        return ticket

    def acquire(self, timeout_ms: float | None = None) -> Ticket:
        """`admit` without the context manager: the caller must `release()` the ticket."""
        outcome = self.acquire_or_refusal(timeout_ms)
        if isinstance(outcome, Overloaded):
            raise outcome
        return outcome

    def acquire_or_refusal(self, timeout_ms: float | None = None) -> Ticket | Overloaded:
        """`acquire` for a front end that answers refusals itself: the ticket, or the Overloaded that `acquire`
        raises (counted as an arrival either way), without raising it."""
        timeout_s = self.timeout_for(timeout_ms)  # a bad timeout_ms is refused before a slot is taken
        self.arrivals += 1
        bound = self.bound()
        if self.in_flight >= bound:
            return self._overloaded(bound)
        self.in_flight += 1
        return Ticket(self, timeout_s)

    def bound(self) -> int:
        """The images that may be in flight now: `limit`, or what the engines finish in DEADLINE_SHARE of the
        default deadline at their recent rate when that is fewer (never under 1)."""
        rate = self.rate()
        if rate <= 0:
            return self.limit
        return max(1, min(self.limit, int(rate * self.timeout_s * DEADLINE_SHARE)))

    def _take(self, images: int, *, alone_ok: bool) -> None:
        bound = self.bound()
        if self.in_flight + images > bound and not alone_ok:
            raise self._overloaded(bound)
        self.in_flight += images

    def _overloaded(self, bound: int) -> Overloaded:
        why = (
            f"limit {bound}"
            if bound == self.limit
            else f"limit {bound}: what the engines finish in {DEADLINE_SHARE:g} of the "
            f"{self.timeout_s * 1000:.0f} ms deadline at {self.rate():.0f} img/s"
        )
        return Overloaded(
            f"{self.in_flight} images in flight ({why}); retry in {RETRY_AFTER_S} s", retry_after_s=RETRY_AFTER_S
        )


# ------------------------------------------------------------------------------------------ HTTP

TimeoutQuery = Query(None, gt=0, description="a shorter deadline for this request, ms from arrival (504 past it)")
TimeoutHeader = Header(None, gt=0, description="a shorter deadline for this request, ms from arrival (504 past it)")


async def requested_timeout_ms(
    timeout_ms: float | None = TimeoutQuery, x_request_timeout_ms: float | None = TimeoutHeader
) -> float | None:
    """The client's own deadline: the `timeout_ms` query parameter or the X-Request-Timeout-Ms header (the
    shorter if both); never longer than the server's request_timeout_ms. (async: FastAPI runs a plain function
    dependency in a worker thread, two thread hand-offs per request.)"""
    asked = [value for value in (timeout_ms, x_request_timeout_ms) if value is not None]
    return min(asked) if asked else None


RequestedTimeout = Depends(requested_timeout_ms)  # a route's `timeout_ms` parameter: the client's deadline


TICKET_KEY = "ssd.ticket"


def admitted(scope: Scope) -> Ticket:
    """The ticket `AdmissionMiddleware` admitted this request with."""
    return scope[TICKET_KEY]  # type: ignore[no-any-return]


class AdmissionMiddleware:
    """Admit each request to a path `admits` at arrival, before routing and before its body is read: a JSON 503 with
    Retry-After when `admission()` is full (counted by `on_reject`), else the request runs holding its ticket.
    A request the server's protocol admitted from its headers (scope[TICKET_KEY]) keeps that ticket; either way
    the ticket is released when the request ends."""

    def __init__(
        self,
        app: ASGIApp,
        admission: Callable[[], Admission],
        admits: Callable[[str], bool],
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.admission = admission
        self.admits = admits  # path -> whether requests to it are admitted here
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.admits(scope["path"]):
            await self.app(scope, receive, send)
            return
        ticket = scope.get(TICKET_KEY)  # admitted already by the server's protocol (server.app.arrival_refusals)
        if ticket is None:
            try:
                ticket = self.admission().acquire()
            except Overloaded as exc:
                if self.on_reject is not None:
                    self.on_reject(exc.reject_reason or "overloaded")
                await error_response(exc)(scope, receive, send)
                return
            scope[TICKET_KEY] = ticket
        try:
            await self.app(scope, receive, send)
        finally:
            ticket.release()
