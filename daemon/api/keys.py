"""Typed application keys: how API modules reach the daemon's long-lived objects.

Each API module exposes ``add_routes(app)`` and reads what it needs from ``app[KEY]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from corral.daemon.config import Config
    from corral.daemon.metrics import Metrics
    from corral.daemon.models.store import Store
    from corral.daemon.supervisor import Supervisor

CONFIG: web.AppKey[Config] = web.AppKey("config")
STORE: web.AppKey[Store] = web.AppKey("store")
SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
