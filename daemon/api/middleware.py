"""HTTP middlewares around every route: request log, CORS, Host-header check, JSON 404/405.

Order (outermost first, as ``make_app`` installs them): :func:`request_log` (one line per request,
also for rejected ones), :func:`cors_middleware` (Ollama's gin-contrib/cors configuration),
:func:`host_middleware` (DNS-rebinding protection when bound to loopback), :func:`json_not_found`
(aiohttp's own 404/405 as JSON), then the error middleware (``middleware_errors``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

import psutil
import structlog
from aiohttp import web

from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import METRICS
from corral.daemon.api.middleware_errors import error_response

log = structlog.get_logger("corral.daemon.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# handlers put the model name here so the request log line can carry it
LOG_MODEL: web.RequestKey[str] = web.RequestKey("corral.model", str)


@web.middleware
async def request_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One ``api.request`` line per request: method, path, model, status, duration, and its
    count in /metrics (one middleware for both: a request's fixed cost, issue 18). A request
    whose client went away before its answer ended is ``status=499`` (nginx's "client closed
    request"), never a 500: nothing failed on our side."""
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        fields = {
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
        }
        model = request.get(LOG_MODEL)
        if model:
            fields["model"] = model
        log.info("api.request", **fields)
        # corral_http_requests_total{route,method,status}: the route is the matched pattern
        # (``/api/blobs/{digest}``), ``unmatched`` for unknown paths (bounded label values)
        counts = request.app.get(METRICS)
        if counts is not None:  # an app without the daemon's metrics (tests)
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            counts.count_request(route, request.method, str(status))


# ---- CORS --------------------------------------------------------------------------------------

CORS_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD"
CORS_HEADERS = ",".join(
    (
        "Authorization",
        "Content-Type",
        "User-Agent",
        "Accept",
        "X-Requested-With",
        "Openai-Beta",
        "X-Stainless-Arch",
        "X-Stainless-Async",
        "X-Stainless-Custom-Poll-Interval",
        "X-Stainless-Helper-Method",
        "X-Stainless-Lang",
        "X-Stainless-Os",
        "X-Stainless-Package-Version",
        "X-Stainless-Poll-Helper",
        "X-Stainless-Retry-Count",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Timeout",
        # beyond Ollama's list, so a browser front end can send what corral reads or its clients
        # send: an API key the Anthropic way, the Anthropic SDK's headers (/v1/messages), a
        # request id, a priority
        "X-Api-Key",
        "Anthropic-Version",
        "Anthropic-Beta",
        "Anthropic-Dangerous-Direct-Browser-Access",
        "X-Request-Id",
        "X-Corral-Priority",
    )
)
# response headers a browser script may read: the request's id and when to retry a 429/503
CORS_EXPOSE_HEADERS = "X-Request-Id,Retry-After"
CORS_MAX_AGE = "43200"


class OriginPolicy:
    """Ollama's origin check: gin-contrib/cors v1.7.2 (``validateOrigin``) with Ollama's
    ``AllowWildcard``. Every entry is an exact origin (trimmed and lower-cased; the request's
    ``Origin`` is compared as sent); an entry with a ``*`` is also a rule on the untouched entry:
    ``*suffix``, ``prefix*`` or ``pre*suf``, the ``*`` standing for any text and nothing else.
    So ``http://localhost:*`` is the prefix ``http://localhost:`` and
    ``http://localhost.evil.example.com`` is refused. An entry that is exactly ``*`` allows every
    origin (and the response says ``*``)."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.rules: list[tuple[str, str]] = []
        self.allow_all = False
        for o in origins:
            self.allow_all |= o == "*"
            self.exact.add(o.strip().lower())
            if "*" in o:
                i = o.index("*")
                self.rules.append((o[:i], o[i + 1 :]))

    def allows(self, origin: str) -> bool:
        if self.allow_all or origin in self.exact:
            return True
        return any(origin.startswith(p) and origin.endswith(s) for p, s in self.rules)


def cors_middleware(origins: Iterable[str]) -> Callable[..., Awaitable[web.StreamResponse]]:
    policy = OriginPolicy(origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        host = request.headers.get("Host", "")
        if not origin or origin in (f"http://{host}", f"https://{host}"):
            return await handler(request)
        if not policy.allows(origin):
            return web.Response(status=403)
        allow_origin = "*" if policy.allow_all else origin
        if request.method == "OPTIONS":
            headers = {
                "Access-Control-Allow-Origin": allow_origin,
                "Access-Control-Allow-Methods": CORS_METHODS,
                "Access-Control-Allow-Headers": CORS_HEADERS,
                "Access-Control-Max-Age": CORS_MAX_AGE,
            }
            if not policy.allow_all:
                headers["Vary"] = (
                    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
                )
            return web.Response(status=204, headers=headers)
        cors_headers = {
            "Access-Control-Allow-Origin": allow_origin,
            "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
        }
        if not policy.allow_all:
            cors_headers["Vary"] = "Origin"
        # added by add_cors_headers when the response (also a stream) sends its headers
        request[_CORS_HEADERS] = cors_headers
        return await handler(request)

    return cors


_CORS_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("corral.cors_headers", dict)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: CORS headers for an allowed cross-origin request."""
    headers = request.get(_CORS_HEADERS)
    if headers:
        response.headers.update(headers)


