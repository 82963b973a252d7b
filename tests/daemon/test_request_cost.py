"""What a request leaves behind for the event loop: nothing (issue 18, a request's fixed cost).

An async generator dropped unclosed is closed by the loop's finalizer: a self-pipe write, a wake-up
and a task of its own, per request. Every route's writer stops at the job's Done, so the job's
context closes the generator itself.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from corral.daemon.api.errors import ApiError
from corral.daemon.api.middleware_errors import error_middleware
from corral.daemon.api.responses import json_response, send_json
from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture
from tests.daemon.test_supervisor import (  # noqa: F401 - fixtures
    acquire,
    loaded,
    make_sup,
    models,
    pid_alive,
    until,
)

CHAT = [{"role": "user", "content": "Hi"}]


@contextmanager
def finalized_daemon_generators() -> Iterator[list[str]]:
    """The names of the daemon's async generators the loop's finalizer had to close meanwhile
    (the hook is taken at a generator's first step: only ones started inside are seen)."""
    hooks = sys.get_asyncgen_hooks()
    seen: list[str] = []

    def finalizer(agen) -> None:
        if "/daemon/" in agen.ag_code.co_filename:
            seen.append(agen.ag_code.co_qualname)
        hooks.finalizer(agen)

    sys.set_asyncgen_hooks(firstiter=hooks.firstiter, finalizer=finalizer)
    try:
        yield seen
    finally:
        sys.set_asyncgen_hooks(*hooks)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "chatml", "prompt": "Hi", "stream": False}),
        ("/api/generate", {"model": "chatml", "prompt": "Hi", "stream": True}),
        ("/api/chat", {"model": "chatml", "messages": CHAT, "stream": False}),
        ("/api/chat", {"model": "chatml", "messages": CHAT, "stream": True}),
        ("/v1/chat/completions", {"model": "chatml", "messages": CHAT, "stream": True}),
        ("/v1/chat/completions", {"model": "chatml", "messages": CHAT}),
        (
            "/v1/messages",
            {"model": "chatml", "messages": CHAT, "max_tokens": 8, "stream": True},
        ),
        ("/v1/responses", {"model": "chatml", "input": "Hi", "stream": True}),
    ],
)
async def test_a_request_leaves_no_generator_to_the_loop(env: Env, path: str, body: dict) -> None:
    with finalized_daemon_generators() as seen:
        status, _, _ = await env.post(path, body)
        assert status == 200
    assert seen == []
    env.assert_released()


async def test_a_free_slot_is_granted_without_a_hop_to_the_supervisors_task(make_sup, models):
    """acquire() of a loaded model with a free slot returns at its first step: the scheduler
    runs in the caller's task (nothing was queued before it), no round trip through the owner
    task and back. A release frees the slot the same way, and keep-alive still expires."""
    sup = await make_sup()
    m = models(0)
    async with await acquire(sup, m, keep_alive=60.0):
        pass
    step = sup.acquire(m, None, 60.0)
    with pytest.raises(StopIteration) as done:
        step.send(None)
    lease = done.value.value
    assert sup.snapshot().in_flight == 1
    lease.release()
    assert sup.snapshot().in_flight == 0
    async with await acquire(sup, m, keep_alive=0.2) as lease:
        pid = sup.runner_process(lease.runner_id).pid
    await until(sup, lambda: not loaded(sup))
    assert not pid_alive(pid)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "chatml", "prompt": "Hi", "stream": False}),
        ("/api/chat", {"model": "chatml", "messages": CHAT, "stream": False}),
        ("/api/embed", {"model": "embedder", "input": "Hi"}),
        ("/api/embeddings", {"model": "embedder", "prompt": "Hi"}),
        ("/v1/chat/completions", {"model": "chatml", "messages": CHAT}),
        ("/v1/completions", {"model": "chatml", "prompt": "Hi"}),
        ("/v1/embeddings", {"model": "embedder", "input": "Hi"}),
        ("/v1/messages", {"model": "chatml", "messages": CHAT, "max_tokens": 8}),
        ("/v1/responses", {"model": "chatml", "input": "Hi"}),
    ],
)
async def test_a_whole_answer_reaches_the_client_before_the_slot_is_released(
    env: Env, path: str, body: dict
) -> None:
    """A non-streamed answer is sent before the handler tidies up (the slot's release, the log
    line): what comes after it is off the path of a client sending one request after another.
    The slot is still released exactly once, after the answer."""
    env.supervisor.hold_release = asyncio.Event()
    status, answer, text = await asyncio.wait_for(env.post(path, body), 10)
    assert status == 200, text
    assert answer
    assert env.supervisor.active == 1  # the answer is in, the lease not yet released
    env.supervisor.hold_release.set()
    for _ in range(100):
        if env.supervisor.active == 0:
            break
        await asyncio.sleep(0.01)
    env.assert_released()
    # the connection the answer came on serves the next request as usual
    status, _, text = await env.post(path, body)
    assert status == 200, text
    env.assert_released()


async def test_a_failure_after_the_answer_is_logged_and_the_answer_stands(
    aiohttp_client_session,
) -> None:
    """A handler that sent its answer (send_json) and then fails while tidying up: the client
    has the answer, the connection stays usable (no second answer written on it), and the
    failure is logged (an unexpected exception as api.unhandled, a domain error as
    api.failed_after_answer)."""
    raised: list[Exception] = [RuntimeError("release broke"), ApiError(503, "late")]

    async def handler(request: web.Request) -> web.StreamResponse:
        await send_json(request, {"ok": True})
        raise raised.pop(0)

    async def fine(request: web.Request) -> web.StreamResponse:
        return json_response({"fine": True})

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/x", handler)
    app.router.add_get("/y", fine)
    server = TestServer(app)
    await server.start_server()
    try:
        with capture_logs() as logs:
            for _ in range(2):
                async with aiohttp_client_session.post(server.make_url("/x")) as r:
                    assert r.status == 200
                    assert await r.json() == {"ok": True}
                async with aiohttp_client_session.get(server.make_url("/y")) as r:
                    assert await r.json() == {"fine": True}
    finally:
        await server.close()
    events = [e["event"] for e in logs]
    assert events == ["api.unhandled", "api.failed_after_answer"]


@pytest.fixture
async def aiohttp_client_session():
    # one connection for every request: a second answer written on it would break the next one
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        yield s
