"""Thinking as Ollama 0.33 does it: tags inferred from the template, the opening tag in the
prompt honoured, on by default for thinking-capable models, ``thinking`` (native) / ``reasoning``
(/v1), a format grammar only after the thinking, and a split that does not depend on where the
runner's chunks happen to break. The scripted runner answers like a real thinking model: after a
prompt that opens ``<think>`` it writes the thinking and ``</think>``, never a second opening tag.
"""

from __future__ import annotations

import itertools

import pytest

from corral.daemon.prompt import templates
from corral.daemon.prompt.thinking import ThinkingSplitter
from corral.runner import protocol
from tests.daemon.test_api_infer_support import THINKER, Env, env  # noqa: F401 - fixture
from tests.daemon.test_templates_library import CHATML

THOUGHT, ANSWER = "The user says x. I answer.", "Answer: 42!"


def thinking_model(req: protocol.CompletionRequest) -> list[str]:
    """What a thinking model writes after ``req.prompt``: inside an opened <think> it thinks and
    closes the tag; otherwise it opens the tag itself only when its template asked it to think
    (here: never, the template always opens it), so it just answers."""
    if (req.prompt or "").endswith("<think>"):
        text = f"\n{THOUGHT}</think>\n\n{ANSWER}"
    else:
        text = ANSWER
    # awkward chunk boundaries: inside the tags and inside the whitespace after them
    cuts = sorted({0, len(text)} | {i for i in (1, 9, 27, 30, 31, 33, 34) if i < len(text)})
    return [text[a:b] for a, b in itertools.pairwise(cuts)]


# ---- the splitter --------------------------------------------------------------------------


def _split(chunks: list[str], opened: bool) -> tuple[str, str]:
    sp = ThinkingSplitter("<think>", "</think>")
    if opened:
        sp.add("<think>")
    thinking, content = [], []
    for c in chunks:
        t, x = sp.add(c)
        thinking.append(t)
        content.append(x)
    t, x = sp.flush()
    return "".join(thinking + [t]), "".join(content + [x])


@pytest.mark.parametrize(
    "opened,text,thought",
    [
        (True, f" \n{THOUGHT}</think>\n\n {ANSWER}", THOUGHT),
        # whitespace before the closing tag stays (it streamed before the tag was seen: Ollama's
        # rule)
        (False, f"\n<think>\n{THOUGHT}\n</think>\n\n{ANSWER}", THOUGHT + "\n"),
    ],
)
def test_split_is_the_same_for_every_chunking(opened: bool, text: str, thought: str) -> None:
    """Every way of cutting the output into three chunks gives the same split (a tag or the
    whitespace after it broken over chunks included)."""
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        assert _split([text[:i], text[i:j], text[j:]], opened) == (thought, ANSWER), (i, j)


def test_split_edge_cases() -> None:
    assert _split(["Hello ", "<think> world"], opened=False) == ("", "Hello <think> world")
    assert _split(["  <thi"], opened=False) == ("", "  <thi")  # never completed
    assert _split(["unfinished thought </thi"], opened=True) == ("unfinished thought </thi", "")
    assert _split(["a</think>"], opened=True) == ("a", "")
    assert _split(["a</think>b</think>c"], opened=True) == ("a", "b</think>c")


# ---- tags from templates -------------------------------------------------------------------


def test_tags_are_inferred_from_the_template() -> None:
    assert templates.go_template(THINKER).think_tags() == ("<think>", "</think>")
    assert templates.go_template(CHATML).think_tags() == ("", "")
    # thinking written outside a range over .Messages does not count (Ollama's heuristic)
    assert templates.go_template("{{ .Thinking }}<x>{{ .Prompt }}").think_tags() == ("", "")
    custom = (
        "{{ range .Messages }}{{ if .Thinking }}<|begin_reason|>{{ .Thinking }}"
        "<|end_reason|>{{ end }}{{ .Content }}{{ end }}"
    )
    assert templates.go_template(custom).think_tags() == ("<|begin_reason|>", "<|end_reason|>")
    assert templates.jinja_think_tags("{{ '<think>' }}x{{ '</think>' }}") == ("<think>", "</think>")
    assert templates.jinja_think_tags("{% set c = message.content.split('</think>')[-1] %}") == (
        "<think>",
        "</think>",
    )
    assert templates.jinja_think_tags("{{ messages }}") == ("", "")


# ---- native routes -----------------------------------------------------------------------


async def test_default_on_for_a_thinking_model(env: Env) -> None:
    env.runner.script.reply = thinking_model
    res = await env.ollama.chat(model="thinker", messages=[{"role": "user", "content": "x"}])
    assert env.runner.requests[-1].prompt.endswith("<|assistant|><think>")
    assert (res.message.thinking, res.message.content) == (THOUGHT, ANSWER)
    gen = await env.ollama.generate(model="thinker", prompt="x")
    assert (gen.thinking, gen.response) == (THOUGHT, ANSWER)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
