"""The aiohttp application: app keys, middlewares and every route.

``make_app(config, store, supervisor)`` builds the app but starts nothing: the caller (``serve``)
owns the supervisor's start/close and the listener. Handlers reach the daemon's objects through
``app[CONFIG]``, ``app[STORE]``, ``app[SUPERVISOR]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from corral.daemon.api import (
    anthropic,
    auth,
    limits,
    metrics,
    middleware,
    native_infer,
    native_models,
    openai,
    openai_responses,
    ps,
    requests,
)
from corral.daemon.api.keys import CONFIG, METRICS, STORE, SUPERVISOR
from corral.daemon.api.middleware_errors import error_middleware
from corral.daemon.metrics import Metrics

if TYPE_CHECKING:
    from corral.daemon.apikeys import Keyring
    from corral.daemon.config import Config
    from corral.daemon.models.store import Store
    from corral.daemon.supervisor import Supervisor


def make_app(
    config: Config,
    store: Store,
    supervisor: Supervisor,
    *,
    hostname: str | None = None,
    keyring: Keyring | None = None,
) -> web.Application:
    """The daemon's web application. ``hostname`` overrides the machine name the Host check
    accepts (tests). ``keyring``: the API keys already read (else ``config.api_keys_file`` is
    read here; ``apikeys.KeyFileError`` if it cannot be)."""
    conns = limits.Connections.of(config)
    mws = [
        middleware.request_log,  # also counts the request for /metrics
        limits.connection_middleware(conns),
        middleware.cors_middleware(config.origins),
    ]
    if middleware.is_loopback_bind(config.bind_host):
        mws.append(middleware.host_middleware(middleware.HostPolicy(hostname)))
    # the body limits and auth inside the error middleware: their refusals get the route's error
    # shape; the limits outside auth, which reads admin bodies for the model names it checks
    bodies = limits.body_limits(config.max_body, config.body_timeout)
    mws += [
        middleware.json_not_found,
        error_middleware,
        bodies,
        auth.authorize,
        requests.tickets,
    ]
    # request.read() refuses a body over client_max_size (0: none); blob uploads stream instead
    app = web.Application(middlewares=mws, client_max_size=config.max_body)
    app[CONFIG] = config
    app[limits.CONNECTIONS] = conns  # serve's GuardedRunner counts and times them
    app[STORE] = store
    app[SUPERVISOR] = supervisor
    # The supervisor's registry (it counts loads and evictions); a test double may have none.
    app[METRICS] = getattr(supervisor, "metrics", None) or Metrics()
    auth.install(app, keyring)
    app.on_response_prepare.append(middleware.add_cors_headers)
    native_models.add_routes(app)
    native_infer.add_routes(app)
    ps.add_routes(app)
    openai.add_routes(app)
    metrics.add_routes(app)
    anthropic.add_routes(app)
    openai_responses.add_routes(app)
    requests.add_routes(app)
    return app
