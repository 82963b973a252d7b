"""POST /v1/messages driven by the real ``anthropic`` SDK (and raw requests for the error and
event shapes) against the daemon app with a scripted runner."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import msgspec
import pytest

from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture
from tests.daemon.test_thinking import ANSWER, THOUGHT, thinking_model

WEATHER = {
    "name": "get_weather",
    "description": "Get the weather",
    "input_schema": {
        "type": "object",
        "required": ["city"],
        "properties": {"city": {"type": "string"}},
    },
}


@pytest.fixture
async def claude(env: Env) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(base_url=env.url, api_key="local", max_retries=0)
    try:
        yield c
    finally:
        await c.close()


async def test_create(env: Env, claude: anthropic.AsyncAnthropic) -> None:
    msg = await claude.messages.create(
        model="chatml",
        max_tokens=50,
        system="Be brief.",
        stop_sequences=["END"],
        messages=[{"role": "user", "content": "Hi"}],
        extra_body={"temperature": 0.2, "top_k": 5},
    )  # sampling fields this SDK dropped
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "Hello, world"
    assert msg.stop_reason == "end_turn" and msg.usage.output_tokens == 3
    assert msg.usage.input_tokens > 0
    req = env.runner.requests[-1]
    assert req.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    o = req.options
    assert (o.num_predict, o.temperature, o.top_k, o.stop) == (50, 0.2, 5, ["END"])
    env.runner.script.done_reason = "length"
    msg = await claude.messages.create(
        model="chatml", max_tokens=3, messages=[{"role": "user", "content": "Hi"}]
    )
    assert msg.stop_reason == "max_tokens"
    env.assert_released()


async def test_stream_events(env: Env, claude: anthropic.AsyncAnthropic) -> None:
    env.runner.script.reply = thinking_model
    async with claude.messages.stream(
        model="thinker",
        max_tokens=100,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "x"}],
    ) as s:
        kinds = [e.type async for e in s]
        final = await s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert (final.content[0].thinking, final.content[1].text) == (THOUGHT, ANSWER)
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    # raw event names and the block order: start/delta/stop per block, indices 0 and 1
    async with env.session.post(
        env.url + "/v1/messages",
        json={
            "model": "thinker",
            "max_tokens": 100,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = await r.text()
    events = [
        (
            e.split("\n")[0].removeprefix("event: "),
            json.loads(e.split("\n")[1].removeprefix("data: ")),
        )
        for e in text.strip().split("\n\n")
    ]
    assert all(name == data["type"] for name, data in events)
    order = [(n, d.get("index")) for n, d in events if n.startswith("content_block_")]
    assert order[0] == ("content_block_start", 0) and order[-1] == ("content_block_stop", 1)
    assert ("content_block_stop", 0) in order
    assert order.index(("content_block_stop", 0)) < order.index(("content_block_start", 1))


async def test_tools_round_trip(env: Env, claude: anthropic.AsyncAnthropic) -> None:
    env.runner.script.chunks = [
        '<tool_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    msg = await claude.messages.create(
        model="qwen",
        max_tokens=64,
        tools=[WEATHER],
        messages=[{"role": "user", "content": "Weather?"}],
    )
    assert msg.stop_reason == "tool_use"
    use = msg.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    # the tool's answer goes back as a tool_result block; the template sees a tool message
    env.runner.script.chunks = ["Sunny in Paris."]
    msg2 = await claude.messages.create(
        model="qwen",
        max_tokens=64,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": use.id,
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": use.id,
                        "content": [{"type": "text", "text": "22C, sunny"}],
                    },
                    {"type": "text", "text": "And so?"},
                ],
            },
        ],
    )
    assert msg2.content[0].text == "Sunny in Paris."
    prompt = env.runner.requests[-1].prompt
    assert "22C, sunny" in prompt and '"arguments": {"city":"Paris"}' in prompt
    assert prompt.index("22C, sunny") < prompt.index("And so?")  # tool result first
    # streamed tool call: one tool_use block with its whole input in one json delta
    env.runner.script.chunks = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    ]
    async with claude.messages.stream(
        model="qwen", max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "x"}]
    ) as s:
        final = await s.get_final_message()
    assert final.content[-1].input == {"city": "Oslo"} and final.stop_reason == "tool_use"


@pytest.mark.parametrize(
    "body,status,etype,text",
    [
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request_error",
            "model is required",
        ),
        (
            {"model": "chatml", "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request_error",
            "max_tokens is required and must be positive",
        ),
        (
            {"model": "chatml", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            400,
            "invalid_request_error",
            "max_tokens is required and must be positive",
        ),
        (
            {"model": "chatml", "max_tokens": 5, "messages": []},
            400,
            "invalid_request_error",
            "messages is required",
        ),
        (
            {"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
            404,
            "not_found_error",
            "model 'nope' not found",
        ),
        (
            {"model": "chatml", "max_tokens": "many", "messages": []},
            400,
            "invalid_request_error",
            None,
        ),
        (
            {
                "model": "chatml",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "tool_use", "name": "f"}]}],
            },
            400,
            "invalid_request_error",
            "tool_use block missing required 'id' field",
        ),
        (
            {
                "model": "chatml",
                "max_tokens": 5,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}
                        ],
                    }
                ],
            },
            400,
            "invalid_request_error",
            "invalid image source type: url. Only base64 images are supported.",
        ),
    ],
)
async def test_errors_in_anthropic_shape(
    env: Env, body: dict, status: int, etype: str, text: str | None
) -> None:
    got, res, _ = await env.post("/v1/messages", body)
    assert got == status and res["type"] == "error" and res["error"]["type"] == etype
    assert res["request_id"].startswith("req_")
    if text is not None:
        assert res["error"]["message"] == text
    assert env.runner.requests == []


async def test_sdk_raises_typed_errors(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as err:
        await claude.messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.body["error"]["message"] == "model 'nope' not found"


async def test_error_mid_stream_is_an_error_event(env: Env) -> None:
    env.runner.script.error_after = 1
    async with env.session.post(
        env.url + "/v1/messages",
        data=msgspec.json.encode(
            {
                "model": "chatml",
                "max_tokens": 5,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            }
        ),
    ) as r:
        assert r.status == 200
        text = await r.text()
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error\n")
    assert json.loads(last.split("\n")[1].removeprefix("data: "))["error"] == {
        "type": "api_error",
        "message": "runner exploded",
    }
    env.assert_released()


async def test_thinking_on_a_model_that_cannot_think_is_ignored(
    env: Env,
    claude: anthropic.AsyncAnthropic,
) -> None:
    msg = await claude.messages.create(
        model="chatml",
        max_tokens=5,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "x"}],
    )
    assert [b.type for b in msg.content] == ["text"]


async def test_count_tokens(env: Env, claude: anthropic.AsyncAnthropic) -> None:
    res = await claude.messages.count_tokens(
        model="chatml", system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    prompt = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert res.input_tokens == len(prompt.encode()) + 1  # the runner's count, BOS included
    assert env.runner.requests == [] and env.supervisor.acquired[-1][0] == "chatml:latest"
    env.assert_released()
    status, body, _ = await env.post(
        "/v1/messages/count_tokens",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 404 and body["type"] == "error"
