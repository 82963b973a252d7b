"""Slow and greedy clients (issue 19): none of them can starve the others.

The real app over FakeEngine runners, served as ``serve`` serves it (``GuardedRunner``), with
short limits: headers within 0.5 s of their first byte, a body within 0.5 s, and (where a test
sets it) a cap on connections per client address. The hostile clients here are raw sockets that
dribble bytes; a well-behaved client is served meanwhile. Waits are on the server's answers
(a response, or the connection closing), with generous safety timeouts only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from corral.daemon.api import limits
from corral.daemon.api.limits import CONNECTIONS
from corral.daemon.config import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    FOREVER,
    Config,
)
from tests.daemon.test_api_robustness import TINY, Env, config, open_env
from tests.daemon.test_limits import read_response
from tests.daemon.test_store import tree

SAFETY = 30.0
LIMIT = 0.5  # s: header and body timeouts in these tests
GENERATE = {"model": TINY, "prompt": "hi", "stream": False, "options": {"num_predict": 3}}


def slow_config(**changes: object) -> Config:
    limits: dict[str, object] = {
        "header_timeout": LIMIT,
        "body_timeout": LIMIT,
        "idle_timeout": 60.0,
    }
    return msgspec.structs.replace(config(), **(limits | changes))


@pytest.fixture
async def env(tmp_path: Path, tiny_gguf: Path) -> AsyncIterator[Env]:
    async with open_env(tmp_path, tiny_gguf, slow_config()) as e:
        yield e


async def connect(
    env: Env, local: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", env.client.port, local_addr=(local, 0))


async def dribble(writer: asyncio.StreamWriter, data: bytes, every: float = 0.05) -> None:
    """Write ``data`` a byte at a time, ``every`` seconds apart, until done or the server
    closes the connection."""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)
    except ConnectionError:
        pass


async def served_meanwhile(env: Env, until: asyncio.Future, n: int = 3) -> int:
    """Generate requests from a well-behaved client until ``until`` is done (at least ``n``);
    -> how many were answered 200."""
    ok = 0
    while ok < n or not until.done():
        status, text, _, _ = await env.call("POST", "/api/generate", GENERATE)
        assert status == 200, text
        ok += 1
    return ok


async def test_slowloris_headers_are_cut_and_others_are_served(env: Env) -> None:
    """Twenty connections dribble their headers a byte every 50 ms (each byte well within any
    idle limit): each is closed, without a response, once 0.5 s passed since its first byte
    (the keep-alive limit is 60 s: only the header timer can close them before SAFETY)."""
    head = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 400

    async def slow_client() -> bytes:
        reader, writer = await connect(env)
        sender = asyncio.ensure_future(dribble(writer, head))
        try:
            # b"" once closed; a reset when the close found unread bytes of ours
            return await asyncio.wait_for(reader.read(), SAFETY)
        except ConnectionResetError:
            return b""
        finally:
            sender.cancel()
            writer.close()

    slow = asyncio.ensure_future(asyncio.gather(*(slow_client() for _ in range(20))))
    assert await served_meanwhile(env, slow) >= 3
    assert await slow == [b""] * 20
    await env.alive()


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/api/chat", "native"), ("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")],
)
async def test_a_slow_body_is_a_408_and_others_are_served(env: Env, path: str, shape: str) -> None:
    body = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "hi"}]}).encode()
    reader, writer = await connect(env)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    sender = asyncio.ensure_future(dribble(writer, body, every=0.1))
    answer = asyncio.ensure_future(asyncio.wait_for(read_response(reader), SAFETY))
    try:
        await served_meanwhile(env, answer)
        status, _, data = await answer
    finally:
        sender.cancel()
        writer.close()
    assert status == 408
    err = json.loads(data)
    message = {
        "native": lambda: err["error"],
        "openai": lambda: err["error"]["message"],
        "anthropic": lambda: err["error"]["message"],
    }[shape]()
    assert message == "request body not received within 0.5s"
    await env.idle()
    await env.alive()


async def test_a_blob_upload_may_take_long_while_it_moves_but_not_stall(env: Env) -> None:
    """A blob upload has no size limit, so no total time: one taking 4 x the body timeout is
    stored while its bytes keep coming; one that stops is a 408 and leaves nothing behind."""
    blob = bytes(range(256)) * 8
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), 128):  # 16 pieces, 0.125 s apart: 2 s in all
            yield blob[i : i + 128]
            await asyncio.sleep(LIMIT / 4)

    async with env.client.post(f"/api/blobs/{digest}", data=trickle()) as r:
        assert r.status == 201, await r.text()
    assert env.store.has_blob(digest)

    before = tree(env.root)
    reader, writer = await connect(env)
    writer.write(
        f"POST /api/blobs/sha256:{'1' * 64} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {len(blob)}\r\n\r\n".encode()
        + blob[:100]
    )
    try:
        status, _, data = await asyncio.wait_for(read_response(reader), SAFETY)
    finally:
        writer.close()
    assert status == 408 and "not received" in json.loads(data)["error"]
    await env.idle()
    assert tree(env.root) == before


async def test_a_long_stream_to_a_slow_reader_is_never_cut(tmp_path: Path, tiny_gguf: Path) -> None:
    """A stream lasting many times every limit, read slowly, runs to its done line."""
    cfg = slow_config(idle_timeout=LIMIT, fake_knobs={"load_time": 0.0, "tokens_per_second": 20.0})
    async with open_env(tmp_path, tiny_gguf, cfg) as env:
        body = {"model": TINY, "prompt": "hi", "options": {"num_predict": 40}}
        lines = []
        async with env.client.post("/api/generate", json=body) as r:
            assert r.status == 200
            async for line in r.content:
                lines.append(json.loads(line))
                await asyncio.sleep(0.02)
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 40


async def test_an_idle_keepalive_connection_is_closed(tmp_path: Path, tiny_gguf: Path) -> None:
    async with open_env(tmp_path, tiny_gguf, slow_config(idle_timeout=LIMIT)) as env:
        reader, writer = await connect(env)
        try:
            for _ in range(3):  # back to back: the connection is kept between requests
                writer.write(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                status, headers, _ = await read_response(reader)
                assert status == 200 and headers.get("connection", "").lower() != "close"
            # then idle: closed by the server after the keep-alive limit
            assert await asyncio.wait_for(reader.read(), SAFETY) == b""
        finally:
            writer.close()


async def test_a_greedy_address_gets_429s_and_others_are_served(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """Cap 2 per address: 127.0.0.1 holds two connections with long streams; its third gets a
    429 with Retry-After (a response, not a reset) and is closed after it; 127.0.0.2 is served;
    once one of 127.0.0.1's connections is closed, it may open another."""
    cfg = slow_config(
        max_client_connections=2,
        fake_knobs={"load_time": 0.0, "tokens_per_second": 20.0},
        num_parallel=4,
    )
    async with open_env(tmp_path, tiny_gguf, cfg) as env:
        long = json.dumps({"model": TINY, "prompt": "hi", "options": {"num_predict": 200}})
        held = []
        for _ in range(2):
            reader, writer = await connect(env)
            writer.write(
                f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Length: {len(long)}\r\n\r\n{long}".encode()
            )
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")  # streaming
            held.append(writer)

        reader, writer = await connect(env)
        writer.write(
            b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}"
        )
        status, headers, data = await asyncio.wait_for(read_response(reader), SAFETY)
        assert status == 429 and headers["retry-after"] == "1"
        assert headers["connection"].lower() == "close"
        assert "too many connections from 127.0.0.1" in json.loads(data)["error"]
        assert await asyncio.wait_for(reader.read(), SAFETY) == b""
        writer.close()

        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as s:
            async with s.post(f"{env.url}/api/generate", json=GENERATE) as r:
                assert r.status == 200, await r.text()

        held.pop().close()
        conns = env.client.server.app[CONNECTIONS]

        async def dropped() -> None:
            while conns.per_address["127.0.0.1"] > 1:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(dropped(), SAFETY)
        status, text, _, _ = await env.call("POST", "/api/generate", GENERATE)
        assert status == 200, text
        for w in held:
            w.close()


