"""The FakeEngine's logprobs and format_after behave as the real engine's: one entry per
generated token (spread over the chunks, the rest in the done record), the fake's true
distribution (uniform over its words, certain JSON), and a grammar that waits for the thinking."""

from __future__ import annotations

import json
import math

import pytest

from corral.runner.fake import JSON_WORDS, WORDS
from tests.runner.conftest import serve
from tests.runner.test_fake_server import fake


@pytest.fixture
def engine():
    e = fake(tokens_per_second=2000)
    yield e
    e.close()


async def _lines(client, **body) -> list[dict]:
    resp = await client.post("/completion", json=body)
    assert resp.status == 200, await resp.text()
    return [json.loads(raw) async for raw in resp.content]


async def test_logprobs_per_token(engine):
    async with serve(engine) as (client, _):
        lines = await _lines(
            client,
            prompt="hi",
            options={"num_predict": 5, "seed": 2},
            logprobs=True,
            top_logprobs=3,
        )
        entries = [e for x in lines for e in x.get("logprobs") or []]
        assert len(entries) == lines[-1]["eval_count"] == 5
        assert "".join(e["token"] for e in entries) == "".join(x["content"] for x in lines)
        for e in entries:
            assert e["logprob"] == pytest.approx(-math.log(len(WORDS)))
            assert [a["token"] for a in e["top_logprobs"]] == WORDS[:3]
        bad = await client.post("/completion", json={"prompt": "x", "top_logprobs": 21})
        assert bad.status == 400
        plain = await _lines(client, prompt="hi", options={"num_predict": 2})
        assert not any(x.get("logprobs") for x in plain)


async def test_format_after_waits_for_the_thinking(engine):
    async with serve(engine) as (client, _):
        # the prompt opened the thinking ("" opening tag): the fake never closes it, no JSON
        lines = await _lines(
            client,
            prompt="x",
            format="json",
            format_after=["", "</think>"],
            options={"num_predict": 6, "seed": 1},
        )
        text = "".join(x["content"] for x in lines)
        assert not any(w in text for w in JSON_WORDS[:2])
        # not opened: the fake's first word is not "<think>", so the grammar starts after it
        lines = await _lines(
            client,
            prompt="x",
            format="json",
            format_after=["<think>", "</think>"],
            options={"num_predict": 6},
        )
        words = [x["content"] for x in lines if x["type"] == "chunk"]
        assert words[0] in WORDS and words[1:] == JSON_WORDS
