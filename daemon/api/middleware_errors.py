"""The error middleware: every failure of a handler becomes a JSON error response.

* ``ApiError`` -> its status with ``{"error": message}`` (native), Anthropic's error object for
  ``/v1/messages*``, or OpenAI's for the other paths under ``/v1/``.
* aiohttp's own ``HTTPException`` (404 unknown path, 405, 413 body too large, ...) passes through
  unchanged, except that 413 gets a JSON body.
* A domain ``CorralError`` -> the status ``errors.STATUS`` gives its class, bodies as above.
* Every 503 carries ``Retry-After`` (the queue's drain estimate when there is one).
* Any other exception -> 500 with its text; the traceback is logged, never sent.
* A domain error answered with a 5xx other than 503 (a load, a runner or a transfer failed) is
  logged (``api.failed``, with its text): the request log line alone says only ``status=500``.
  A 503 (overload, shutting down) is routine under load and is counted in /metrics instead.
* Cancellation (client gone) propagates.
* A failure after the handler sent its answer itself (``responses.send_json``) is only logged:
  the answer stands.

Streaming handlers that already sent their headers cannot change the status any more; they must
report a late error themselves as a final ``{"error": ...}`` line (see ``native_models``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from corral.daemon.api.errors import (
    ApiError,
    anthropic_body,
    as_api_error,
    native_body,
    openai_body,
    response_headers,
)
from corral.daemon.api.responses import SENT
from corral.daemon.errors import CorralError

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(request: web.Request, err: ApiError) -> web.Response:
    if request.path.startswith("/v1/messages"):
        body = anthropic_body(err)
    elif request.path.startswith("/v1/"):
        body = openai_body(err)
    else:
        body = native_body(err)
    return web.json_response(body, status=err.status, headers=response_headers(err))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ApiError, CorralError) as err:
        sent = _after_answer(request, err)
        if sent is not None:
            return sent
        api_err = as_api_error(err)
        if api_err.status >= 500 and api_err.status != 503:
            log.warning(
                "api.failed", path=request.path, status=api_err.status, error=api_err.message
            )
        return error_response(request, api_err)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(request, ApiError(413, exc.text or "request body too large"))
    except (web.HTTPException, asyncio.CancelledError):
        raise
    except Exception as exc:  # the one place that turns bugs into a 500
        log.exception("api.unhandled", path=request.path, method=request.method)
        sent = _after_answer(request, exc)
        return sent or error_response(request, ApiError(500, str(exc) or type(exc).__name__))


def _after_answer(request: web.Request, exc: Exception) -> web.StreamResponse | None:
    """The answer the handler already sent (``responses.send_json``) when ``exc`` came after
    it, while it tidied up: nothing more can reach the client (a second answer would corrupt
    the connection), so the failure is only logged."""
    sent = request.get(SENT)
    if sent is not None and isinstance(exc, ApiError | CorralError):  # others: logged already
        log.error("api.failed_after_answer", path=request.path, error=str(exc))
    return sent
