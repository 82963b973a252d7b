"""The surfaces today's clients use, against ``corral serve`` with the tiny model: the real
``anthropic`` SDK on /v1/messages, the real ``openai`` SDK on /v1/responses and chat logprobs,
the real ``ollama`` client on thinking and logprobs, streamed and not; the OpenAI Agents SDK on
/v1/responses; token counts through all of them. ``tiny-think`` is the tiny
model with a thinking template that opens ``<think>`` in the prompt: whatever the model writes
is thinking until it closes the tag, and no tag may reach the answer."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import agents
import anthropic
import ollama
import openai
import pytest

from tests.daemon.test_api_infer_support import THINKER
from tests.e2e.conftest import start_daemon
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(240)
TAGS = ("<think>", "</think>")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-surfaces")
    with start_daemon(tmp) as d:
        path = write_tiny_llama(tmp / "tiny.gguf", seed=2)
        with ollama.Client(host=d.url) as c:
            digest = c.create_blob(path)
            c.create(model="tiny", files={"tiny.gguf": digest})
            c.create(model="tiny-think", files={"tiny.gguf": digest}, template=THINKER)
        yield d


@pytest.fixture(scope="module")
def claude(daemon):
    with anthropic.Anthropic(base_url=daemon.url, api_key="local", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def oai(daemon):
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="local", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def client(daemon):
    with ollama.Client(host=daemon.url) as c:
        yield c


def no_tags(*texts: str | None) -> bool:
    return not any(t in (x or "") for x in texts for t in TAGS)


def test_anthropic_messages(claude):
    msg = claude.messages.create(
        model="tiny", max_tokens=6, system="be brief", messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.role == "assistant" and msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 6
    with claude.messages.stream(
        model="tiny", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.content[0].text == text and final.usage.output_tokens == 5
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    # counted by the model's tokenizer: a longer message is more tokens, BOS included
    short = claude.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": "hi"}])
    longer = claude.messages.count_tokens(
        model="tiny", messages=[{"role": "user", "content": "hi there, how are you today?"}]
    )
    assert 2 <= short.input_tokens < longer.input_tokens


def test_anthropic_thinking(claude):
    msg = claude.messages.create(
        model="tiny-think",
        max_tokens=8,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "hi"}],
    )
    kinds = [b.type for b in msg.content]
    assert kinds[0] == "thinking" and msg.content[0].thinking
    assert no_tags(*(getattr(b, "thinking", None) or getattr(b, "text", None) for b in msg.content))


def test_openai_responses(oai):
    r = oai.responses.create(model="tiny", input="hi", instructions="be brief", max_output_tokens=6)
    assert r.status == "completed" and r.output_text and r.usage.output_tokens == 6
    events = list(oai.responses.create(model="tiny", input="hi", max_output_tokens=5, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output_text == text


def test_thinking_native_and_v1(client, oai):
    """Thinking is on by default for a thinking-capable model; the prompt opens <think>, so
    the model's words are thinking, and no tag reaches either field."""
    r = client.chat(
        model="tiny-think", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 8}
    )
    assert r.message.thinking and no_tags(r.message.thinking, r.message.content)
    parts = list(
        client.generate(model="tiny-think", prompt="hi", stream=True, options={"num_predict": 8})
    )
    thinking = "".join(p.thinking or "" for p in parts)
    assert thinking and no_tags(thinking, "".join(p.response for p in parts))
    c = oai.chat.completions.create(
        model="tiny-think", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
    )
    reasoning = c.choices[0].message.model_extra.get("reasoning")
    assert reasoning and no_tags(reasoning, c.choices[0].message.content)
    off = client.chat(
        model="tiny-think",
        think=False,
        options={"num_predict": 4},
        messages=[{"role": "user", "content": "hi"}],
    )
    assert not off.message.thinking and off.message.content


def test_logprobs(client, oai):
    r = client.generate(
        model="tiny", prompt="hello", logprobs=True, top_logprobs=3, options={"num_predict": 6}
    )
    assert len(r.logprobs) == r.eval_count == 6
    for lp in r.logprobs:
        tops = [t.logprob for t in lp.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert lp.logprob <= tops[0] + 1e-9 and lp.logprob <= 0
    assert "".join(lp.token for lp in r.logprobs) == r.response
    c = oai.chat.completions.create(
        model="tiny",
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert len(c.choices[0].logprobs.content) == 4
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt="x", logprobs=True, top_logprobs=21)
    assert err.value.status_code == 400


def test_agents_sdk_reply_cut_by_max_tokens(daemon):
    """The OpenAI Agents SDK on /v1/responses: an agent whose reply reaches max_tokens gets its
    text (as from Ollama: status completed), streamed or not, instead of ModelBehaviorError."""
    agents.set_tracing_disabled(True)  # traces go to OpenAI's servers
    client = openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key="local", max_retries=0)
    agent = agents.Agent(
        name="brief",
        instructions="be brief",
        model=agents.OpenAIResponsesModel(model="tiny", openai_client=client),
        model_settings=agents.ModelSettings(max_tokens=5),
    )

    async def run() -> tuple[str, str, int]:
        try:
            result = await agents.Runner.run(agent, "hi")
            streamed = agents.Runner.run_streamed(agent, "hi")
            deltas = [
                e.data.delta
                async for e in streamed.stream_events()
                if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
            ]
            assert streamed.final_output == "".join(deltas)
            return result.final_output, streamed.final_output, result.context_wrapper.usage
        finally:
            await client.close()

    text, streamed_text, usage = asyncio.run(run())
    assert text and streamed_text and usage.output_tokens == 5


def test_prompt_tokens_count_the_whole_prompt_with_the_cached_part_apart(daemon, oai, claude):
    """The same chat twice: the whole prompt is counted both times (Ollama's prompt_eval_count);
    the second time all of it but the last token came from the prompt cache, which each API
    reports in its own field."""
    messages = [{"role": "user", "content": "count the tokens of this chat, all of them"}]
    first, again = (
        oai.chat.completions.create(model="tiny", max_tokens=2, messages=messages) for _ in range(2)
    )
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 5
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    body = {"model": "tiny", "messages": messages, "stream": False, "options": {"num_predict": 2}}
    native = [
        json.loads(
            urllib.request.urlopen(
                urllib.request.Request(daemon.url + "/api/chat", data=json.dumps(body).encode()),
                timeout=60,
            ).read()
        )
        for _ in range(2)
    ]
    assert native[0]["prompt_eval_count"] == native[1]["prompt_eval_count"] > 5
    assert native[1]["prompt_eval_cached_count"] == native[1]["prompt_eval_count"] - 1
    with ollama.Client(host=daemon.url) as c:
        assert c.chat(**body).prompt_eval_count == native[1]["prompt_eval_count"]
    # Anthropic's usage splits the prompt: evaluated + read from the cache = the whole
    msgs = [claude.messages.create(model="tiny", max_tokens=2, messages=messages) for _ in "ab"]
    u = msgs[1].usage
    assert (u.input_tokens, u.cache_read_input_tokens) == (1, first.usage.prompt_tokens - 1)
    assert u.cache_creation_input_tokens == 0
    u0 = msgs[0].usage
    assert u0.input_tokens + u0.cache_read_input_tokens == first.usage.prompt_tokens
