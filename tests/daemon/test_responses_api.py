"""POST /v1/responses driven by the real ``openai`` SDK (``client.responses.create``, streamed
and not) against the daemon app with a scripted runner."""

from __future__ import annotations

import json

import openai
import pytest

from tests.daemon.test_api_infer_support import Env, env  # noqa: F401 - fixture
from tests.daemon.test_thinking import ANSWER, THOUGHT, thinking_model

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the weather",
    "parameters": {
        "type": "object",
        "required": ["city"],
        "properties": {"city": {"type": "string"}},
    },
}


async def test_create_text(env: Env) -> None:
    r = await env.openai.responses.create(
        model="chatml", input="Hi", instructions="Be brief.", max_output_tokens=20, temperature=0.3
    )
    assert r.object == "response" and r.status == "completed" and r.id.startswith("resp_")
    assert r.output_text == "Hello, world"
    assert [o.type for o in r.output] == ["message"]
    assert r.usage.output_tokens == 3 and r.usage.input_tokens > 0
    req = env.runner.requests[-1]
    assert req.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (req.options.num_predict, req.options.temperature) == (20, 0.3)
    # cut by max_output_tokens: Ollama's answer is still completed (the Agents SDK fails an
    # incomplete one), streamed or not
    env.runner.script.done_reason = "length"
    r = await env.openai.responses.create(model="chatml", input="Hi", max_output_tokens=3)
    assert r.status == "completed" and r.incomplete_details is None
    assert r.output[0].status == "completed" and r.output_text == "Hello, world"
    events = [
        e
        async for e in await env.openai.responses.create(
            model="chatml", input="Hi", max_output_tokens=3, stream=True
        )
    ]
    assert events[-1].type == "response.completed" and "response.incomplete" not in {
        e.type for e in events
    }
    assert events[-1].response.status == "completed"
    assert events[-1].response.incomplete_details is None
    env.assert_released()


async def test_input_items_and_tools(env: Env) -> None:
    env.runner.script.chunks = [
        '<tool_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    r = await env.openai.responses.create(
        model="qwen",
        input=[
            {"role": "developer", "content": "You are a weather bot."},
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        ],
        tools=[WEATHER],
    )
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"} and call.call_id
    assert "You are a weather bot." in env.runner.requests[-1].prompt  # developer = system
    env.runner.script.chunks = ["It is sunny."]
    r2 = await env.openai.responses.create(
        model="qwen",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": "get_weather",
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "22C"},
        ],
    )
    assert r2.output_text == "It is sunny."
    prompt = env.runner.requests[-1].prompt
    assert '"arguments": {"city":"Paris"}' in prompt and "<tool_response>\n22C" in prompt


async def test_stream(env: Env) -> None:
    env.runner.script.reply = thinking_model
    stream = await env.openai.responses.create(model="thinker", input="x", stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
    assert (thought, text) == (THOUGHT, ANSWER)
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "message"]
    assert final.output_text == ANSWER and final.output[0].summary[0].text == THOUGHT
    assert kinds.index("response.output_item.done") < kinds.index("response.content_part.added")


async def test_reasoning_effort_and_format(env: Env) -> None:
    env.runner.script.reply = thinking_model
    r = await env.openai.responses.create(model="thinker", input="x", reasoning={"effort": "none"})
    assert [o.type for o in r.output] == ["message"] and r.output_text == ANSWER
    env.runner.script.reply = None
    env.runner.script.chunks = ['{"a": 1}']
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    r = await env.openai.responses.create(
        model="chatml",
        input="x",
        text={"format": {"type": "json_schema", "name": "obj", "schema": schema}},
    )
    assert env.runner.requests[-1].format == schema and json.loads(r.output_text) == {"a": 1}


@pytest.mark.parametrize(
    "body,status,text",
    [
        ({"input": "x"}, 400, "model is required"),
        ({"model": "nope", "input": "x"}, 404, "model 'nope' not found"),
        ({"model": "chatml", "input": "x", "previous_response_id": "resp_1"}, 400, None),
        (
            {"model": "chatml", "input": [{"type": "bogus"}]},
            400,
            'input[0]: unknown input item type: "bogus"',
        ),
        ({"model": "chatml", "input": "x", "reasoning": {"effort": "huge"}}, 400, None),
        ({"model": "chatml", "input": ""}, 400, "input is required"),
    ],
)
async def test_errors(env: Env, body: dict, status: int, text: str | None) -> None:
    got, res, _ = await env.post("/v1/responses", body)
    assert got == status and set(res["error"]) == {"message", "type", "param", "code"}
    if text is not None:
        assert res["error"]["message"] == text
    assert env.runner.requests == []


async def test_sdk_error(env: Env) -> None:
    with pytest.raises(openai.NotFoundError):
        await env.openai.responses.create(model="nope", input="x")
