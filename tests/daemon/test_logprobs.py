"""logprobs / top_logprobs through the daemon: validation, the runner request, and Ollama's and
OpenAI's response shapes, streamed and not (the scripted runner reports one entry per chunk, as
the real runner does when each chunk is one token)."""

from __future__ import annotations

import pytest

from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture

CHUNKS = ["Hello", ",", " world"]
MSG = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/generate", {"model": "chatml", "prompt": "x"}),
        ("/api/chat", {"model": "chatml", "messages": MSG}),
        ("/v1/chat/completions", {"model": "chatml", "messages": MSG, "logprobs": True}),
    ],
)
@pytest.mark.parametrize("top", [-1, 21])
async def test_top_logprobs_out_of_range_is_400(env: Env, path: str, body: dict, top: int) -> None:
    status, res, _ = await env.post(path, {**body, "logprobs": True, "top_logprobs": top})
    assert status == 400
    text = res["error"]["message"] if path.startswith("/v1") else res["error"]
    assert text == "top_logprobs must be between 0 and 20"
    assert env.runner.requests == []


async def test_native_shapes(env: Env) -> None:
    res = await env.ollama.generate(model="chatml", prompt="x", logprobs=True, top_logprobs=3)
    req = env.runner.requests[-1]
    assert (req.logprobs, req.top_logprobs) == (True, 3)
    assert [lp.token for lp in res.logprobs] == CHUNKS
    assert res.logprobs[0].logprob == -0.5
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "stream": False, "logprobs": True}
    )
    assert status == 200 and body["logprobs"][0] == {
        "token": "Hello",
        "logprob": -0.5,
        "bytes": list(b"Hello"),
    }
    status, lines, _ = await env.lines(
        "/api/chat", {"model": "chatml", "messages": MSG, "logprobs": True}
    )
    assert status == 200
    streamed = [e for x in lines for e in x.get("logprobs", [])]
    assert [e["token"] for e in streamed] == CHUNKS and "logprobs" not in lines[-1]
    assert set(streamed[0]) == {"token", "logprob", "bytes"}  # no empty top_logprobs
    # not asked: not computed, not shown
    res = await env.ollama.chat(model="chatml", messages=MSG)
    assert env.runner.requests[-1].logprobs is False and res.logprobs is None


async def test_openai_chat_shapes(env: Env) -> None:
    r = await env.openai.chat.completions.create(
        model="chatml", messages=MSG, logprobs=True, top_logprobs=2
    )
    assert env.runner.requests[-1].top_logprobs == 2
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == CHUNKS and content[2].logprob == -2.5
    assert content[0].top_logprobs == []
    stream = await env.openai.chat.completions.create(
        model="chatml", messages=MSG, logprobs=True, stream=True
    )
    got = [
        t.token
        async for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert got == CHUNKS


async def test_openai_completions_legacy_shape(env: Env) -> None:
    r = await env.openai.completions.create(model="chatml", prompt="x", logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == CHUNKS and lp.token_logprobs == [-0.5, -1.5, -2.5]
    assert lp.text_offset == [0, 5, 6]
    assert env.runner.requests[-1].top_logprobs == 2
    r = await env.openai.completions.create(model="chatml", prompt="x")
    assert r.choices[0].logprobs is None and env.runner.requests[-1].logprobs is False


async def test_openai_n_above_one_is_400(env: Env) -> None:
    status, body, _ = await env.post(
        "/v1/chat/completions", {"model": "chatml", "messages": MSG, "n": 2}
    )
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert "n must be 1" in body["error"]["message"]
    status, body, _ = await env.post("/v1/completions", {"model": "chatml", "prompt": "x", "n": 3})
    assert status == 400
    status, _, _ = await env.post(
        "/v1/chat/completions", {"model": "chatml", "messages": MSG, "n": 1, "stream": False}
    )
    assert status == 200
