"""Thinking with a real model: Gemma 3 270M under a thinking template that opens ``<think>`` in
the prompt (as Qwen 3 / DeepSeek R1 templates do). Whatever Gemma writes after the opening tag
is thinking until it writes ``</think>``; no tag may reach ``thinking`` or the answer, streamed
or not, native or /v1."""

from __future__ import annotations

import ollama
import openai
import pytest

from tests.e2e.conftest import start_daemon

pytestmark = [pytest.mark.gemma, pytest.mark.slow, pytest.mark.timeout(300)]

GEMMA_THINK = """{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}
{{ if .Thinking }}<think>{{ .Thinking }}</think>{{ end }}{{ .Content }}<end_of_turn>
{{ end }}<start_of_turn>model
{{ if .Think }}<think>{{ end }}"""  # noqa: E501 - the template verbatim
TAGS = ("<think>", "</think>")
# greedy, and short enough to end within the answer (the small model then rambles on)
OPTS = {"num_predict": 12, "temperature": 0}
# two worked examples, rendered by the template as <think>…</think>answer turns, so that a
# model without thinking training writes its own thinking and closes the tag
ASK = [
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "thinking": "One plus one makes two.", "content": "2"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "thinking": "Two plus two makes four.", "content": "4"},
    {"role": "user", "content": "What is 3 + 3?"},
]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with (
        start_daemon(
            tmp_path_factory.mktemp("gemma-think"), CORRAL_DEFAULT_MODEL="gemma3:270m"
        ) as d,
        ollama.Client(host=d.url) as c,
    ):
        c.create(
            model="gemma-think",
            from_="gemma3:270m",
            template=GEMMA_THINK,
            parameters={"stop": ["<end_of_turn>"]},
        )
        assert "thinking" in c.show("gemma-think").capabilities
        yield c, d


def clean(*texts: str | None) -> bool:
    return not any(t in (x or "") for x in texts for t in TAGS)


def test_gemma_thinking_native(client):
    c, _ = client
    r = c.chat(model="gemma-think", messages=ASK, options=OPTS)
    assert r.message.thinking.startswith("Three plus three"), r.message
    assert r.message.content and clean(r.message.thinking, r.message.content)
    parts = list(c.chat(model="gemma-think", messages=ASK, stream=True, options=OPTS))
    thinking = "".join(p.message.thinking or "" for p in parts)
    content = "".join(p.message.content for p in parts)
    assert thinking.startswith("Three plus three") and content and clean(thinking, content)


def test_gemma_thinking_v1(client):
    _, d = client
    with openai.OpenAI(base_url=d.url + "/v1", api_key="x") as oai:
        r = oai.chat.completions.create(
            model="gemma-think",
            max_tokens=OPTS["num_predict"],
            temperature=0,
            messages=[  # /v1 calls it reasoning
                {("reasoning" if k == "thinking" else k): v for k, v in m.items()} for m in ASK
            ],
        )
    msg = r.choices[0].message
    reasoning = msg.model_extra.get("reasoning") or ""
    assert reasoning.startswith("Three plus three") and clean(reasoning, msg.content)
