"""What a request leaves behind for the event loop: nothing (issue 18, a request's fixed cost).

An async generator dropped unclosed is closed by the loop's finalizer: a self-pipe write, a wake-up
and a task of its own, per request. Every route's writer stops at the job's Done, so the job's
context closes the generator itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

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
