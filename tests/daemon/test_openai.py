"""OpenAI-compatible routes with the openai SDK against the scripted runner."""

from __future__ import annotations

import base64
import struct

import openai
import pytest

from tests.daemon.test_api_infer import WEATHER_TOOL
from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture


async def test_chat_completion(env: Env) -> None:
    res = await env.openai.chat.completions.create(
        model="chatml",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        seed=1,
        stop="END",
        response_format={"type": "json_object"},
    )
    assert res.choices[0].message.content == "Hello, world"
    assert res.choices[0].finish_reason == "stop" and res.object == "chat.completion"
    assert res.usage is not None and res.usage.completion_tokens == 3
    assert res.id.startswith("chatcmpl-") and res.system_fingerprint == "fp_ollama"
    req = env.runner.requests[-1]
    assert (req.options.num_predict, req.options.seed, req.options.stop) == (5, 1, ["END"])
    assert (req.options.temperature, req.options.top_p, req.format) == (1.0, 1.0, "json")
    env.assert_released()


async def test_chat_stream_with_usage(env: Env) -> None:
    stream = await env.openai.chat.completions.create(
        model="chatml",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0.2,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, world"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 3
    assert env.runner.requests[-1].options.temperature == 0.2


async def test_chat_tool_calls(env: Env) -> None:
    env.runner.script.chunks = [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}',
        "</tool_call>",
    ]
    res = await env.openai.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == '{"city":"Oslo"}'
    # the assistant's call and the tool result go back in
    await env.openai.chat.completions.create(
        model="qwen",
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.id, "content": "5C"},
        ],
    )
    assert "<tool_response>\n5C\n</tool_response>" in env.runner.requests[-1].prompt
    stream = await env.openai.chat.completions.create(
        model="qwen",
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[WEATHER_TOOL],
        stream=True,
    )
    chunks = [c async for c in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_completions(env: Env) -> None:
    res = await env.openai.completions.create(model="plain", prompt="Once", max_tokens=3)
    assert res.choices[0].text == "Hello, world" and res.object == "text_completion"
    assert env.runner.requests[-1].prompt == "Once"
    stream = await env.openai.completions.create(model="plain", prompt="Once", stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == "Hello, world"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_embeddings(env: Env) -> None:
    res = await env.openai.embeddings.create(
        model="embedder", input=["a", "b"], encoding_format="float"
    )
    assert [d.embedding for d in res.data] == [[0.6, 0.8, 0.0, 0.0]] * 2
    assert res.usage.prompt_tokens == 2
    res = await env.openai.embeddings.create(model="embedder", input="a")  # SDK asks base64
    assert res.data[0].embedding == pytest.approx([0.6, 0.8, 0.0, 0.0])
    status, body, _ = await env.post(
        "/v1/embeddings", {"model": "embedder", "input": "a", "encoding_format": "base64"}
    )
    vec = struct.unpack("<4f", base64.b64decode(body["data"][0]["embedding"]))
    assert vec == pytest.approx((0.6, 0.8, 0.0, 0.0))
    status, body, _ = await env.post("/v1/embeddings", {"model": "embedder", "input": []})
    assert status == 400 and body["error"]["message"] == "invalid input"


async def test_models(env: Env) -> None:
    ids = [m.id async for m in env.openai.models.list()]
    assert "chatml:latest" in ids and "qwen:latest" in ids
    m = await env.openai.models.retrieve("chatml")
    assert m.id == "chatml" and m.owned_by == "library"
    with pytest.raises(openai.NotFoundError) as e:
        await env.openai.models.retrieve("nope")
    assert e.value.body["message"] == "model 'nope' not found"


async def test_errors(env: Env) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        await env.openai.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError) as e2:
        await env.openai.chat.completions.create(model="chatml", messages=[])
    assert e2.value.body["message"] == "[] is too short - 'messages'"
    with pytest.raises(openai.BadRequestError) as e3:
        await env.openai.chat.completions.create(
            model="chatml",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                }
            ],
        )
    assert "image URLs are not currently supported" in e3.value.body["message"]
    env.runner.script.error_after = 1
    stream = await env.openai.chat.completions.create(
        model="chatml", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError, match="runner exploded"):
        async for _ in stream:
            pass


async def test_request_fields_come_from_the_typed_body(env: Env) -> None:
    """The handlers read the body as the schema typed it: max_completion_tokens wins over
    max_tokens unless null (Go's nil pointer), on both routes; a part without a type and a bad
    tool name their field."""
    await env.post(
        "/v1/chat/completions",
        {
            "model": "chatml",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 7,
            "max_completion_tokens": None,
            "stop": ["A", "B"],
            "top_p": 0,
        },
    )
    o = env.runner.requests[-1].options
    assert (o.num_predict, o.stop, o.top_p, o.temperature) == (7, ["A", "B"], 0.0, 1.0)
    await env.post(
        "/v1/completions",
        {"model": "plain", "prompt": "x", "max_tokens": 7, "max_completion_tokens": 2, "top_p": 0},
    )
    o = env.runner.requests[-1].options
    assert (o.num_predict, o.top_p) == (2, 1.0)  # top_p 0 = default on completions
    status, body, _ = await env.post(
        "/v1/chat/completions",
        {"model": "chatml", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
    )
    assert (status, body["error"]["message"]) == (400, "invalid message content type: None")
    status, body, _ = await env.post(
        "/v1/chat/completions",
        {"model": "chatml", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": 1}]},
    )
    assert (status, body["error"]["message"]) == (
        400,
        "invalid request body: Expected `str`, got `int` - at `$.tools[0].type`",
    )
    status, body, _ = await env.post(
        "/v1/chat/completions",
        {"model": "chatml", "messages": [{"role": "user", "content": "x"}], "stop": [1]},
    )
    assert (status, body["error"]["message"]) == (
        400,
        "invalid request body: Expected `str`, got `int` - at `$.stop[0]`",
    )