async def test_without_a_cap_a_flood_from_one_address_gets_ollamas_503s(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    """Off by default: twelve requests at once from one address against one slot and a queue
    of 8 get 200s and Ollama's 503 for the overflow, never a 429."""
    cfg = slow_config(fake_knobs={"load_time": 0.0, "tokens_per_second": 20.0})
    assert cfg.max_client_connections == 0
    async with open_env(tmp_path, tiny_gguf, cfg) as env:
        body = {"model": TINY, "prompt": "hi", "stream": False, "options": {"num_predict": 20}}
        results = await asyncio.gather(
            *(env.call("POST", "/api/generate", body) for _ in range(12))
        )
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 503}, statuses


def test_slow_client_settings() -> None:
    c = Config.from_env({})
    assert (
        (c.header_timeout, c.body_timeout, c.idle_timeout)
        == (
            DEFAULT_HEADER_TIMEOUT,
            DEFAULT_BODY_TIMEOUT,
            DEFAULT_IDLE_TIMEOUT,
        )
        == (10.0, 60.0, 75.0)
    )
    assert c.max_client_connections == 0
    c = Config.from_env(
        {
            "CORRAL_HEADER_TIMEOUT": "5s",
            "CORRAL_BODY_TIMEOUT": "2m",
            "CORRAL_IDLE_TIMEOUT": "0",
            "CORRAL_MAX_CLIENT_CONNECTIONS": "16",
        }
    )
    assert (c.header_timeout, c.body_timeout, c.idle_timeout) == (5.0, 120.0, FOREVER)
    assert c.max_client_connections == 16
    assert Config.from_env({"CORRAL_BODY_TIMEOUT": "soon"}).body_timeout == DEFAULT_BODY_TIMEOUT


