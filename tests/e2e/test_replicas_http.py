"""Replicas through a real ``corral serve``: a model whose policy allows two runners gets a
second one when its requests wait - on the other simulated GPU with FakeEngine runners, and as
two real llama.cpp runners of the tiny model on the CPU; /api/ps keeps one entry for the model
and lists its runners."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.e2e.conftest import create_tiny, start_daemon
from tests.e2e.test_gpu_scheduling import create_virtual, gpus_env
from tests.e2e.test_gpu_scheduling import env as gpu_env

pytestmark = pytest.mark.timeout(180)


async def rows(s: aiohttp.ClientSession, url: str) -> list[dict]:
    async with s.get(f"{url}/api/ps") as r:
        return (await r.json())["models"]


async def wait_rows(s, url, pred, timeout: float = 60.0) -> list[dict]:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        got = await rows(s, url)
        if pred(got) or loop.time() > end:
            return got
        await asyncio.sleep(0.05)


async def stream(s: aiohttp.ClientSession, url: str, model: str) -> aiohttp.ClientResponse:
    return await s.post(
        f"{url}/api/generate",
        json={"model": model, "prompt": "hi", "options": {"num_predict": 100_000}},
    )


async def two_streams_two_runners(s: aiohttp.ClientSession, url: str, model: str) -> list[dict]:
    """Two streams at once on a one-slot model: the second waits, a replica starts and serves
    it. Returns the model's /api/ps runners while both stream."""
    a = await stream(s, url, model)
    assert a.status == 200
    await a.content.readline()
    b_task = asyncio.ensure_future(stream(s, url, model))
    got = await wait_rows(
        s, url, lambda r: len(r) == 1 and sum(x["in_flight"] for x in r[0]["runners"]) == 2
    )
    b = await asyncio.wait_for(b_task, 60)
    assert b.status == 200
    assert "response" in json.loads(await b.content.readline())
    a.close()
    b.close()
    (row,) = got
    assert row["name"] == model and row["in_flight"] == 2
    return row["runners"]


async def test_a_replica_on_the_second_simulated_gpu(tmp_path, session):
    policy = tmp_path / "policy.toml"
    policy.write_text('[models."hot:latest"]\nreplicas = 2\n')
    gpus = gpus_env(("Sim A", 24, 24), ("Sim B", 24, 24))
    with start_daemon(tmp_path, **gpu_env(gpus, CORRAL_POLICY=str(policy))) as d:
        m = await create_virtual(session, d, tmp_path, "hot", 8)
        runners = await two_streams_two_runners(session, d.url, m)
        assert [r["replica"] for r in runners] == [False, True]
        assert sorted(r["gpus"][0] for r in runners) == ["0", "1"]  # the other GPU first
        assert runners[0]["pid"] != runners[1]["pid"]
        assert [r["in_flight"] for r in runners] == [1, 1]
        (row,) = await rows(session, d.url)
        assert {g["id"] for g in row["gpus"]} == {"0", "1"}
        assert "reason=replica" in d.log_text() or '"reason": "replica"' in d.log_text()


async def test_two_real_tiny_runners_of_one_model(tmp_path, session):
    policy = tmp_path / "policy.toml"
    policy.write_text('[models."tiny*"]\nreplicas = 2\n')
    with start_daemon(tmp_path, CORRAL_POLICY=str(policy), OLLAMA_NUM_PARALLEL="1") as d:
        m = await create_tiny(session, d.url, tmp_path, "tiny", 1)
        runners = await two_streams_two_runners(session, d.url, m)
        assert len({r["pid"] for r in runners}) == 2
        assert all(r["gpus"] == [] for r in runners)  # the CPU: no GPU here
