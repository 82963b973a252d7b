"""Hostile bodies on /v1/messages (and count_tokens) and /v1/responses: every one is a 4xx in the
route's error shape (Anthropic's, OpenAI's), never a 500, and no runner is asked for anything."""

from __future__ import annotations

import pytest

from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture

MSG = {"model": "chatml", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
RESP = {"model": "chatml", "input": "x"}
JUNK = [None, 0, -1, 1.5, "", "x", True, [], {}, [None], [1], {"a": None}, [[[]]]]

CASES: list[tuple[str, bytes | dict]] = [
    ("/v1/messages", b""),
    ("/v1/messages", b"{"),
    ("/v1/messages", b"[1]"),
    ("/v1/responses", b""),
    ("/v1/responses", b"{"),
    ("/v1/responses", b'"x"'),
]
for field in (
    "model",
    "max_tokens",
    "messages",
    "system",
    "stream",
    "temperature",
    "top_k",
    "stop_sequences",
    "tools",
    "thinking",
):
    CASES += [("/v1/messages", {**MSG, field: v}) for v in JUNK]
for field in ("model", "messages", "system", "tools", "thinking"):
    CASES += [("/v1/messages/count_tokens", {**MSG, field: v}) for v in JUNK]
for field in (
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "temperature",
    "reasoning",
    "text",
    "tools",
    "stream",
):
    CASES += [("/v1/responses", {**RESP, field: v}) for v in JUNK]
CASES += [
    ("/v1/messages", {**MSG, "messages": [{"role": "user", "content": [block]}]})
    for block in (
        [],
        "x",
        {"type": "tool_use"},
        {"type": "image"},
        {"type": "image", "source": {"type": "base64", "data": "!!"}},
        {"type": "tool_result", "content": 5},
        {"type": "text", "text": 5},
    )
]
CASES += [
    ("/v1/responses", {**RESP, "input": [item]})
    for item in (
        {},
        {"type": "message", "role": "user", "content": 5},
        {"type": "message", "role": "user", "content": [{"type": "zz"}]},
        {"type": "function_call", "arguments": "{nope"},
        {"type": "input_file"},
        {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]},
    )
]


@pytest.mark.parametrize("path,body", CASES)
async def test_bad_bodies(env: Env, path: str, body: bytes | dict) -> None:
    status, res, text = await (
        env.post(path, raw=body) if isinstance(body, bytes) else env.post(path, body)
    )
    if status == 200:  # a junk value the API legitimately ignores or accepts
        assert res is not None or text.startswith("event:")
        return
    assert 400 <= status < 500, (status, text)
    if path.startswith("/v1/messages"):
        assert res["type"] == "error" and res["error"]["type"].endswith("_error")
    else:
        assert isinstance(res["error"]["message"], str) and res["error"]["message"]
