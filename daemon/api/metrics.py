"""``GET /metrics`` (Prometheus text format) and ``GET /readyz``. Requests are counted by route in
``middleware.request_log``, the middleware that logs them.

The registry and its series live in :mod:`corral.daemon.metrics` (one per daemon, owned by the
supervisor, reached here as ``app[METRICS]``). A scrape first polls the ready runners' ``/health``
for their KV-cache use (bounded, concurrent), then renders; no request pays for it.
"""

from __future__ import annotations

from aiohttp import web

from corral.daemon.api.keys import METRICS, SUPERVISOR
from corral.daemon.metrics import CONTENT_TYPE


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
