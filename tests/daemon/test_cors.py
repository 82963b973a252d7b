"""CORS (Ollama's gin-contrib/cors configuration) and the loopback Host-header check."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from corral.daemon.api.middleware import (
    CORS_HEADERS,
    HostPolicy,
    OriginPolicy,
    add_cors_headers,
    cors_middleware,
    host_middleware,
    is_loopback_bind,
)
from corral.daemon.config import DEFAULT_ORIGINS, parse_origins

# (OLLAMA_ORIGINS, Origin header, allowed): Ollama's answers (gin-contrib/cors v1.7.2 with
# AllowWildcard, envconfig.AllowedOrigins); "" is the defaults alone.
ORIGIN_TABLE = [
    ("", "http://localhost", True),
    ("", "https://localhost", True),
    ("", "http://localhost:3000", True),
    ("", "https://127.0.0.1:8080", True),
    ("", "http://0.0.0.0:1", True),
    ("", "http://localhost:", True),
    ("", "app://anything", True),
    ("", "file://x", True),
    ("", "tauri://localhost", True),
    ("", "vscode-webview://abc", True),
    ("", "vscode-file://vscode-app", True),
    # a wildcard matches only its prefix: "http://localhost:*" is "http://localhost:" + anything
    ("", "http://localhost.evil.example.com", False),
    ("", "http://localhostevil.com", False),
    ("", "http://0.0.0.0.nip.io", False),
    ("", "https://127.0.0.1.evil.com", False),
    ("", "http://127.0.0.10", False),
    ("", "http://127.0.0.2", False),
    ("", "https://evil.com", False),
    ("", "null", False),
    ("", "http://evil.com/http://localhost", False),
    ("", "HTTP://LOCALHOST", False),  # the request's Origin is compared as sent
    ("", "chrome-extension://abc", False),
    ("", "appx://x", False),
    # user entries without "*": exact, case-insensitive in the entry, trimmed
    ("https://app.example.com", "https://app.example.com", True),
    ("https://app.example.com", "https://app.example.com.evil.com", False),
    ("https://app.example.com", "https://app.example.co", False),
    ("https://App.Example.com", "https://app.example.com", True),
    ("https://a.example.com, https://b.example.com", "https://b.example.com", True),
    ("http://10.0.0.1", "http://10.0.0.1:80", False),
    # user entries with "*"
    ("https://*.example.com", "https://a.example.com", True),
    ("https://*.example.com", "https://a.b.example.com", True),
    ("https://*.example.com", "https://example.com", False),
    ("https://*.example.com", "https://evil-example.com", False),
    ("https://*.example.com", "https://example.org", False),
    ("https://*.example.com", "https://a.example.com.evil.org", False),
    ("https://app.example.com:*", "https://app.example.com:8443", True),
    ("https://app.example.com:*", "https://app.example.com.evil.org", False),
    ("https://app.example.com*", "https://app.example.com.evil.org", True),  # as in Ollama
    ("*.example.com", "https://a.example.com", True),
    ("*.example.com", "https://example.com", False),
    ("chrome-extension://*", "chrome-extension://abcdef", True),
    ("chrome-extension://*", "moz-extension://abcdef", False),
    (" https://*.example.com", "https://a.example.com", False),  # rules are not trimmed
    ("*", "https://anything.at.all", True),
    ("*", "http://localhost.evil.example.com", True),
]


@pytest.mark.parametrize(("env", "origin", "allowed"), ORIGIN_TABLE)
def test_origin_table(env: str, origin: str, allowed: bool) -> None:
    assert OriginPolicy(parse_origins(env)).allows(origin) is allowed


def test_default_origins_alone_are_the_parsed_defaults() -> None:
    assert parse_origins("") == DEFAULT_ORIGINS


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:11434", True),
        ("localhost:11434", True),
        ("[::1]:11434", True),
        ("10.1.2.3", True),
        ("192.168.0.5:80", True),
        ("0.0.0.0", True),
        ("", True),
        ("myhost", True),
        ("MYHOST:11434", True),
        ("printer.local", True),
        ("x.internal", True),
        ("app.localhost", True),
        ("evil.com", False),
        ("8.8.8.8", False),
        ("myhost.evil.com", False),
    ],
)
def test_host_policy(host: str, allowed: bool) -> None:
    policy = HostPolicy(hostname="myhost", local_ips=frozenset())
    from corral.daemon.api.middleware import _strip_port

    h = _strip_port(host)
    ip = policy.ip_allowed(h)
    assert (ip if ip is not None else policy.name_allowed(h)) is allowed


@pytest.mark.parametrize(
    ("bind", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("192.168.1.2", False),
        (None, False),
    ],
)
def test_loopback_bind(bind: str | None, loopback: bool) -> None:
    assert is_loopback_bind(bind) is loopback


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def stream(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse()
        await r.prepare(request)
        await r.write(b"{}\n")
        return r

    app = web.Application(
        middlewares=[
            cors_middleware(parse_origins("https://app.example.com")),
            host_middleware(HostPolicy(hostname="myhost", local_ips=frozenset())),
        ]
    )
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/ok", ok)
    app.router.add_post("/stream", stream)
    c = TestClient(TestServer(app))
    await c.start_server()
    try:
        yield c
    finally:
        await c.close()


async def test_allowed_origin_gets_headers(client: TestClient) -> None:
    r = await client.get("/ok", headers={"Origin": "https://app.example.com"})
    assert r.status == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert r.headers["Vary"] == "Origin"
    r = await client.post("/stream", headers={"Origin": "http://localhost:5173"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com",
        "http://localhost.evil.example.com",
        "http://localhostevil.com",
        "http://0.0.0.0.nip.io",
    ],
)
async def test_disallowed_origin_is_403(client: TestClient, origin: str) -> None:
    r = await client.get("/ok", headers={"Origin": origin})
    assert r.status == 403 and await r.read() == b""
    assert "Access-Control-Allow-Origin" not in r.headers
    r = await client.post("/stream", headers={"Origin": origin})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await client.options(
        "/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert r.status == 403
    assert "Access-Control-Allow-Origin" not in r.headers
    assert "Access-Control-Allow-Methods" not in r.headers


@pytest.mark.parametrize(
    "origin", ["http://localhost:5173", "https://127.0.0.1:8443", "https://app.example.com"]
)
async def test_allowed_preflight_and_request(client: TestClient, origin: str) -> None:
    r = await client.options(
        "/api/chat", headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == origin
    r = await client.get("/ok", headers={"Origin": origin})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == origin


async def test_allow_all_answers_star() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[cors_middleware(parse_origins("*"))])
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/ok", ok)
    async with TestClient(TestServer(app)) as c:
        r = await c.get("/ok", headers={"Origin": "https://anything.example"})
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in r.headers
        r = await c.options(
            "/ok",
            headers={"Origin": "https://anything.example", "Access-Control-Request-Method": "PUT"},
        )
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_preflight(client: TestClient) -> None:
    r = await client.options(
        "/api/chat",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert r.status == 204
    assert r.headers["Access-Control-Allow-Methods"] == "GET,POST,PUT,PATCH,DELETE,HEAD"
    assert r.headers["Access-Control-Allow-Headers"] == CORS_HEADERS
    assert r.headers["Access-Control-Max-Age"] == "43200"
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


async def test_no_origin_or_same_origin_passes(client: TestClient) -> None:
    r = await client.get("/ok")
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    host = f"{client.host}:{client.port}"
    r = await client.get("/ok", headers={"Origin": f"http://{host}"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.com", 403),
        ("myhost:11434", 200),
        ("localhost", 200),
        ("8.8.8.8", 403),
        ("127.0.0.1:1", 200),
    ],
)
async def test_host_header(client: TestClient, host: str, status: int) -> None:
    for _ in range(2):  # the second time from the middleware's cache of verdicts
        r = await client.get("/ok", headers={"Host": host})
        assert r.status == status


async def test_host_options_is_204(client: TestClient) -> None:
    for _ in range(2):
        r = await client.options("/ok", headers={"Host": "localhost"})
        assert r.status == 204


async def test_preflight_allows_what_browser_clients_send(client: TestClient) -> None:
    """A browser front end using an API key (``X-Api-Key``, as the Anthropic SDK sends it), the
    Anthropic SDK's own headers, a request id or a priority passes the preflight: a browser
    refuses the real request when one requested header is missing from the allowed list."""
    wanted = [
        "x-api-key",
        "anthropic-version",
        "anthropic-dangerous-direct-browser-access",
        "x-request-id",
        "x-corral-priority",
        "authorization",
        "content-type",
        "x-stainless-os",
    ]
    r = await client.options(
        "/v1/messages",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": ",".join(wanted),
        },
    )
    assert r.status == 204
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert [h for h in wanted if h not in allowed] == []


async def test_cross_origin_responses_expose_request_id_and_retry_after(
    client: TestClient,
) -> None:
    for r in (
        await client.get("/ok", headers={"Origin": "https://app.example.com"}),
        await client.post("/stream", headers={"Origin": "http://localhost:5173"}),
    ):
        exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
        assert exposed == {"x-request-id", "retry-after"}
    r = await client.get("/ok")
    assert "Access-Control-Expose-Headers" not in r.headers
