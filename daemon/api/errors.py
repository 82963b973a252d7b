"""Errors raised by API handlers and turned into HTTP responses by the error middleware.

Native endpoints answer ``{"error": message}``; ``/v1`` endpoints answer OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, except ``/v1/messages`` (Anthropic's
``{"type": "error", "error": {"type", "message"}, "request_id"}``). Raise :class:`ApiError`
anywhere below a handler; never let another exception escape as a traceback (the middleware
maps it to 500).
The domain's errors (``daemon/errors.py``) carry no status: :func:`http_status` is the one table
that gives each its status, and the middleware answers them as it answers an ``ApiError``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

from corral.daemon.errors import (
    Busy,
    Cancelled,
    CorralError,
    Failed,
    InvalidRequest,
    NoSpace,
    NotFound,
    RegistryUnreachable,
    TooLarge,
)

STATUS: dict[type[CorralError], int] = {
    InvalidRequest: 400,
    NotFound: 404,
    TooLarge: 413,
    Failed: 500,
    RegistryUnreachable: 502,
    Busy: 503,
    NoSpace: 507,
    Cancelled: 499,  # nginx's "client closed request": not a server failure, not to retry
}
DEFAULT_RETRY_AFTER = 5.0  # s: a 503 whose cause gives no estimate


class ApiError(Exception):
    """An error with an HTTP status and a client-facing message."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # sent with the error response (Retry-After, WWW-Authenticate)

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r})"


def http_status(err: ApiError | CorralError) -> int:
    """The HTTP status a client gets for ``err``."""
    return err.status if isinstance(err, ApiError) else STATUS[type(err)]


def as_api_error(err: ApiError | CorralError) -> ApiError:
    """``err`` as the web layer's error (a domain error gets its status from :data:`STATUS`; a
    Busy one that knows when the queue will have drained says so in ``Retry-After``)."""
    if isinstance(err, ApiError):
        return err
    headers = None
    if isinstance(err, Busy) and err.retry_after is not None:
        headers = {"Retry-After": _seconds(err.retry_after)}
    return ApiError(STATUS[type(err)], err.message, headers=headers)


def response_headers(err: ApiError) -> dict[str, str]:
    """The error response's headers: its own, and ``Retry-After`` on every 503 (whole seconds,
    at least 1; :data:`DEFAULT_RETRY_AFTER` when nothing better is known)."""
    headers = dict(err.headers or {})
    if err.status == 503 and "Retry-After" not in headers:
        headers["Retry-After"] = _seconds(DEFAULT_RETRY_AFTER)
    return headers


def _seconds(s: float) -> str:
    return str(max(1, math.ceil(s)))


def openai_error_type(status: int) -> str:
    """OpenAI's ``error.type`` for a status code."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429 or status == 503:
        return "rate_limit_error" if status == 429 else "server_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def native_body(err: ApiError) -> dict:
    return {"error": err.message}


def openai_body(err: ApiError) -> dict:
    return {
        "error": {
            "message": err.message,
            "type": openai_error_type(err.status),
            "param": err.param,
            "code": err.code,
        }
    }


def anthropic_error_type(status: int) -> str:
    """Anthropic's ``error.type`` for a status code."""
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }.get(status, "api_error")


def anthropic_error(err: ApiError) -> dict:
    """The ``error`` object of Anthropic's error body and of its stream ``error`` event."""
    return {"type": anthropic_error_type(err.status), "message": err.message}


def anthropic_body(err: ApiError) -> dict:
    return {
        "type": "error",
        "error": anthropic_error(err),
        "request_id": "req_" + secrets.token_hex(12),
    }
