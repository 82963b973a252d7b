"""Native inference routes against a scripted runner behind a supervisor stand-in."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from types import SimpleNamespace

import ollama
import pytest

from corral.daemon.api import inference as core
from corral.daemon.api.errors import ApiError
from corral.daemon.errors import Busy, Failed
from corral.daemon.params import RequestOptions
from corral.daemon.prompt.toolcalls import ToolCallParser
from corral.daemon.runner_client import Events, RunnerClient, RunnerLease
from corral.daemon.runner_http import RunnerHTTP
from corral.daemon.runners import RequestPipe
from corral.runner import protocol
from corral.scheduler import QUEUE_FULL_MESSAGE as QUEUE_FULL
from corral.scheduler import Placement, RunnerOptions, RunnerView
from tests.daemon.test_api_infer_support import Env, FakeSupervisor, Lease, env  # noqa: F401 - fixture

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "required": ["city"],
            "properties": {"city": {"type": "string", "description": "The city"}},
        },
    },
}


def client(env: Env) -> ollama.AsyncClient:
    return env.ollama


async def test_generate_stream_with_ollama_client(env: Env) -> None:
    parts = []
    last = None
    async for part in await client(env).generate(model="chatml", prompt="Hi", stream=True):
        parts.append(part.response)
        last = part
    assert "".join(parts) == "Hello, world"
    assert last is not None and last.done and last.done_reason == "stop"
    assert last.eval_count == 3 and last.prompt_eval_count > 0
    assert last.total_duration and last.total_duration > 0 and last.load_duration is not None
    assert last.context and last.context[-3:] == [0, 1, 2]
    # the Modelfile SYSTEM and the template were applied
    assert env.runner.requests[0].prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert env.runner.requests[0].stream is True
    env.assert_released()


async def test_generate_not_streaming(env: Env) -> None:
    res = await client(env).generate(model="chatml", prompt="Hi", system="Be kind.")
    assert res.response == "Hello, world" and res.done
    assert "Be kind." in env.runner.requests[0].prompt
    assert env.runner.requests[0].stream is False
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "stream": False}
    )
    assert status == 200 and list(body)[:5] == [
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
    ]
    assert body["model"] == "chatml" and body["context"]


async def test_ndjson_shape(env: Env) -> None:
    status, lines, ctype = await env.lines("/api/generate", {"model": "chatml", "prompt": "Hi"})
    assert status == 200 and ctype.startswith("application/x-ndjson")
    assert [x["done"] for x in lines] == [False, False, False, True]
    assert lines[0]["model"] == "chatml" and lines[0]["created_at"].endswith("Z")
    assert lines[-1]["response"] == "" and "context" in lines[-1]


async def test_generate_raw_and_context(env: Env) -> None:
    await client(env).generate(model="chatml", prompt="<raw>", raw=True)
    assert env.runner.requests[-1].prompt == "<raw>"
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "raw": True, "stream": False}
    )
    assert "context" not in body
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "raw": True, "system": "s"}
    )
    assert (status, body) == (
        400,
        {"error": "raw mode does not support template, system, or context"},
    )
    await client(env).generate(model="plain", prompt="more", context=[7, 8, 9])
    assert env.runner.requests[-1].tokens == [7, 8, 9]
    assert env.runner.requests[-1].prompt == "more"  # {{ .Prompt }}: no system, verbatim


async def test_generate_template_override_and_errors(env: Env) -> None:
    await client(env).generate(model="plain", prompt="Q", template="[{{ .Prompt }}]")
    assert env.runner.requests[-1].prompt == "[Q]"
    status, body, _ = await env.post(
        "/api/generate", {"model": "plain", "prompt": "Q", "template": "{{ .Prompt "}
    )
    assert status == 400 and body["error"].startswith("template: :1:")  # Ollama: 500


async def test_leaving_the_store_unloads_only_weights_no_model_uses(env: Env) -> None:
    """Delete, or replace by create or copy: the model's runner (keyed by its weights) unloads
    only when no model left in the store has those weights; else it is adopted by one that has.
    "plain" and "chatml" share one GGUF here."""
    c = client(env)
    await c.copy("chatml", "tmpx")
    await c.delete("tmpx")
    await c.create(model="tmpy", from_="chatml", system="a")
    await c.create(model="tmpy", from_="chatml", system="b")  # replaces tmpy
    await c.copy("plain", "tmpy")  # over tmpy
    assert env.supervisor.unloaded == []
    gone = [g for g, _ in env.supervisor.adopted]
    assert gone == ["tmpx:latest", "tmpy:latest", "tmpy:latest"]
    await c.delete("tmpy")
    assert env.supervisor.unloaded == []  # qwen, chatml, plain, thinker still have the weights
    for name in ("qwen", "chatml", "plain", "embedder"):
        await c.delete(name)
    # the embedder's weights are its own; thinker is the last with the others'
    assert env.supervisor.unloaded == ["embedder:latest"]
    await c.delete("thinker")
    assert env.supervisor.unloaded == ["embedder:latest", "thinker:latest"]
    env.assert_released()


async def test_preload_and_unload(env: Env) -> None:
    res = await client(env).generate(model="chatml")
    assert res.done_reason == "load" and res.response == ""
    assert env.supervisor.acquired[-1][0] == "chatml:latest" and not env.runner.requests
    res = await client(env).generate(model="chatml", keep_alive=0)
    assert res.done_reason == "unload" and env.supervisor.unloaded == ["chatml:latest"]
    # even when streaming, the reply is one JSON object
    status, body, _ = await env.post(
        "/api/chat", {"model": "chatml", "messages": [], "keep_alive": 0}
    )
    assert status == 200 and body["done_reason"] == "unload"
    assert body["message"] == {"role": "assistant", "content": ""}
    res2 = await client(env).chat(model="chatml", messages=[])
    assert res2.done_reason == "load" and res2.message.role == "assistant"
    env.assert_released()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (10, 10.0),
        (2.5, 2.5),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        (-1, math.inf),
        ("-1m", math.inf),
        (None, None),
    ],
)
async def test_keep_alive_values(env: Env, value: object, expected: float | None) -> None:
    status, _, _ = await env.post("/api/generate", {"model": "chatml", "keep_alive": value})
    assert status == 200
    assert env.supervisor.acquired[-1][2] == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("300", 'time: missing unit in duration "300"'),
        ("abc", 'time: invalid duration "abc"'),
        (True, "Unsupported type: 'bool'"),
    ],
)
async def test_keep_alive_errors(env: Env, value: object, error: str) -> None:
    status, body, _ = await env.post("/api/generate", {"model": "chatml", "keep_alive": value})
    assert (status, body) == (400, {"error": error})


async def test_options_merge(env: Env) -> None:
    await client(env).generate(
        model="qwen", prompt="x", options={"top_k": 7, "seed": 3.9, "not_an_option": 1}
    )
    o = env.runner.requests[-1].options
    assert (o.temperature, o.top_k, o.seed, o.stop) == (0.1, 7, 3, ["<|im_end|>"])
    await client(env).generate(
        model="qwen", prompt="x", options={"temperature": 0.5, "stop": ["END"]}
    )
    o = env.runner.requests[-1].options
    assert (o.temperature, o.stop, o.top_p) == (0.5, ["END"], 0.9)
    assert env.supervisor.acquired[-1][1] == RequestOptions(
        temperature=0.5, stop=("END",)
    )  # the Modelfile's, overridden: one typed value
    acquired = len(env.supervisor.acquired)
    status, body, _ = await env.post(
        "/api/generate", {"model": "qwen", "prompt": "x", "options": {"top_k": "many"}}
    )
    assert (status, body) == (
        400,
        {"error": 'option "top_k" must be of type integer'},
    )  # Ollama: 500
    assert len(env.supervisor.acquired) == acquired  # refused at the edge, never acquired


async def test_format(env: Env) -> None:
    await client(env).generate(model="chatml", prompt="x", format="json")
    assert env.runner.requests[-1].format == "json"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    await client(env).chat(
        model="chatml", messages=[{"role": "user", "content": "x"}], format=schema
    )
    assert env.runner.requests[-1].format == schema
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "format": "xml"}
    )
    assert status == 400  # Ollama's text with 500; a bad request is the client's
    assert (
        body["error"]
        == 'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object'
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ("/api/generate", {"prompt": "x"}, 404, "model '' not found"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/embed", {"input": "x"}, 404, "model '' not found"),
        (
            "/api/embed",
            {"model": "nope", "input": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        ("/api/embeddings", {"prompt": "x"}, 400, "model is required"),
        ("/api/embed", {"model": "embedder", "input": 3}, 400, "invalid input type"),
        (
            "/api/generate",
            {"model": "chatml", "prompt": "x", "images": ["aGk="]},
            400,
            "registry.ollama.ai/library/chatml:latest does not support vision",
        ),
        (
            "/api/generate",
            {"model": "chatml", "prompt": "x", "suffix": "y"},
            400,
            "registry.ollama.ai/library/chatml:latest does not support insert",
        ),
        (
            "/api/chat",
            {
                "model": "chatml",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER_TOOL],
            },
            400,
            "registry.ollama.ai/library/chatml:latest does not support tools",
        ),
        (
            "/api/generate",
            {"model": "chatml", "prompt": "x", "think": True},
            400,
            '"chatml" does not support thinking',
        ),
        (
            "/api/generate",
            {"model": "chatml", "prompt": "x", "think": "huge"},
            400,
            'invalid think value: "huge" (must be "high", "medium", "low", "max", true, or false)',
        ),
        (
            "/api/generate",
            {"model": "embedder", "prompt": "x"},
            400,
            '"embedder" does not support generate',
        ),
        (
            "/api/chat",
            {"model": "embedder", "messages": [{"role": "user", "content": "x"}]},
            400,
            '"embedder" does not support chat',
        ),
    ],
)
async def test_error_table(env: Env, path: str, body: dict, status: int, error: str) -> None:
    got_status, got, _ = await env.post(path, body)
    assert (got_status, got) == (status, {"error": error})
    assert not env.runner.requests


async def test_bad_bodies(env: Env) -> None:
    status, body, _ = await env.post("/api/generate", raw=b"")
    assert (status, body) == (400, {"error": "missing request body"})
    status, body, _ = await env.post("/api/chat", raw=b"{not json")
    assert status == 400 and "error" in body
    status, body, _ = await env.post("/api/chat", {"model": "chatml", "messages": "hi"})
    assert status == 400 and "messages" in body["error"]
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "images": ["not base64!"]}
    )
    assert (status, body) == (400, {"error": "illegal base64 data at input byte 3"})


async def test_queue_full_and_cancel(env: Env) -> None:
    env.supervisor.fail = Busy(QUEUE_FULL)
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await client(env).generate(model="chatml", prompt="x", stream=True):
            pass
    assert e.value.status_code == 503 and e.value.error == QUEUE_FULL
    env.supervisor.fail = ApiError(499, "request canceled")
    status, body, _ = await env.post(
        "/api/chat", {"model": "chatml", "messages": [{"role": "user", "content": "x"}]}
    )
    assert (status, body) == (499, {"error": "request canceled"})


async def test_error_after_stream_started(env: Env) -> None:
    env.runner.script.error_after = 2
    status, lines, _ = await env.lines(
        "/api/chat", {"model": "chatml", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 200
    assert [x.get("error") for x in lines] == [None, None, "runner exploded"]
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await client(env).generate(model="chatml", prompt="x", stream=True):
            pass
    assert e.value.error == "runner exploded"
    # not streaming: a real status
    status, body, _ = await env.post(
        "/api/generate", {"model": "chatml", "prompt": "x", "stream": False}
    )
    assert (status, body) == (500, {"error": "runner exploded"})
    env.assert_released()


async def http_chunks(env: Env, path: str, body: dict) -> list[bytes]:
    """A streamed answer as the HTTP chunks it arrived in (one per server write)."""
    chunks, part = [], b""
    async with env.session.post(env.url + path, json=body) as r:
        assert r.status == 200
        async for data, end_of_chunk in r.content.iter_chunks():
            part += data
            if end_of_chunk and part:
                chunks.append(part)
                part = b""
    return chunks


async def test_lines_arriving_together_leave_together(env: Env) -> None:
    """Tokens the runner sent in one write (its reader fell behind) reach the client in one
    HTTP chunk, native and OpenAI, not one write and wake-up each."""
    env.runner.script.together = True
    native = await http_chunks(env, "/api/generate", {"model": "chatml", "prompt": "x"})
    assert len(native) == 1 and len(native[0].splitlines()) == 4  # 3 tokens + the final record
    sse = await http_chunks(
        env,
        "/v1/chat/completions",
        {"model": "chatml", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    assert b"".join(sse).count(b"data: ") >= 5
    assert len(sse) <= 2  # the tokens, the finish chunk and [DONE] (may follow on its own)
    env.assert_released()


@pytest.mark.parametrize(
    "path, body, deltas",
    [
        (
            "/v1/messages",
            {"max_tokens": 50, "messages": [{"role": "user", "content": "x"}]},
            b"event: content_block_delta",
        ),
        ("/v1/responses", {"input": "x"}, b"event: response.output_text.delta"),
    ],
)
async def test_events_arriving_together_leave_together(
    env: Env, path: str, body: dict, deltas: bytes
) -> None:
    """The same for the named-event streams of /v1/messages and /v1/responses: the events of
    tokens that arrived together (block starts and stops included) go out in one write."""
    env.runner.script.together = True
    sent = await http_chunks(env, path, {"model": "chatml", "stream": True, **body})
    assert b"".join(sent).count(deltas) == 3
    assert len(sent) == 1
    env.assert_released()


async def test_runner_rejects_before_streaming(env: Env) -> None:
    env.runner.script.status = 400
    env.runner.script.status_error = "the input length exceeds the context length"
    status, body, _ = await env.post("/api/generate", {"model": "chatml", "prompt": "x"})
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})
    env.assert_released()


async def test_chat_stream_and_messages(env: Env) -> None:
    parts = []
    async for part in await client(env).chat(
        model="chatml",
        stream=True,
        messages=[
            {"role": "system", "content": "Sys"},
            {"role": "user", "content": "A"},
            {"role": "assistant", "content": "B"},
            {"role": "user", "content": "C"},
        ],
    ):
        assert part.message.role == "assistant"
        parts.append(part.message.content)
    assert "".join(parts) == "Hello, world"
    # request system replaces the Modelfile SYSTEM
    assert env.runner.requests[-1].prompt == (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nA<|im_end|>\n"
        "<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nC<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    res = await client(env).chat(model="chatml", messages=[{"role": "user", "content": "A"}])
    assert res.message.content == "Hello, world" and res.done_reason == "stop"
    assert env.runner.requests[-1].prompt.startswith("<|im_start|>system\nYou are terse.")
    env.assert_released()


async def test_chat_tool_calls(env: Env) -> None:
    env.runner.script.chunks = [
        "<tool",
        "_call>\n",
        '{"name": "get_weather", ',
        '"arguments": {"city": "Tokyo"}}',
        "\n</tool_call>",
    ]
    res = await client(env).chat(
        model="qwen", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL]
    )
    assert res.message.content == ""
    calls = res.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert calls[0].function.arguments == {"city": "Tokyo"}
    prompt = env.runner.requests[-1].prompt
    assert (
        '<tools>\n{"type":"function","function":{"name":"get_weather","description":'
        '"Get the weather","parameters":{"type":"object","required":["city"],"properties":'
        '{"city":{"type":"string","description":"The city"}}}}}\n</tools>'
    ) in prompt
    # streaming: the call arrives in one chunk with an id; no content leaks
    status, lines, _ = await env.lines(
        "/api/chat",
        {
            "model": "qwen",
            "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [WEATHER_TOOL],
        },
    )
    call_lines = [x for x in lines if x["message"].get("tool_calls")]
    assert len(call_lines) == 1
    call = call_lines[0]["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and len(call["id"]) == 13
    assert call["function"] == {"index": 0, "name": "get_weather", "arguments": {"city": "Tokyo"}}
    assert "".join(x["message"]["content"] for x in lines) == ""
    # tool results go back into the template
    await client(env).chat(
        model="qwen",
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
                ],
            },
            {"role": "tool", "content": "22C", "tool_name": "get_weather"},
        ],
    )
    assert env.runner.requests[-1].prompt.endswith(
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city":"Tokyo"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>tool\n<tool_response>\n22C\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


async def test_chat_plain_text_with_tools(env: Env) -> None:
    env.runner.script.chunks = ["It is ", "sunny."]
    res = await client(env).chat(
        model="qwen", messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL]
    )
    assert res.message.content == "It is sunny." and not res.message.tool_calls


async def test_thinking(env: Env) -> None:
    # the template ends the prompt with <think>: a real model continues inside the thinking
    env.runner.script.chunks = ["Let me", " see</th", "ink>\n\nAnswer", "!"]
    res = await client(env).chat(
        model="thinker", think=True, messages=[{"role": "user", "content": "x"}]
    )
    assert res.message.thinking == "Let me see" and res.message.content == "Answer!"
    assert env.runner.requests[-1].prompt.endswith("<|assistant|><think>")
    res2 = await client(env).generate(model="thinker", prompt="x", think=True)
    assert res2.thinking == "Let me see" and res2.response == "Answer!"


async def test_embed(env: Env) -> None:
    res = await client(env).embed(model="embedder", input=["a", "bc"])
    assert res.embeddings == [[0.6, 0.8, 0.0, 0.0]] * 2 and res.prompt_eval_count == 3
    assert env.supervisor.acquired[-1][3] == "embedding"
    res = await client(env).embed(model="embedder", input="a", dimensions=1)
    assert res.embeddings == [[1.0]]
    status, body, _ = await env.post("/api/embed", {"model": "embedder", "input": []})
    assert (status, body) == (200, {"model": "embedder", "embeddings": []})
    old = await client(env).embeddings(model="embedder", prompt="hello")
    assert old.embedding == [0.6, 0.8, 0.0, 0.0]
    status, body, _ = await env.post("/api/embeddings", {"model": "embedder", "prompt": ""})
    assert (status, body) == (200, {"embedding": []})
    env.runner.script.embed_status = 400
    env.runner.script.embed_error = "the input length exceeds the context length"
    status, body, _ = await env.post(
        "/api/embed", {"model": "embedder", "input": "x", "truncate": False}
    )
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})
    assert env.runner.embeds[-1].truncate is False
    env.assert_released()


async def test_ps(env: Env) -> None:
    assert (await client(env).ps()).models == []
    env.supervisor.records["/m.gguf"] = SimpleNamespace(
        name="chatml:latest", digest="ab", details={"format": "gguf"}
    )
    # the runner was asked for 4096 per slot and reported 4352 (llama.cpp pads): /api/ps shows
    # what the runner has
    env.supervisor.runners = [
        RunnerView(
            runner_id="r1",
            model_key="/m.gguf",
            state="ready",
            options=RunnerOptions(num_ctx=4096),
            placement=Placement(cpu_bytes=10),
            parallel=1,
            in_flight=0,
            queued=0,
            keep_alive=300.0,
            deadline=1000.0 + 86400 * 365 * 4,
            pid=7,
            context_length=4352,
            started_at=0.0,
            ready_at=1.0,
            last_used=1.0,
        )
    ]
    res = await client(env).ps()
    assert res.models[0].model == "chatml:latest" and res.models[0].context_length == 4352
    assert res.models[0].size == 10 and res.models[0].digest == "ab"
    assert res.models[0].expires_at is not None and res.models[0].expires_at.year >= 2030


async def test_unknown_paths_are_json(env: Env) -> None:
    status, body, _ = await env.post("/api/nothing", {})
    assert (status, body) == (404, {"error": "404 page not found"})
    async with env.session.get(env.url + "/api/generate") as r:
        assert r.status == 405 and await r.json() == {"error": "405 method not allowed"}
    async with env.session.get(env.url + "/v1/nothing") as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "not_found_error"


class ScriptedClient(RunnerClient):
    """A runner client whose completion events are ``lines(body)`` (event, more) pairs (no
    HTTP: its other calls are not made)."""

    def __init__(self, lines: Callable[[protocol.CompletionRequest], Events]) -> None:
        self.lines = lines

    def completion(self, body: protocol.CompletionRequest) -> Events:
        return self.lines(body)


class ScriptedLease(Lease):
    """The API tests' lease around a :class:`ScriptedClient`."""

    def __init__(self, lines: Callable[[protocol.CompletionRequest], Events]) -> None:
        self.runner = ScriptedClient(lines)
        self.runner_id, self.n_ctx, self.load_duration = "r1", 4096, 0.0
        self.released = self.out_of_memory_reports = 0