class _Inner:
    """aiohttp's request handler as the guard sees it."""

    def __init__(self) -> None:
        self.closed = False

    def connection_made(self, transport: object) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        pass

    def force_close(self) -> None:
        self.closed = True


class _Transport:
    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def _guard(conns: limits.Connections) -> tuple[limits._Guard, _Inner]:
    inner = _Inner()
    guard = limits._Guard(conns, inner)
    guard.connection_made(_Transport())  # type: ignore[arg-type]
    return guard, inner


async def test_a_request_in_whole_is_not_cut_however_late_its_handler_starts() -> None:
    """A daemon busy with a flood may run a connection's header timer before the handler of the
    request that came in on it (uvloop runs due timers before the callbacks queued by the
    step before): once the blank line that ends the headers is in, the timer is off. Before,
    it ran until the handler started, and such a request was closed unanswered."""
    conns = limits.Connections(header_timeout=LIMIT)
    guard, inner = _guard(conns)
    guard.data_received(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r")
    assert guard.timer is not None
    guard.data_received(b"\n{}")  # the blank line cut in two
    assert guard.timer is None
    guard._headers_late()  # what a late timer would do before the handler starts
    assert not inner.closed
    guard.data_received(b"more body")  # the body before the handler: still nothing timed
    assert guard.timer is None
    guard.begin()
    guard.end()  # the next request on the connection is timed again
    guard.data_received(b"GET /api/tags HTTP/1.1\r\n")
    assert guard.timer is not None
    guard.timer.cancel()

    slow, slow_inner = _guard(conns)  # a slowloris: the headers never end
    slow.data_received(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n")
    assert slow.timer is not None
    slow.timer.cancel()
    slow._headers_late()
    assert slow_inner.closed
