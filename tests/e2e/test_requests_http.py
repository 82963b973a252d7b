"""Requests an operator can see, order and cancel, through a real ``corral serve`` with FakeEngine
runners: X-Request-Id on every inference response, X-Corral-Priority, GET /api/requests,
DELETE /api/requests/{id} (a stream ends with an error line and its slot goes to the next
request at once), 503 with Retry-After."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.e2e.conftest import create_tiny, start_daemon
from tests.e2e.test_scheduler_http import fake_env

pytestmark = pytest.mark.timeout(120)


async def open_stream(s: aiohttp.ClientSession, url: str, model: str, **headers: str):
    """A stream that outlasts the test however slow the machine (minutes of tokens): the test
    ends it."""
    resp = await s.post(
        f"{url}/api/generate",
        json={"model": model, "prompt": "hi", "options": {"num_predict": 100_000}},
        headers=headers,
    )
    assert resp.status == 200
    return resp


async def line(resp: aiohttp.ClientResponse) -> dict:
    return json.loads(await asyncio.wait_for(resp.content.readline(), 30))


async def listed(s: aiohttp.ClientSession, url: str, pred, timeout: float = 20.0) -> list[dict]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        async with s.get(f"{url}/api/requests") as r:
            rows = (await r.json())["requests"]
        if pred(rows) or loop.time() > end:
            return rows
        await asyncio.sleep(0.02)


async def test_see_order_and_cancel_requests(tmp_path, session):
    env = fake_env(tokens_per_second=40.0, OLLAMA_NUM_PARALLEL="1", OLLAMA_MAX_QUEUE="2")
    with start_daemon(tmp_path, **env) as d:
        m = await create_tiny(session, d.url, tmp_path, "m", 1)
        # X-Request-Id: made up when the client sends none, the client's own kept
        async with session.post(
            f"{d.url}/api/generate",
            json={"model": m, "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
        ) as r:
            assert r.status == 200 and len(r.headers["X-Request-Id"]) == 24
        async with session.post(
            f"{d.url}/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-Request-Id": "mine-1"},
        ) as r:
            assert r.status == 404 and r.headers["X-Request-Id"] == "mine-1"
        async with session.post(
            f"{d.url}/api/generate",
            json={"model": m, "prompt": "hi"},
            headers={"X-Corral-Priority": "urgent"},
        ) as r:
            assert r.status == 400 and "X-Corral-Priority" in (await r.json())["error"]

        running = await open_stream(session, d.url, m, **{"X-Request-Id": "run"})
        assert running.headers["X-Request-Id"] == "run"
        await line(running)
        low_task = asyncio.ensure_future(  # waits: the one slot is taken
            session.post(
                f"{d.url}/api/generate",
                json={"model": m, "prompt": "hi", "stream": False},
                headers={"X-Request-Id": "low", "X-Corral-Priority": "low"},
            )
        )
        await listed(session, d.url, lambda rows: len(rows) == 2)
        high_task = asyncio.ensure_future(
            open_stream(session, d.url, m, **{"X-Request-Id": "high", "X-Corral-Priority": "high"})
        )
        rows = await listed(session, d.url, lambda rows: len(rows) == 3)
        by = {r["id"]: r for r in rows}
        assert [r["id"] for r in rows] == ["high", "low", "run"]  # service order, then running
        assert (by["high"]["state"], by["high"]["position"], by["high"]["priority"]) == (
            "waiting",
            1,
            "high",
        )
        assert (by["low"]["position"], by["low"]["priority"]) == (2, "low")
        assert by["run"]["state"] == "running" and by["run"]["position"] == 0
        assert by["run"]["model"] == m and by["run"]["client"] == "127.0.0.1"
        assert by["low"]["waited_ms"] >= 0
        rows = await listed(session, d.url, lambda rows: rows[-1]["tokens"] >= 3)
        assert rows[-1]["tokens"] >= 3

        # the queue (2) is full: 503 with Retry-After
        async with session.post(
            f"{d.url}/api/generate", json={"model": m, "prompt": "hi", "stream": False}
        ) as r:
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1

        # cancel the running stream: it ends with an error line, the high one starts at once
        async with session.delete(f"{d.url}/api/requests/run") as r:
            assert r.status == 200 and (await r.json())["status"] == "cancelled"
        rest = [json.loads(x) for x in (await running.read()).splitlines() if x.strip()]
        assert rest[-1] == {"error": "request run was cancelled"}
        high = await asyncio.wait_for(high_task, 30)
        assert "response" in await line(high)

        # cancel the waiting low one: its client gets 499
        async with session.delete(f"{d.url}/api/requests/low") as r:
            assert r.status == 200
        low = await asyncio.wait_for(low_task, 30)
        assert low.status == 499
        assert (await low.json()) == {"error": "request low was cancelled"}
        async with session.delete(f"{d.url}/api/requests/low") as r:
            assert r.status == 404 and "not found" in (await r.json())["error"]
        high.close()
        assert await listed(session, d.url, lambda rows: rows == []) == []
        async with session.get(f"{d.url}/metrics") as r:
            text = await r.text()
        assert f'corral_queue_wait_seconds_count{{model="{m}",priority="high"}} 1.0' in text
        assert "corral_requests_cancelled_total 2.0" in text
