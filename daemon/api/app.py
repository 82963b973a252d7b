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

# JSON bodies (chat with base64 images) may be large; blob uploads are streamed and not bounded
# by this limit.
CLIENT_MAX_SIZE = 256 * 1024 * 1024


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
    mws = [
        metrics.count_requests,
        middleware.request_log,
        middleware.cors_middleware(config.origins),
    ]
    if middleware.is_loopback_bind(config.bind_host):
        mws.append(middleware.host_middleware(middleware.HostPolicy(hostname)))
    # auth inside the error middleware: its refusals get the route's error shape
    mws += [middleware.json_not_found, error_middleware, auth.authorize, requests.tickets]
    app = web.Application(middlewares=mws, client_max_size=CLIENT_MAX_SIZE)
    app[CONFIG] = config
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
