"""Requests an operator can see and cancel.

* Every inference request gets a ticket (:mod:`corral.daemon.ticket`): its ``X-Request-Id`` (the
  client's own is kept, else a new one) and its class from ``X-Corral-Priority``
  (``high``/``normal``/``low``; absent = the model's policy, else the API key's ``priority``).
  The response carries
  ``X-Request-Id`` whatever its status, streamed or not.
* ``GET /api/requests``: every request waiting, loading or running, waiting ones in the order
  they will be served: ``id``, ``model``, ``state``, ``priority``, ``position`` (in its model's
  queue; 0 when running), ``waited_ms``, ``tokens`` (output so far), ``client``.
* ``DELETE /api/requests/{id}``: ends it (a waiting one gets 499 ``request ... was cancelled``;
  a running one frees its slot at once and its stream ends with that error line); 404 for an
  id that is not live.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from corral.daemon.api import auth
from corral.daemon.api.errors import ApiError
from corral.daemon.api.keys import SUPERVISOR
from corral.daemon.api.responses import json_response
from corral.daemon.ticket import CURRENT, Ticket
from corral.scheduler import PRIORITIES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID: web.RequestKey[str] = web.RequestKey("corral.request_id", str)
# the POST routes whose rule says they are inference requests
INFERENCE_PATHS = frozenset(
    path for (method, path), rule in auth.RULES.items() if method == "POST" and rule.ticket
)
MAX_ID = 128


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given is None or given == "":
        return os.urandom(12).hex()  # secrets.token_hex(12), without its two Python calls
    if len(given) > MAX_ID or not given.isprintable() or not given.isascii():
        raise ApiError(400, f"X-Request-Id must be 1 to {MAX_ID} printable ASCII characters")
    return given


@web.middleware
async def tickets(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An inference request's ticket, set for the handler's task (``ticket.CURRENT``)."""
    if request.method != "POST" or request.path not in INFERENCE_PATHS:
        return await handler(request)
    rid = request[REQUEST_ID] = _request_id(request)
    raw = request.headers.get("X-Corral-Priority")
    priority = None
    if raw is not None:
        priority = PRIORITIES.get(raw.strip().lower())
        if priority is None:
            raise ApiError(400, 'X-Corral-Priority must be "high", "normal" or "low"')
    key = request.get(auth.KEY)
    key_priority = PRIORITIES[key.priority] if key is not None and key.priority else None
    token = CURRENT.set(Ticket(rid, priority, request.remote or "", key_priority))
    try:
        return await handler(request)
    finally:
        CURRENT.reset(token)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the ticket's id on the response (also streams and errors)."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers["X-Request-Id"] = rid


async def list_requests(request: web.Request) -> web.Response:
    rows = [
        {
            "id": r.id,
            "model": r.model,
            "state": r.state,
            "priority": r.priority,
            "position": r.position,
            "waited_ms": r.waited_ms,
            "tokens": r.tokens,
            "client": r.client,
        }
        for r in request.app[SUPERVISOR].requests()
    ]
    return json_response({"requests": rows})


async def cancel_request(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    if not request.app[SUPERVISOR].cancel(rid):
        raise ApiError(404, f'request "{rid}" not found')
    return json_response({"id": rid, "status": "cancelled"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/requests", list_requests)
    app.router.add_delete("/api/requests/{id}", cancel_request)
    app.on_response_prepare.append(add_request_id)