async def test_a_held_delta_goes_out_when_the_queued_events_bring_nothing():
    """Delta.more lets a writer hold a frame for the next one. "Sure" arrives together with the
    start of a tool call, which the parser keeps back; nothing else is queued, so "Sure" must
    come with more=False at once, not wait (held) until the tool call is complete."""
    release = asyncio.Event()
    chunk = protocol.CompletionChunk

    async def lines(body):
        yield chunk(content="Sure"), True
        yield chunk(content='<tool_call>{"name": "get_'), False
        await release.wait()  # the model is still writing its tool call
        yield chunk(content='weather", "arguments": {}}'), False
        yield protocol.CompletionDone(eval_count=3), False

    job = core.Generation(
        None,
        ScriptedLease(lines),
        0.0,
        0,
        protocol.CompletionRequest(prompt="x"),
        tools=ToolCallParser("<tool_call>", [{"function": {"name": "get_weather"}}]),
    )
    events = job.events()
    first = await asyncio.wait_for(anext(events), 5)
    assert (first.content, first.more) == ("Sure", False)
    release.set()
    rest = [ev async for ev in events]
    assert [d.tool_calls[0]["function"]["name"] for d in rest[:-1] if d.tool_calls] == [
        "get_weather"
    ]
    assert isinstance(rest[-1], core.Done)


