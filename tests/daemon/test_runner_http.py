"""The lean runner HTTP client against a real aiohttp server (what a runner is)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from corral.daemon.runner_http import RunnerHTTP


class Server:
    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []  # the client address of each request
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/stream", self.stream)
        app.router.add_post("/hang", self.hang)
        app.router.add_post("/refuse", self.refuse)
        app.router.add_post("/cut", self.cut)
        app.router.add_get("/empty", self.empty)
        self.app = app

    def _seen(self, request: web.Request) -> None:
        self.peers.append(request.transport.get_extra_info("peername"))

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"got:" + await request.read(), content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        n = int(await request.read())
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(b'{"i":%d}\n' % i)
        await resp.write_eof()
        return resp

    async def hang(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first\n")
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return resp

    async def refuse(self, request: web.Request) -> web.Response:
        return web.Response(status=400, body=b'{"error":"bad"}', content_type="application/json")

    async def cut(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"partial")
        request.transport.close()  # the runner died mid-answer
        return resp

    async def empty(self, request: web.Request) -> web.Response:
        return web.Response(body=b"")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, RunnerHTTP]]:
    server = Server()
    ts = TestServer(server.app, host="127.0.0.1", handler_cancellation=True)
    await ts.start_server()
    client = RunnerHTTP("127.0.0.1", ts.port)
    yield server, client
    client.close()
    await ts.close()


async def test_whole_answers_reuse_one_connection(served) -> None:
    server, client = served
    for body in (b'{"a":1}', b"x" * 100_000, b""):
        async with await client.request("POST", "/echo", body) as reply:
            assert reply.status == 200
            assert await reply.read() == b"got:" + body
    async with await client.request("GET", "/empty") as reply:
        assert reply.status == 200 and await reply.read() == b""
    assert len(set(server.peers)) == 1  # keep-alive: every request on the same connection


async def test_a_chunked_answer_arrives_in_pieces_and_whole(served) -> None:
    server, client = served
    async with await client.request("POST", "/stream", b"50") as reply:
        parts = []
        while part := await reply.readany():
            parts.append(part)
        got = b"".join(parts)
    assert got.splitlines() == [b'{"i":%d}' % i for i in range(50)]
    async with await client.request("POST", "/stream", b"0") as reply:
        assert await reply.read() == b""
    assert len(set(server.peers)) == 1


async def test_a_refusal_keeps_its_status_and_body(served) -> None:
    _, client = served
    async with await client.request("POST", "/refuse") as reply:
        assert reply.status == 400 and await reply.read() == b'{"error":"bad"}'


async def test_closing_a_reply_early_closes_the_connection_and_the_runner_sees_it(served) -> None:
    server, client = served
    async with await client.request("POST", "/hang") as reply:
        assert await reply.readany() == b"first\n"
    await asyncio.wait_for(server.cancelled.wait(), 10)
    async with await client.request("POST", "/echo", b"1") as reply:  # a new connection
        assert await reply.read() == b"got:1"


async def test_a_connection_broken_mid_answer_raises_connection_error(served) -> None:
    _, client = served
    with pytest.raises(ConnectionError):
        async with await client.request("POST", "/cut") as reply:
            await reply.read()
    async with await client.request("POST", "/echo", b"2") as reply:
        assert await reply.read() == b"got:2"


async def test_a_connection_the_runner_closed_while_idle_is_not_reused(served) -> None:
    server, client = served
    async with await client.request("POST", "/echo", b"a") as reply:
        await reply.read()
    (conn,) = client._idle
    assert conn.transport is not None
    conn.transport.close()  # as when the runner's keep-alive timeout closes it
    await asyncio.sleep(0)
    async with await client.request("POST", "/echo", b"b") as reply:
        assert await reply.read() == b"got:b"
    assert len(set(server.peers)) == 2


async def test_nothing_listening_is_a_connection_error() -> None:
    client = RunnerHTTP("127.0.0.1", 1)
    with pytest.raises(ConnectionError):
        await client.request("POST", "/completion", b"{}")
    client.close()
