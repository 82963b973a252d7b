"""What the daemon's log says about a request that did not succeed: a 5xx names its reason
(``api.failed``), a client that went away is ``status=499`` in the request line, not a 500
(the flood test's 500s could not be told apart from cancellations in the log, nor explained)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from corral.daemon.api.middleware import request_log
from corral.daemon.api.middleware_errors import error_middleware
from corral.daemon.errors import Busy, Failed


class App:
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        app = web.Application(middlewares=[request_log, error_middleware])
        app.router.add_post("/failed", self.failed)
        app.router.add_post("/busy", self.busy)
        app.router.add_post("/wait", self.wait)
        self.server = TestServer(app, host="127.0.0.1", handler_cancellation=True)

    async def failed(self, request: web.Request) -> web.Response:
        raise Failed("llama runner process has terminated: runner closed the connection")

    async def busy(self, request: web.Request) -> web.Response:
        raise Busy("server busy, please try again.  maximum pending requests exceeded")

    async def wait(self, request: web.Request) -> web.Response:
        self.entered.set()
        await asyncio.Event().wait()  # until the client goes away
        raise AssertionError("not reached")


@pytest.fixture
async def served() -> AsyncIterator[App]:
    app = App()
    await app.server.start_server()
    yield app
    await app.server.close()


def lines(logs: list[dict], event: str) -> list[dict]:
    return [
        {k: v for k, v in e.items() if k not in ("log_level", "event")}
        for e in logs
        if e["event"] == event
    ]


async def test_a_5xx_names_its_reason_and_an_overload_is_not_logged_as_a_failure(served) -> None:
    url = f"http://127.0.0.1:{served.server.port}"
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/failed") as r:
                assert r.status == 500
            async with s.post(url + "/busy") as r:
                assert r.status == 503
    assert lines(logs, "api.failed") == [
        {
            "path": "/failed",
            "status": 500,
            "error": "llama runner process has terminated: runner closed the connection",
        }
    ]
    assert [e["status"] for e in lines(logs, "api.request")] == [500, 503]


async def test_a_client_gone_before_the_answer_is_499_in_the_request_log(served) -> None:
    url = f"http://127.0.0.1:{served.server.port}"
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as s:
            call = asyncio.ensure_future(s.post(url + "/wait"))
            await asyncio.wait_for(served.entered.wait(), 30)
            call.cancel()  # the client closes its connection
            with pytest.raises(asyncio.CancelledError):
                await call
        for _ in range(1000):  # the server notices the closed connection a few steps later
            if lines(logs, "api.request"):
                break
            await asyncio.sleep(0.01)
    assert [(e["path"], e["status"]) for e in lines(logs, "api.request")] == [("/wait", 499)]
    assert lines(logs, "api.failed") == []