async def test_streamed_thinking_has_no_tags(env: Env, path: str) -> None:
    env.runner.script.reply = thinking_model
    body = {"model": "thinker", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}
    status, lines, _ = await env.lines(path, body)
    assert status == 200
    parts = [x.get("message", x) for x in lines]
    thinking = "".join(p.get("thinking", "") for p in parts)
    content = "".join(p.get("content", p.get("response", "")) for p in parts)
    assert (thinking, content) == (THOUGHT, ANSWER)
    assert len([p for p in parts if p.get("thinking")]) > 1  # it streamed, not batched
    env.assert_released()


async def test_think_false_leaves_the_output_alone(env: Env) -> None:
    env.runner.script.reply = thinking_model
    res = await env.ollama.chat(
        model="thinker", think=False, messages=[{"role": "user", "content": "x"}]
    )
    assert not env.runner.requests[-1].prompt.endswith("<think>")
    assert (res.message.thinking, res.message.content) == (None, ANSWER)


async def test_think_level_reaches_the_template(env: Env) -> None:
    await env.store.create(
        "leveled",
        from_="thinker",
        template=THINKER.replace("<|assistant|>", "<|assistant:{{ .ThinkLevel }}|>"),
    )
    env.runner.script.reply = thinking_model
    res = await env.ollama.chat(
        model="leveled", think="high", messages=[{"role": "user", "content": "x"}]
    )
    assert "<|assistant:high|><think>" in env.runner.requests[-1].prompt
    assert (res.message.thinking, res.message.content) == (THOUGHT, ANSWER)


async def test_no_thinking_without_capability(env: Env) -> None:
    status, body, _ = await env.post(
        "/api/chat",
        {"model": "chatml", "think": True, "messages": [{"role": "user", "content": "x"}]},
    )
    assert (status, body) == (400, {"error": '"chatml" does not support thinking'})
    env.runner.script.chunks = ["<think>not a thinker</think>hi"]
    res = await env.ollama.chat(model="chatml", messages=[{"role": "user", "content": "x"}])
    assert res.message.content == "<think>not a thinker</think>hi"  # nothing to split


async def test_format_applies_after_the_thinking(env: Env) -> None:
    env.runner.script.reply = lambda req: ["hmm", "</think>", '{"a":', " 1}"]
    res = await env.ollama.chat(
        model="thinker", format="json", messages=[{"role": "user", "content": "x"}]
    )
    req = env.runner.requests[-1]
    # the prompt opened the thinking: the grammar waits for the closing tag only
    assert req.format == "json" and req.format_after == ("", "</think>")
    assert (res.message.thinking, res.message.content) == ("hmm", '{"a": 1}')
    await env.ollama.chat(
        model="thinker", format="json", think=False, messages=[{"role": "user", "content": "x"}]
    )
    assert env.runner.requests[-1].format_after is None  # not thinking
    await env.ollama.chat(
        model="chatml", format="json", messages=[{"role": "user", "content": "x"}]
    )
    assert env.runner.requests[-1].format_after is None  # cannot think


# ---- /v1 ---------------------------------------------------------------------------------


async def test_openai_reasoning(env: Env) -> None:
    env.runner.script.reply = thinking_model
    r = await env.openai.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "x"}]
    )
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning"], msg.content) == (THOUGHT, ANSWER)
    stream = await env.openai.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "x"}], stream=True
    )
    reasoning, content = [], []
    async for c in stream:
        if c.choices:
            reasoning.append((c.choices[0].delta.model_extra or {}).get("reasoning") or "")
            content.append(c.choices[0].delta.content or "")
    assert ("".join(reasoning), "".join(content)) == (THOUGHT, ANSWER)
    # a runner chunk "…</think>\n\nAnswer" gives a reasoning chunk, then a content chunk:
    # no chunk carries both (Ollama's split)
    env.runner.script.reply = lambda req: ["Let me see</think>\n\nAnswer!"]
    stream = await env.openai.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "x"}], stream=True
    )
    deltas = [c.choices[0].delta async for c in stream if c.choices]
    assert [((d.model_extra or {}).get("reasoning"), d.content) for d in deltas[:2]] == [
        ("Let me see", None),
        (None, "Answer!"),
    ]
    env.runner.script.reply = thinking_model
    r = await env.openai.chat.completions.create(
        model="thinker", messages=[{"role": "user", "content": "x"}], reasoning_effort="none"
    )
    assert r.choices[0].message.content == ANSWER
    assert "reasoning" not in (r.choices[0].message.model_extra or {})
    assert not env.runner.requests[-1].prompt.endswith("<think>")
