"""``corral serve``: wire the store, the GPU probe, the supervisor and the HTTP app, run until a
signal, then shut down in order.

Shutdown order (STYLE rule 11): stop accepting connections, fail queued requests, let streams
drain within a budget, stop runners in parallel, close the probe. The whole stop stays within
``SHUTDOWN_BUDGET`` seconds, under the service manager's stop timeout (systemd unit: 30 s).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
from aiohttp import web

from corral.daemon import gguf_info, tls
from corral.daemon.api import auth, limits
from corral.daemon.api.app import make_app
from corral.daemon.apikeys import KeyFileError, Keyring
from corral.daemon.config import Config, HostAddr
from corral.daemon.models.default_model import ensure_default_model
from corral.daemon.models.store import Store
from corral.daemon.policy import Policy, PolicyError
from corral.daemon.policy import load as load_policy
from corral.daemon.runners import RunnerProcess
from corral.daemon.supervisor import Supervisor
from corral.daemon.version import VERSION

log = structlog.get_logger("corral.serve")

SHUTDOWN_BUDGET = 15.0
LISTEN_BACKLOG = 4096
STREAM_DRAIN = 5.0
DEFAULT_CLIENT_URL = HostAddr().url  # where `corral` clients look without OLLAMA_HOST


def serve(config: Config, runner: asyncio.Runner, spare: RunnerProcess | None = None) -> int:
    """Run the daemon on ``runner``'s loop until a signal; the exit status. ``corral serve``
    comes here from :func:`corral.daemon.boot.serve`, which made the loop and ``spare``."""
    try:
        runner.run(run(config, spare=spare))
    # address in use, a bad policy file, pins not fitting, a bad key file or certificate
    except (OSError, PolicyError, KeyFileError, tls.TLSError) as exc:
        log.error("serve failed", error=str(exc))
        return 1
    return 0


async def run(
    config: Config,
    ready: Callable[[str], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    spare: RunnerProcess | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set). ``ready`` gets the listening URL;
    ``spare``: a spare runner spawned already, for the supervisor to adopt.
    SIGHUP reloads the policy file, the API key file and the TLS certificate. Raises PolicyError
    when the policy file is bad or its pinned models cannot all be loaded (after shutting down
    what started). A key file or certificate that cannot be used stops the start
    (``KeyFileError``, ``tls.TLSError``) before anything runs: a daemon meant to be guarded
    never comes up open."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    keyring = Keyring.load(config.api_keys_file) if config.api_keys_file else None
    ssl_context = (
        tls.server_context(config.tls_cert, config.tls_key)
        if config.tls_cert and config.tls_key
        else None
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    log.info("server config", **config.env_summary())
    policy = load_policy(config.policy_path) if config.policy_path else Policy()
    _raise_fd_limit()
    # GGUF headers parsed once for all daemon runs (the store's default-model import and the
    # first request after a restart read them), before anything reads one
    gguf_info.use_disk_cache(config.cache_dir / "gguf-info" if config.cache_dir else None)
    store = Store(config.models, noprune=config.noprune)
    if not config.noprune:
        await asyncio.to_thread(store.prune)
    default = await ensure_default_model(store, config)

    supervisor = Supervisor(config, store, policy=policy, spare=spare)
    await supervisor.start()
    failed: list[PolicyError] = []
    app = make_app(config, store, supervisor, keyring=keyring)
    reloads: set[asyncio.Task] = set()

    def _sighup() -> None:
        supervisor.reload_policy()
        task = loop.create_task(reload(config, app, ssl_context))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, _sighup)

    async def _stop_supervisor(_app: web.Application) -> None:
        # Runs after the listening sockets are closed and before aiohttp waits for (and then
        # cancels) the remaining handlers: queued requests fail, streams drain, runners stop, so
        # every in-flight stream still ends with its final line or an error line.
        await supervisor.close()

    app.on_shutdown.append(_stop_supervisor)
    # handler_cancellation: a client that goes away cancels its handler, so a request waiting
    # in the scheduler queue leaves it at once and a stream frees its slot.
    # GuardedRunner: header timer, idle limit and per-address cap (api/limits.py).
    runner = limits.GuardedRunner(
        app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=STREAM_DRAIN,
    )
    try:
        await runner.setup()
        # A burst of clients must wait in the accept queue, not be dropped (the kernel caps
        # the backlog at net.core.somaxconn; Go's listeners ask for the same).
        site = web.TCPSite(
            runner,
            config.bind_host or None,
            config.bind_port,
            reuse_address=True,
            backlog=LISTEN_BACKLOG,
            ssl_context=ssl_context,
        )
        await site.start()
        addresses = [f"{s[0]}:{s[1]}" for s in (runner.addresses or [])]
        log.info(
            "Listening",
            addresses=addresses,
            version=VERSION,
            event_loop=type(loop).__module__.partition(".")[0],
        )
        if ready is not None:
            res = ready(config.client_url)
            if asyncio.iscoroutine(res):
                await res

        # Load the default model in the background so it is ready for the first chat; a request
        # that arrives meanwhile shares that load. The start-up ends with one line saying where
        # corral listens and what to try first.
        async def _preload_then_greet() -> None:
            try:
                pins = await supervisor.load_pins()
            except PolicyError as e:  # pins that cannot all be loaded stop the start-up
                failed.append(e)
                stop.set()
                return
            if pins:
                log.info("pinned models loaded", models=pins)
            await supervisor.preload_default(default)
            log.info(
                "corral is ready",
                url=config.client_url,
                model=default,
                **{"try": first_command(config, default)},
            )

        preload = asyncio.create_task(_preload_then_greet())
        await stop.wait()
        preload.cancel()
        log.info("shutting down")
    finally:
        # 1. stop accepting (sites close) and fail queued requests; 2. drain streams, stop
        # runners in parallel, close the probe (supervisor.close in on_shutdown); 3. aiohttp
        # waits up to STREAM_DRAIN for handlers to write their last lines.
        async def _shutdown() -> None:
            await supervisor.begin_shutdown()
            await runner.cleanup()
            await supervisor.close()  # idempotent; covers a failure before on_shutdown ran

        try:
            await asyncio.wait_for(_shutdown(), SHUTDOWN_BUDGET)
        except TimeoutError:
            log.error("shutdown budget exceeded; killing runners")
            await supervisor.kill_all()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("stopped")
    if failed:
        raise failed[0]


async def reload(config: Config, app: web.Application, ssl_context: ssl.SSLContext | None) -> None:
    """SIGHUP: the API key file and the TLS certificate read again. What cannot be read keeps
    its previous value (an error line says why); the daemon never stops over it."""
    await auth.reload(app)
    if ssl_context is not None and config.tls_cert and config.tls_key:
        try:
            tls.reload(ssl_context, config.tls_cert, config.tls_key)
        except tls.TLSError as e:
            log.error("TLS certificate not reloaded, the previous one stays", error=str(e))
        else:
            log.info("TLS certificate reloaded", cert=str(config.tls_cert))


def _raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one (as Go's runtime does for Ollama): every
    client connection and every runner's pipes and socket take descriptors, and the usual soft
    default of 1024 refuses a burst of a thousand clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 10240)  # macOS OPEN_MAX
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open files limit", soft=soft, hard=hard, error=str(exc))
        return
    log.debug("open files limit raised", soft=want, previous=soft)


def first_command(config: Config, model: str | None) -> str:
    """The command the ``corral is ready`` line suggests: a completion on the default model, or
    the model list when no default was loaded. It names this install's ``corral`` (relative to
    the working directory when inside it, e.g. ``.venv/bin/corral`` for ``./dev serve``) and sets
    OLLAMA_HOST when the daemon is not on the client default."""
    exe = Path(sys.executable).with_name("corral")
    corral = "corral"
    if exe.exists():
        rel = os.path.relpath(exe)
        corral = str(exe) if rel.startswith("..") else rel
    if config.client_url != DEFAULT_CLIENT_URL:
        corral = f"OLLAMA_HOST={config.client_url} {corral}"
    if model is None:
        return f"{corral} list"
    return f"{corral} run {model} 'The capital of France is'"