async def test_deltas_arriving_together_are_marked_to_go_together():
    async def lines(body):
        yield protocol.CompletionChunk(content="a"), True
        yield protocol.CompletionChunk(content="b"), True
        yield protocol.CompletionChunk(content="c"), False
        yield protocol.CompletionDone(eval_count=3), False

    job = core.Generation(
        None, ScriptedLease(lines), 0.0, 0, protocol.CompletionRequest(prompt="x")
    )
    got = [
        (ev.content, ev.more)
        for ev in [ev async for ev in job.events()]
        if isinstance(ev, core.Delta)
    ]
    assert got == [("a", True), ("b", True), ("c", False)]


@pytest.mark.parametrize(
    "error, reported",
    [
        ("CUDA error: out of memory", True),  # Ollama's runtime-OOM rule: every runner unloads
        ("llama_decode failed (1)", False),
    ],
)
async def test_a_runner_out_of_memory_at_run_time_is_reported(error, reported):
    async def lines(body):
        yield protocol.CompletionChunk(content="a"), False
        raise Failed(error)  # the runner client's error for a failed runner

    lease = ScriptedLease(lines)
    job = core.Generation(None, lease, 0.0, 0, protocol.CompletionRequest(prompt="x"))
    seen = []
    with pytest.raises(Failed):
        async for ev in job.events():
            seen.append(ev.content)
    assert seen == ["a"] and lease.out_of_memory_reports == int(reported)


def test_the_fake_leases_are_runner_leases():
    """The API tests drive the api layer with fakes of the supervisor's Lease: they must have
    its face (daemon.runner_client.RunnerLease), as the real one does (test_supervisor)."""

    def unused(data: bytes) -> None:
        raise AssertionError("nothing is sent")

    sup = FakeSupervisor(RunnerHTTP("127.0.0.1", 1), RequestPipe(unused))
    assert isinstance(Lease(sup), RunnerLease)

    async def lines(body):
        yield protocol.CompletionDone(), False

    assert isinstance(ScriptedLease(lines), RunnerLease)
    assert not isinstance(object(), RunnerLease)
