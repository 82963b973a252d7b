"""Runner test helpers: an in-process RunnerServer (aiohttp test server) around an engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from corral.runner.protocol import LaunchSpec
from corral.runner.server import PipeRelay, RunnerServer


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf):
    """The real engine (llama.cpp) on the tiny model, loaded and started, one per test module:
    parallel 4, 256 cells per slot, one thread."""
    pytest.importorskip("llama_cpp")
    from corral.runner.engine import Engine

    e = Engine(
        LaunchSpec(model_path=str(tiny_gguf), num_ctx=256, parallel=4, num_thread=1, num_batch=256)
    )
    e.load(lambda p: None)
    e.start()
    yield e
    e.close()


@asynccontextmanager
async def serve(
    engine: Any, relay: PipeRelay | None = None
) -> AsyncIterator[tuple[TestClient, RunnerServer]]:
    """Serve an already loaded and started engine; handler cancellation on, as in the runner."""
    server = RunnerServer(engine, relay=relay)
    async with TestServer(server.app, handler_cancellation=True) as ts, TestClient(ts) as client:
        yield client, server


async def complete(client: TestClient, **body: Any) -> tuple[list[str], dict]:
    """POST /completion (streaming); return the chunk texts and the final record."""
    resp = await client.post("/completion", json=body)
    assert resp.status == 200, await resp.text()
    chunks: list[str] = []
    async for raw in resp.content:
        line = json.loads(raw)
        if line["type"] == "chunk":
            chunks.append(line["content"])
        else:
            assert line["type"] == "done", line
            return chunks, line
    raise AssertionError("stream ended without a final record")


async def wait_until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition the runner reaches asynchronously (a safety timeout, not a sleep)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)
