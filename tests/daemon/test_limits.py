"""What a client may send (issue 19): bounded bodies.

The app is the real one over FakeEngine runners (``open_env``) with a small ``max_body`` so the
bodies stay small. A body over the limit is a 413 in the route's error shape, from its
``Content-Length`` before a byte of it is read and while reading a chunked one; the store is
unchanged and the server keeps answering. Blob uploads stream to disk past the limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from corral.daemon.config import DEFAULT_MAX_BODY, Config
from tests.daemon.test_api_robustness import TINY, Env, config, open_env
from tests.daemon.test_store import tree

LIMIT = 64 << 10

ROUTES = [
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/create",
    "/api/show",
    "/api/copy",
    "/api/pull",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
]


@pytest.fixture
async def env(tmp_path: Path, tiny_gguf: Path) -> AsyncIterator[Env]:
    cfg = msgspec.structs.replace(config(), max_body=LIMIT)
    async with open_env(tmp_path, tiny_gguf, cfg) as e:
        yield e


def check_413(path: str, body: Any) -> None:
    """The 413 in the route's shape: native, OpenAI's under /v1, Anthropic's for /v1/messages."""
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
        message = body["error"]["message"]
    elif path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
        message = body["error"]["message"]
    else:
        assert set(body) == {"error"}
        message = body["error"]
    assert "request body too large" in message and f"the limit is {LIMIT} bytes" in message


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response: its status, headers (lower-cased names) and body."""
    status_line = await reader.readline()
    assert status_line, "the server closed the connection without a response"
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def raw_exchange(env: Env, head: bytes, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Send ``head`` (and ``body``) on a fresh connection; -> the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.client.port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await read_response(reader)
    finally:
        writer.close()


def head(path: str, length: int, method: str = "POST") -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def padded(obj: dict, size: int) -> bytes:
    """``obj`` as JSON padded with spaces to exactly ``size`` bytes (still valid JSON)."""
    raw = json.dumps(obj).encode()
    return raw + b" " * (size - len(raw))


@pytest.mark.parametrize("path", ROUTES)
async def test_declared_length_over_limit_is_413_before_the_body(env: Env, path: str) -> None:
    """Only the headers are sent: the 413 comes without a byte of the (huge) body."""
    before = tree(env.root)
    status, _, data = await raw_exchange(env, head(path, 200 << 20))
    assert status == 413
    body = json.loads(data)
    check_413(path, body)
    assert "(209715200 bytes)" in json.dumps(body)
    assert tree(env.root) == before
    await env.alive()


@pytest.mark.parametrize("path", ROUTES)
async def test_chunked_body_over_limit_is_413(env: Env, path: str) -> None:
    before = tree(env.root)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "' + TINY.encode() + b'", "prompt": "'
        for _ in range(4 * LIMIT // 4096):
            yield b"x" * 4096

    async with env.client.post(path, data=chunks()) as r:
        assert r.status == 413
        assert r.headers.get("Transfer-Encoding") is None  # a plain JSON error, not a stream
        check_413(path, await r.json())
    assert tree(env.root) == before
    await env.alive()


@pytest.mark.parametrize("chunked", [False, True])
async def test_the_limit_itself_is_allowed(env: Env, chunked: bool) -> None:
    """A body of exactly ``max_body`` bytes is read (here: a model that does not exist, 404);
    one byte more is a 413, with or without Content-Length."""
    for size, status in ((LIMIT, 404), (LIMIT + 1, 413)):
        raw = padded({"model": "absent", "prompt": "hi"}, size)
        if chunked:

            async def one(raw: bytes = raw) -> AsyncIterator[bytes]:
                yield raw

            data: Any = one()
        else:
            data = raw
        async with env.client.post("/api/generate", data=data) as r:
            assert r.status == status, await r.text()


async def test_unknown_model_with_a_huge_body_is_413_not_404(env: Env) -> None:
    status, _, data = await raw_exchange(
        env, head("/api/chat", 200 << 20), b'{"model": "absent", "messages": ['
    )
    assert status == 413
    check_413("/api/chat", json.loads(data))


async def test_blob_upload_is_not_bounded(env: Env) -> None:
    """A blob 16 times the limit streams to disk (201) and is stored whole."""
    blob = bytes(range(256)) * (16 * LIMIT // 256)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(blob), 8192):
            yield blob[i : i + 8192]

    async with env.client.post(f"/api/blobs/{digest}", data=blob) as r:
        assert r.status == 201, await r.text()
    assert env.store.has_blob(digest)
    async with env.client.head(f"/api/blobs/{digest}") as r:
        assert r.status == 200
    # chunked too: a mismatch past the limit is the digest error (400), not a 413
    async with env.client.post(f"/api/blobs/sha256:{'0' * 64}", data=chunks()) as r:
        assert r.status == 400, await r.text()


async def test_small_bodies_still_work(env: Env) -> None:
    status, text, body, _ = await env.call(
        "POST", "/api/generate", {"model": TINY, "prompt": "hi", "stream": False}
    )
    assert status == 200 and body["done"], text


def test_max_body_setting() -> None:
    assert Config.from_env({}).max_body == DEFAULT_MAX_BODY == 32 << 20
    assert Config.from_env({"CORRAL_MAX_BODY": "64MiB"}).max_body == 64 << 20
    assert Config.from_env({"CORRAL_MAX_BODY": "1000"}).max_body == 1000
    assert Config.from_env({"CORRAL_MAX_BODY": "0"}).max_body == 0  # no limit
    assert Config.from_env({"CORRAL_MAX_BODY": "lots"}).max_body == DEFAULT_MAX_BODY


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
async def test_a_runner_refusal_is_not_a_500(tmp_path: Path, tiny_gguf: Path, path: str) -> None:
    """With CORRAL_MAX_BODY above the runner's own 64 MiB (protocol.MAX_REQUEST), a 65 MiB
    prompt passes the daemon's limit and is refused as too large for the runner (413, before
    the request pipe): the client gets that 413, not a 500."""
    cfg = msgspec.structs.replace(config(), max_body=100 << 20)
    async with open_env(tmp_path, tiny_gguf, cfg) as env:
        prompt = "x" * (65 << 20)
        body = {"model": TINY, "prompt": prompt, "stream": False, "raw": True}
        async with env.client.post(path, data=io.BytesIO(json.dumps(body).encode())) as r:
            status, text = r.status, await r.text()
        assert status == 413, text[:300]
        parsed = json.loads(text)
        message = parsed["error"]["message"] if path.startswith("/v1/") else parsed["error"]
        assert "too large for the model runner" in message
        await env.idle()
        await env.alive()
