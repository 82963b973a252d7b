"""The real ``openai`` SDK against ``corral serve``'s /v1 endpoints, with the tiny llama model."""

from __future__ import annotations

import json

import ollama
import openai
import pytest

from tests.e2e.conftest import start_daemon
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e-openai")
    with start_daemon(tmp) as d:
        path = write_tiny_llama(tmp / "tiny.gguf", seed=2)
        with ollama.Client(host=d.url) as c:
            digest = c.create_blob(path)
            c.create(model="tiny", files={"tiny.gguf": digest})
        yield d


@pytest.fixture(scope="module")
def oai(daemon):
    with openai.OpenAI(base_url=daemon.url + "/v1", api_key="corral") as c:
        yield c


def test_models(oai):
    ids = [m.id for m in oai.models.list().data]
    assert "tiny:latest" in ids
    m = oai.models.retrieve("tiny:latest")
    assert m.id == "tiny:latest" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("missing:latest")


def test_chat_completion(oai):
    r = oai.chat.completions.create(
        model="tiny", max_tokens=6, seed=3, messages=[{"role": "user", "content": "hi"}]
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 6 and r.usage.prompt_tokens > 0


def test_chat_completion_stream_with_usage(oai):
    chunks = list(
        oai.chat.completions.create(
            model="tiny",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "hi"}],
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")


def test_json_response_format(oai):
    """A schema whose every value is bounded: the grammar must end the answer well within
    max_tokens, so it always stops and always parses."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = oai.chat.completions.create(
        model="tiny",
        max_tokens=400,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        messages=[{"role": "user", "content": "json please"}],
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert set(json.loads(r.choices[0].message.content)) == {"ok"}


def test_completions(oai):
    r = oai.completions.create(model="tiny", prompt="once upon", max_tokens=4)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 4


def test_embeddings(oai):
    r = oai.embeddings.create(model="tiny", input=["a", "b c"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 64


def test_error_shape(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    body = err.value.body
    assert isinstance(body, dict) and "message" in body