# ---- Host header ---------------------------------------------------------------------------------


def is_loopback_bind(bind_host: str | None) -> bool:
    """Whether the listener address is loopback (only then is the Host header checked)."""
    if bind_host is None:
        return False
    if bind_host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False


def _local_addresses() -> frozenset[str]:
    addrs: set[str] = set()
    try:
        for entries in psutil.net_if_addrs().values():
            for e in entries:
                if e.family in (socket.AF_INET, socket.AF_INET6):
                    addrs.add(e.address.split("%", 1)[0])
    except Exception:  # no interface list: loopback/private rules still apply
        pass
    return frozenset(addrs)


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


class HostPolicy:
    """Ollama's ``allowedHost``: loopback/private/unspecified/local IPs, ``localhost``, the
    machine's hostname and names under ``.localhost``, ``.local``, ``.internal``."""

    def __init__(
        self, hostname: str | None = None, local_ips: frozenset[str] | None = None
    ) -> None:
        self.hostname = (hostname if hostname is not None else socket.gethostname()).lower()
        self._local_ips = local_ips

    @property
    def local_ips(self) -> frozenset[str]:
        if self._local_ips is None:
            self._local_ips = _local_addresses()
        return self._local_ips

    def ip_allowed(self, host: str) -> bool | None:
        """True/False for an IP literal, None for a name."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        return ip.is_loopback or ip.is_private or ip.is_unspecified or str(ip) in self.local_ips

    def name_allowed(self, host: str) -> bool:
        h = host.lower()
        if h in ("", "localhost") or h == self.hostname:
            return True
        return h.endswith((".localhost", ".local", ".internal"))


def host_middleware(policy: HostPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    # Host header -> "ip" (an allowed IP), "name" (an allowed name) or "" (refused); a client
    # sends the same one every time, so each is parsed once (bounded: the header is the
    # client's to choose).
    verdicts: dict[str, str] = {}

    def verdict(header: str) -> str:
        host = _strip_port(header)
        ip_ok = policy.ip_allowed(host)
        if ip_ok:
            return "ip"
        return "name" if ip_ok is None and policy.name_allowed(host) else ""

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Host", "")
        kind = verdicts.get(header)
        if kind is None:
            kind = verdict(header)
            if len(verdicts) >= 256:
                verdicts.clear()
            verdicts[header] = kind
        if kind == "ip":
            return await handler(request)
        if kind == "name":
            if request.method == "OPTIONS":
                return web.Response(status=204)
            return await handler(request)
        return web.Response(status=403)

    return check_host


# ---- aiohttp's own 404/405 ----------------------------------------------------------------------


@web.middleware
async def json_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown path / wrong method as a JSON error (OpenAI's shape under /v1)."""
    try:
        return await handler(request)
    except web.HTTPNotFound as exc:
        if exc.text and exc.text != "404: Not Found":
            raise
        return error_response(request, ApiError(404, "404 page not found"))
    except web.HTTPMethodNotAllowed:
        return error_response(request, ApiError(405, "405 method not allowed"))
