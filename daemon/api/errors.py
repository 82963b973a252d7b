"""Errors raised by API handlers and turned into HTTP responses by the error middleware.

Native endpoints answer ``{"error": message}``; ``/v1`` endpoints answer OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, except ``/v1/messages`` (Anthropic's
``{"type": "error", "error": {"type", "message"}, "request_id"}``). Raise :class:`ApiError` anywhere below a
handler; never let another exception escape as a traceback (the middleware maps it to 500).
"""

from __future__ import annotations

# Ollama's exact texts (shared/reference/ollama-api.md §2).
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"


class ApiError(Exception):
    """An error with an HTTP status and a client-facing message."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r})"


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f'model "{name}" not found, try pulling it first')


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
    return {"error": {"message": err.message, "type": openai_error_type(err.status),
                      "param": err.param, "code": err.code}}


def anthropic_error_type(status: int) -> str:
    """Anthropic's ``error.type`` for a status code."""
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            503: "overloaded_error", 529: "overloaded_error"}.get(status, "api_error")


def anthropic_error(err: ApiError) -> dict:
    """The ``error`` object of Anthropic's error body and of its stream ``error`` event."""
    return {"type": anthropic_error_type(err.status), "message": err.message}


def anthropic_body(err: ApiError) -> dict:
    import secrets

    return {"type": "error", "error": anthropic_error(err),
            "request_id": "req_" + secrets.token_hex(12)}
