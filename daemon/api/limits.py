"""What a client may send and hold: bounded request bodies, time limits, connections per address.

* A body longer than ``max_body`` (``CORRAL_MAX_BODY``) is a **413** in the route's error shape:
  refused from ``Content-Length`` before a byte of it is read, and while reading a body of
  unknown length (chunked) as soon as it passes the limit (aiohttp's ``client_max_size``, which
  ``make_app`` sets to ``max_body``). The rest of such a body is read and dropped by aiohttp
  (its lingering close), never kept.
* Blob uploads (``POST /api/blobs/:digest``) stream to disk in chunks: no limit but the disk's.

Slow and greedy clients (``serve`` listens through :class:`GuardedRunner`, which wraps every
connection's aiohttp protocol in a :class:`_Guard`):

* a request's line and headers must be in within ``header_timeout`` of its first byte, else the
  connection is closed (slowloris); never while a response is still being written;
* a body must be in within ``body_timeout`` of the handler's start, else a **408** in the
  route's shape; a blob upload (no size limit, so no total time) only may not pause that long;
* an idle keep-alive connection is closed after ``idle_timeout`` (aiohttp's keep-alive timer,
  which also closes a new connection that sends nothing);
* with ``max_client_connections`` set, the connections of one client address beyond it get a
  **429** with ``Retry-After`` for each request (not a reset), and are closed after it.
No limit ever applies to writing a response: a long stream to a slow reader runs to its end.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import CONFIG
from corral.daemon.api.middleware_errors import error_response

if TYPE_CHECKING:
    from corral.daemon.config import Config

log = structlog.get_logger("corral.daemon.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

END_OF_HEADERS = b"\r\n\r\n"
IDLE_FOREVER = 1e9  # s: aiohttp's keep-alive timer takes a number (0 would close at once)

# (method, route) whose body is streamed, not read whole: bounded only by the disk
STREAMED_BODIES = frozenset({("POST", "/api/blobs/{digest}")})


def streams_body(request: web.Request) -> bool:
    """Whether the request's route streams its body to disk (no size limit)."""
    resource = request.match_info.route.resource
    return resource is not None and (request.method, resource.canonical) in STREAMED_BODIES


def too_large(max_body: int, size: int | None = None) -> ApiError:
    got = "" if size is None else f" ({size} bytes)"
    return ApiError(
        413, f"request body too large{got}: the limit is {max_body} bytes (CORRAL_MAX_BODY)"
    )


