"""Registry traffic honours HTTP_PROXY / NO_PROXY (a pull behind a corporate proxy): a
forwarding proxy on loopback sees every request of a pull when HTTP_PROXY points at it, and
none when NO_PROXY names the registry's host."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from corral.daemon.models.store import Store
from tests.daemon.registry_server import RegistryServer
from tests.daemon.test_registry import publish_tiny, registry

_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "content-encoding",
    "host",
}


class ForwardProxy:
    """A plain-HTTP forward proxy: requests arrive in absolute form and are replayed upstream."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.server = TestServer(app)

    async def forward(self, request: web.Request) -> web.Response:
        self.seen.append(f"{request.method} {request.url}")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                str(request.url),
                headers=headers,
                data=await request.read(),
                allow_redirects=False,
            ) as up,
        ):
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            return web.Response(status=up.status, body=body, headers=out)


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    p = ForwardProxy()
    await p.server.start_server()
    try:
        yield p
    finally:
        await p.server.close()


async def test_pull_goes_through_http_proxy(
    tmp_path: Path, proxy: ForwardProxy, monkeypatch: pytest.MonkeyPatch, tiny_gguf: Path
) -> None:
    async with RegistryServer() as reg:
        publish_tiny(reg, tiny_gguf.read_bytes())
        monkeypatch.setenv("HTTP_PROXY", str(proxy.server.make_url("")).rstrip("/"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        rec = await registry(Store(tmp_path / "a")).pull(f"{reg.host}/library/tiny", insecure=True)
        assert rec.model_path is not None and rec.model_path.read_bytes() == tiny_gguf.read_bytes()
        assert any("/v2/library/tiny/manifests/latest" in s for s in proxy.seen)
        assert any("/blobs/sha256:" in s for s in proxy.seen)
        n = len(proxy.seen)
        monkeypatch.setenv("NO_PROXY", reg.host.split(":")[0])
        await registry(Store(tmp_path / "b")).pull(f"{reg.host}/library/tiny", insecure=True)
        assert len(proxy.seen) == n  # NO_PROXY: straight to the registry
