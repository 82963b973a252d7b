"""``GET /metrics`` (Prometheus text format) and the middleware counting requests by route.

The registry and its series live in :mod:`corral.daemon.metrics` (one per daemon, owned by the
supervisor, reached here as ``app[METRICS]``). A scrape first polls the ready runners' ``/health``
for their KV-cache use (bounded, concurrent), then renders; no request pays for it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from corral.daemon.api.keys import METRICS, SUPERVISOR
from corral.daemon.api.middleware import Handler
from corral.daemon.metrics import CONTENT_TYPE

CLIENT_CLOSED = "499"  # the client went away before the response ended (nginx's code)


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``corral_http_requests_total{route,method,status}``; the route is the matched pattern
    (``/api/blobs/{digest}``), ``unmatched`` for unknown paths (bounded label values)."""
    status = "500"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        request.app[METRICS].count_request(route, request.method, status)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    await m.poll_runners()
    return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})


async def readyz(request: web.Request) -> web.Response:
    """Readiness for a load balancer (the Kubernetes StatefulSet's readinessProbe): 200 once the
    start-up preload loaded the default model (or there was none), until shutdown begins; 503
    before and after, so a replica takes traffic only with its model in memory and leaves the
    Service's endpoints as soon as it starts draining."""
    sup = request.app[SUPERVISOR]
    if getattr(sup, "closing", False):
        return web.json_response({"status": "shutting down"}, status=503)
    if not getattr(sup, "preloaded", True):
        return web.json_response({"status": "loading"}, status=503)
    return web.json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/readyz", readyz)