def body_limits(
    max_body: int, body_timeout: float = math.inf
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware (inside the error middleware, which answers its ApiError in the route's
    shape): a declared ``Content-Length`` over ``max_body`` is a 413 before the handler runs;
    aiohttp's own 413 while reading a chunked body gets the same message; a body still not in
    ``body_timeout`` after the handler started is a 408 (the handler is cancelled: it was
    waiting for the body)."""

    @web.middleware
    async def limit_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        streamed = streams_body(request)
        if max_body and not streamed:
            size = request.content_length
            if size is not None and size > max_body:
                raise too_large(max_body, size)
        try:
            return await _body_deadline(request, handler, body_timeout, streamed)
        except web.HTTPRequestEntityTooLarge:
            if not max_body or streamed:
                raise
            raise too_large(max_body) from None

    return limit_body


async def _body_deadline(
    request: web.Request, handler: Handler, timeout: float, streamed: bool
) -> web.StreamResponse:
    """Run the handler; if its body is not in within ``timeout`` (a streamed body: has not
    grown for that long), cancel it and raise a 408. Once the body is in, no deadline."""
    content = request.content
    if math.isinf(timeout) or content.is_eof():
        return await handler(request)
    loop = asyncio.get_running_loop()
    seen = content.total_bytes
    timer: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(None) as deadline:

            def check() -> None:
                nonlocal seen, timer
                if content.is_eof():
                    return
                if streamed and content.total_bytes > seen:
                    seen = content.total_bytes
                    timer = loop.call_later(timeout, check)
                    return
                deadline.reschedule(loop.time())

            timer = loop.call_later(timeout, check)
            return await handler(request)
    except TimeoutError:
        if not deadline.expired():
            raise
        log.info("client too slow sending its body", path=request.path, remote=request.remote)
        raise ApiError(408, f"request body not received within {timeout:g}s") from None
    finally:
        if timer is not None:
            timer.cancel()


# ---- connections ------------------------------------------------------------------------------


class Connections:
    """The open client connections of one listener: their count per address (the cap) and each
    one's guard, found from a request by its aiohttp protocol (``request.protocol``)."""

    def __init__(self, *, header_timeout: float = math.inf, per_client: int = 0) -> None:
        self.header_timeout = header_timeout
        self.per_client = per_client
        self.per_address: Counter[str] = Counter()
        self.guards: dict[object, _Guard] = {}

    @classmethod
    def of(cls, config: Config) -> Connections:
        return cls(header_timeout=config.header_timeout, per_client=config.max_client_connections)

    def guard_of(self, request: web.Request) -> _Guard | None:
        return self.guards.get(request.protocol)


CONNECTIONS: web.AppKey[Connections] = web.AppKey("connections", Connections)


class _Guard(asyncio.Protocol):
    """One connection's aiohttp protocol (``inner``), wrapped: every transport callback is
    passed on; on the way it counts the connection for its address and times the headers of
    each request from their first byte until the blank line that ends them (``headers_in``:
    then until its handler has ended nothing is timed; ``busy`` while the handler runs: its body
    and its response are not headers).

    The timer stops when the headers have arrived, not when the handler starts: a daemon busy
    with a flood may start a handler long after its request came in (uvloop runs a due timer
    before the callbacks the previous step queued), and a request that came in whole must not
    be cut as a slowloris for the daemon's own lateness."""

    def __init__(self, conns: Connections, inner: Any) -> None:
        self.conns = conns
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.excess = False
        self.busy = False
        self.headers_in = False
        self._tail = b""  # the last bytes seen while timing headers (a blank line cut in two)
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if isinstance(peer, tuple) else ""
        conns = self.conns
        conns.per_address[self.address] += 1
        self.excess = 0 < conns.per_client < conns.per_address[self.address]
        conns.guards[self.inner] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not (self.busy or self.headers_in or math.isinf(self.conns.header_timeout)):
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(
                    self.conns.header_timeout, self._headers_late
                )
            if END_OF_HEADERS in data or (self._tail and END_OF_HEADERS in self._tail + data[:3]):
                self.headers_in = True
                self._tail = b""
                self._cancel_timer()
            else:
                self._tail = (self._tail + data)[-3:] if len(data) < 3 else data[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        conns = self.conns
        conns.guards.pop(self.inner, None)
        conns.per_address[self.address] -= 1
        if conns.per_address[self.address] <= 0:
            del conns.per_address[self.address]
        self.inner.connection_lost(exc)

    def begin(self) -> None:
        """A request's handler starts: its headers are in."""
        self.busy = True
        self._cancel_timer()

    def end(self) -> None:
        """The handler has ended: the connection's next bytes are the next request's."""
        self.busy = self.headers_in = False
        self._tail = b""

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _headers_late(self) -> None:
        self.timer = None
        transport = self.transport
        if self.busy or self.headers_in or transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():  # a response still going out: not idle yet
            self.timer = asyncio.get_running_loop().call_later(
                self.conns.header_timeout, self._headers_late
            )
            return
        log.info("client too slow sending headers, closing", remote=self.address)
        self.inner.force_close()


def connection_middleware(conns: Connections) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Marks each request's connection busy while its handler runs (its header timer stops),
    and answers every request of a connection over the per-address cap with a 429."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        g = conns.guard_of(request)
        if g is None:  # not served through GuardedRunner (an in-process test server)
            return await handler(request)
        if g.excess:
            response = error_response(
                request,
                ApiError(
                    429,
                    f"too many connections from {g.address}: at most {conns.per_client} "
                    "at once (CORRAL_MAX_CLIENT_CONNECTIONS)",
                ),
            )
            response.headers["Retry-After"] = "1"
            response.force_close()
            return response
        g.begin()
        try:
            return await handler(request)
        finally:
            g.end()

    return guard


class GuardedRunner(web.AppRunner):
    """The ``AppRunner`` of an app made by ``make_app``: its sites wrap every accepted
    connection in a :class:`_Guard` of ``app[CONNECTIONS]`` (its ``server`` is the protocol
    factory the sites listen with), and aiohttp's keep-alive timer closes a connection idle for
    ``CORRAL_IDLE_TIMEOUT``."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("keepalive_timeout", min(app[CONFIG].idle_timeout, IDLE_FOREVER))
        super().__init__(app, **kwargs)
        self.conns = app[CONNECTIONS]

    @property
    def server(self) -> Any:
        inner = super().server
        if inner is None:
            return None
        return lambda: _Guard(self.conns, inner())
