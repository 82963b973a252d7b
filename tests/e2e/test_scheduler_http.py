"""Scheduler behaviour through HTTP: a real ``corral serve``, real runner processes.

Timing-sensitive cases use the FakeEngine runner (``CORRAL_RUNNER_ENGINE=fake``: the same runner
process, tokens at a set rate) over the tiny model's GGUF; the rest use the real llama engine.
Tests wait on observable events (a streamed line, /api/ps, a pid), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import create_tiny, pid_alive, start_daemon

pytestmark = pytest.mark.timeout(120)

ENDLESS = 100_000  # tokens of a stream the test ends itself (it outlasts any slow machine)
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"


def fake_env(
    tokens_per_second: float = 40.0, *, hold_tokens_while: Path | None = None, **extra: str
) -> dict[str, str]:
    """FakeEngine runners; while the file ``hold_tokens_while`` exists their streams stop after
    the first token (held open for the test however slow the machine)."""
    knobs: dict = {"tokens_per_second": tokens_per_second, "default_num_predict": 400}
    if hold_tokens_while is not None:
        knobs["hold_tokens_while"] = str(hold_tokens_while)
    return {"CORRAL_RUNNER_ENGINE": "fake", "CORRAL_FAKE_KNOBS": json.dumps(knobs), **extra}


async def ps(s: aiohttp.ClientSession, url: str) -> list[dict]:
    async with s.get(f"{url}/api/ps") as r:
        return (await r.json())["models"]


async def wait_ps(s, url, pred, timeout: float = 20.0) -> list[dict]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        rows = await ps(s, url)
        if pred(rows) or loop.time() > end:
            return rows
        await asyncio.sleep(0.02)


async def generate(s, url, model, **body) -> dict:
    async with s.post(
        f"{url}/api/generate", json={"model": model, "prompt": "hi", "stream": False, **body}
    ) as r:
        data = await r.json()
        data["_status"] = r.status
        return data


class Stream:
    """A streaming /api/generate whose lines the test reads one at a time."""

    def __init__(self, s, url, model, **body) -> None:
        self.s, self.url, self.model, self.body = s, url, model, body
        self.resp: aiohttp.ClientResponse | None = None

    async def open(self) -> Stream:
        self.resp = await self.s.post(
            f"{self.url}/api/generate", json={"model": self.model, "prompt": "hi", **self.body}
        )
        return self

    async def line(self) -> dict | None:
        assert self.resp is not None
        raw = await self.resp.content.readline()
        return json.loads(raw) if raw.strip() else None

    async def rest(self) -> list[dict]:
        out = []
        while (obj := await self.line()) is not None:
            out.append(obj)
        return out

    def close(self) -> None:
        assert self.resp is not None
        self.resp.close()


async def test_max_loaded_models_evicts_idle_runner(tmp_path, session):
    with start_daemon(tmp_path, OLLAMA_MAX_LOADED_MODELS="1") as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        b = await create_tiny(session, d.url, tmp_path, "b", 2)
        assert (await generate(session, d.url, a, options={"num_predict": 2}))["_status"] == 200
        [row_a] = await ps(session, d.url)
        assert row_a["model"] == a
        assert (await generate(session, d.url, b, options={"num_predict": 2}))["_status"] == 200
        rows = await ps(session, d.url)
        assert [r["model"] for r in rows] == [b]
        assert not pid_alive(row_a["pid"])


async def test_keep_alive_expiry_stops_runner(tmp_path, session):
    with start_daemon(tmp_path) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        r = await generate(session, d.url, a, keep_alive="1h", options={"num_predict": 2})
        assert r["_status"] == 200
        [row] = await ps(session, d.url)
        assert row["expires_at"]
        # the next request's keep-alive replaces the runner's (Ollama): it expires 1 s after it
        r = await generate(session, d.url, a, keep_alive="1s", options={"num_predict": 2})
        assert r["_status"] == 200
        assert await wait_ps(session, d.url, lambda rows: not rows, timeout=15) == []
        loop = asyncio.get_running_loop()
        end = loop.time() + 10
        while pid_alive(row["pid"]) and loop.time() < end:
            await asyncio.sleep(0.02)
        assert not pid_alive(row["pid"])


async def test_max_queue_rejects_waiters_on_a_loaded_model(tmp_path, session):
    env = fake_env(OLLAMA_NUM_PARALLEL="1", OLLAMA_MAX_QUEUE="1")
    with start_daemon(tmp_path, **env) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        first = await Stream(session, d.url, a, options={"num_predict": ENDLESS}).open()
        assert (await first.line())["done"] is False  # granted, holds the only slot
        waiter = asyncio.create_task(generate(session, d.url, a, options={"num_predict": 1}))
        await wait_ps(session, d.url, lambda rows: rows and rows[0].get("queued") == 1)
        third = await generate(session, d.url, a, options={"num_predict": 1})
        assert third["_status"] == 503 and third["error"] == QUEUE_FULL
        first.close()
        assert (await waiter)["_status"] == 200


async def test_num_parallel_streams_interleave(tmp_path, session):
    hold = tmp_path / "hold-tokens"
    env = fake_env(20.0, hold_tokens_while=hold, OLLAMA_NUM_PARALLEL="2")
    with start_daemon(tmp_path, **env) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        hold.touch()  # each stream stops after its first token until both are seen running
        s1 = await Stream(session, d.url, a, options={"num_predict": 10}).open()
        s2 = await Stream(session, d.url, a, options={"num_predict": 10}).open()
        # both streams deliver their first token before either one is done
        l1, l2 = await asyncio.gather(s1.line(), s2.line())
        assert l1["done"] is False and l2["done"] is False
        rows = await ps(session, d.url)
        assert rows[0]["in_flight"] == 2 and rows[0]["num_parallel"] == 2
        hold.unlink()
        r1, r2 = await asyncio.gather(s1.rest(), s2.rest())
        assert r1[-1]["done"] and r2[-1]["done"]


async def test_num_ctx_change_reloads(tmp_path, session):
    with start_daemon(tmp_path) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        await generate(session, d.url, a, options={"num_ctx": 256, "num_predict": 1})
        [r1] = await ps(session, d.url)
        assert r1["context_length"] == 256
        await generate(session, d.url, a, options={"num_ctx": 512, "num_predict": 1})
        [r2] = await ps(session, d.url)
        assert r2["context_length"] == 512 and r2["pid"] != r1["pid"]
        # same options again: no reload
        await generate(session, d.url, a, options={"num_ctx": 512, "num_predict": 1})
        [r3] = await ps(session, d.url)
        assert r3["pid"] == r2["pid"]


async def test_runner_killed_mid_stream_ends_with_error_and_reloads(tmp_path, session):
    with start_daemon(tmp_path, **fake_env(20.0)) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        s1 = await Stream(session, d.url, a, options={"num_predict": ENDLESS}).open()
        assert (await s1.line())["done"] is False
        [row] = await ps(session, d.url)
        os.kill(row["pid"], signal.SIGKILL)
        rest = await s1.rest()
        assert rest and "error" in rest[-1], rest[-3:]
        r = await generate(session, d.url, a, options={"num_predict": 2})
        assert r["_status"] == 200 and r["done"]
        [row2] = await ps(session, d.url)
        assert row2["pid"] != row["pid"]


async def test_client_disconnect_frees_slot(tmp_path, session):
    with start_daemon(tmp_path, **fake_env(20.0, OLLAMA_NUM_PARALLEL="1")) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        s1 = await Stream(session, d.url, a, options={"num_predict": 400}).open()
        assert (await s1.line())["done"] is False
        s1.close()
        rows = await wait_ps(session, d.url, lambda rows: rows and rows[0]["in_flight"] == 0)
        assert rows[0]["in_flight"] == 0
        r = await generate(session, d.url, a, options={"num_predict": 2})
        assert r["_status"] == 200


async def test_cancelled_while_queued_frees_queue_place(tmp_path, session):
    env = fake_env(20.0, OLLAMA_NUM_PARALLEL="1", OLLAMA_MAX_QUEUE="1")
    with start_daemon(tmp_path, **env) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        holder = await Stream(session, d.url, a, options={"num_predict": ENDLESS}).open()
        assert (await holder.line())["done"] is False
        queued = asyncio.create_task(generate(session, d.url, a, options={"num_predict": 1}))
        await wait_ps(session, d.url, lambda rows: rows and rows[0].get("queued") == 1)
        queued.cancel()  # the client goes away while its request waits
        rows = await wait_ps(session, d.url, lambda rows: rows and rows[0].get("queued") == 0)
        assert rows[0]["queued"] == 0
        # the queue place is free again: this one waits (not 503) and is served once the
        # holder goes away
        waiter = asyncio.create_task(generate(session, d.url, a, options={"num_predict": 1}))
        await wait_ps(session, d.url, lambda rows: rows and rows[0].get("queued") == 1)
        holder.close()
        assert (await waiter)["_status"] == 200
