"""The lean runner HTTP client against a real aiohttp server (what a runner is)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

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


class KeepAliveRace(asyncio.Protocol):
    """A runner whose keep-alive timer fires just as a request comes in on an idle connection:
    it answers the first request of each connection, then closes the connection on the next one
    without reading it (``partial``: after a first line of an answer, a runner that broke in
    the middle of it instead)."""

    connections = 0
    requests: list[int]  # the connection number of each request received

    def __init__(self, partial: bool = False) -> None:
        self.partial = partial
        self.served = 0
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        KeepAliveRace.connections += 1
        self.number = KeepAliveRace.connections

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(rest) < length:
                return
            self.buf = rest[length:]
            KeepAliveRace.requests.append(self.number)
            if self.served:
                if self.partial:
                    self.transport.write(b"HTTP/1.1 200 OK\r\n")
                self.transport.close()
                return
            self.served += 1
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
async def racing() -> AsyncIterator[Callable[[bool], Awaitable[RunnerHTTP]]]:
    servers = []

    async def start(partial: bool = False) -> RunnerHTTP:
        KeepAliveRace.connections, KeepAliveRace.requests = 0, []
        server = await asyncio.get_running_loop().create_server(
            lambda: KeepAliveRace(partial), "127.0.0.1", 0
        )
        servers.append(server)
        return RunnerHTTP("127.0.0.1", server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def ask(client: RunnerHTTP) -> bytes:
    async with await client.request("POST", "/completion", b"{}") as reply:
        assert reply.status == 200
        return await reply.read()


async def test_a_request_the_runner_closed_its_idle_connection_on_goes_again(racing) -> None:
    """The keep-alive race: the request on the kept-alive connection is closed unread; it goes
    again on a fresh connection and is answered (before: a ConnectionError, a 500 to the
    client with "llama runner process has terminated: runner closed the connection")."""
    client = await racing()
    assert await ask(client) == b"ok"
    assert await ask(client) == b"ok"
    assert KeepAliveRace.requests == [1, 1, 2]  # the unread one, then on a fresh connection
    client.close()


async def test_a_broken_answer_or_a_fresh_connection_is_not_tried_again(racing) -> None:
    client = await racing(partial=True)
    assert await ask(client) == b"ok"
    with pytest.raises(ConnectionError):
        await ask(client)  # the runner had begun to answer: it read the request
    assert KeepAliveRace.requests == [1, 1]
    client.close()


async def test_no_timer_fails_a_call_on_a_loop_busy_past_any_timeout(served, monkeypatch) -> None:
    """The flood test's 500s under load ("llama runner process has terminated: Connection
    timeout to host http://127.0.0.1:<port>/completion"): aiohttp's client, which the runner
    calls went through before this client, timed each connect (sock_connect, 10 s). A loop busy
    with a flood for longer than that, on a loaded machine, ran the expired timer in the same
    step as the completed loopback connect, and the request failed. Here an hour passes while
    a connect and its answer are under way: the call still succeeds."""
    server, client = served
    loop = asyncio.get_running_loop()
    real = loop.time
    call = asyncio.ensure_future(client.request("POST", "/echo", b"x"))
    await asyncio.sleep(0)  # the connect is under way
    monkeypatch.setattr(loop, "time", lambda: real() + 3600)
    async with await call as reply:
        assert await reply.read() == b"got:x"
