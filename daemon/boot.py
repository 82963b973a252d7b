"""``corral serve``'s first steps: logging, the event loop and the first spare runner, before the
server's imports.

A spare runner's warm-up (its own imports and llama.cpp's backend, ~0.45 s on a quiet machine)
and the daemon's start (~0.5 s, nearly all imports: aiohttp's server, the API, the supervisor,
prometheus-client) each take one core. Spawned where the supervisor starts, just before the
daemon listens, the first spare was still warming up ~0.45 s after the daemon said it was ready,
and a request that came at once (a restart under load) waited for it. Spawned here, before
:mod:`corral.daemon.serve` is imported, the two run side by side (docs/DESIGN.md "Spare
runner"). The spare gets the environment of a CPU placement (``CUDA_VISIBLE_DEVICES`` as
inherited, huge pages as for any runner); the supervisor adopts it when that is the environment
it keeps spares in (no GPUs), else stops it and spawns its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from corral.daemon import logging as corral_logging
from corral.daemon.config import Config
from corral.daemon.runners import RunnerProcess, RunnerStartError, child_env, huge_pages_usable
from corral.runner import eventloop

log = structlog.get_logger("corral.serve")


def serve(config: Config) -> int:
    """Run ``corral serve`` until a signal; the exit status."""
    corral_logging.configure(level=config.log_level, json=config.log_format == "json")
    if config.startup_error is not None:  # e.g. a bad CORRAL_SIMULATE_GPUS: never guess
        log.error("serve failed", error=config.startup_error)
        return 1
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        spare = runner.run(first_spare(config))
        try:
            from corral.daemon.serve import serve as run  # see FUNCTION_IMPORTS in test_imports

            return run(config, runner, spare)
        finally:
            if spare is not None:  # a start that failed before the supervisor adopted it
                runner.run(spare.stop(1.0))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``corral serve`` runs on (``CORRAL_EVENT_LOOP``, the runners' too:
    :func:`corral.runner.eventloop.loop_factory`); an explicit ``uvloop`` that is not installed
    says so."""
    factory = eventloop.loop_factory(choice)
    if factory is None and choice == "uvloop":
        log.warning("uvloop is not installed, running on asyncio's event loop")
    return factory


async def first_spare(config: Config) -> RunnerProcess | None:
    """The daemon's first spare runner, spawned now (None when it keeps none or the spawn
    failed: the supervisor tries again)."""
    if config.spare_runners <= 0:
        return None
    proc = RunnerProcess("spare0", env=child_env(None, huge_pages=huge_pages_usable()))
    try:
        await proc.spawn(("--spare", config.runner_engine))
    except RunnerStartError as exc:
        log.warning("spare runner not started", reason=exc.reason)
        return None
    return proc
