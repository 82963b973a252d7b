"""Chat-history truncation (Ollama's ``server/prompt.go chatPrompt``): a chat whose rendering does
not fit the runner's slot loses its oldest non-system messages; system messages and the last
message stay.

The app is the real one over the real ``Supervisor`` with FakeEngine runner processes (the
fake's tokens are the prompt's UTF-8 bytes, so ``prompt_eval_count`` is the byte length of the
prompt the runner got). ``count_tokens`` (the daemon's ``/tokenize`` call) is wrapped to count
calls. The byte bound that lets a short chat skip tokenizing is checked against the tiny llama's
byte-fallback SentencePiece tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from corral.daemon import templates
from corral.daemon.api import inference
from tests.daemon.test_api_robustness import TINY, Env, env  # noqa: F401 - fixture
from tests.daemon.test_templates_library import TOOLS_CHATML

NUM_CTX = 128
SYSTEM = {"role": "system", "content": "Be brief."}
HISTORY = [
    {"role": "user", "content": "Tell me about apples and their many colours."},
    {"role": "assistant", "content": "Apples are red, green or yellow."},
    {"role": "user", "content": "And bananas, are they always yellow?"},
    {"role": "assistant", "content": "Mostly; green when unripe."},
    {"role": "user", "content": "What about cherries?"},
]


def rendered(messages: list[dict]) -> str:
    return templates.for_model(TOOLS_CHATML, None).render(messages, None)


def ollama_fit(messages: list[dict], limit: int) -> str:
    """Ollama's loop, newest to oldest, with the fake's tokenizer (UTF-8 bytes)."""
    n = len(messages) - 1
    for i in range(n - 1, -1, -1):
        system = [m for m in messages[:i] if m["role"] == "system"]
        if len(rendered(system + messages[i:]).encode()) > limit:
            break
        n = i
    return rendered([m for m in messages[:n] if m["role"] == "system"] + messages[n:])


@pytest.fixture
def tokenize_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = inference.count_tokens

    async def counting(lease: Any, text: str) -> int:
        calls.append(text)
        return await real(lease, text)

    monkeypatch.setattr(inference, "count_tokens", counting)
    return calls


async def chat(env: Env, messages: list[dict], **extra: Any) -> tuple[int, Any]:
    status, _, body, _ = await env.call("POST", "/api/chat", {
        "model": TINY, "messages": messages, "stream": False,
        "options": {"num_ctx": NUM_CTX, "num_predict": 2, "temperature": 0}, **extra})
    return status, body


async def test_oldest_turns_dropped_system_and_last_kept(env: Env, tokenize_calls: list[str],
                                                         ) -> None:
    messages = [SYSTEM, *HISTORY]
    assert len(rendered(messages).encode()) > NUM_CTX
    expected = ollama_fit(messages, NUM_CTX - 1)
    assert "Be brief." in expected and "cherries" in expected and "apples" not in expected
    status, body = await chat(env, messages)
    assert status == 200, body
    assert body["prompt_eval_count"] == len(expected.encode()) <= NUM_CTX - 1
    # binary search: the whole prompt, then at most ceil(log2(len - 1)) renderings
    assert 1 <= len(tokenize_calls) <= 1 + 3
    assert tokenize_calls[0] == rendered(messages)
    await env.idle()


async def test_openai_chat_is_truncated_too(env: Env) -> None:
    """/v1 has no num_ctx: a Modelfile PARAMETER num_ctx sets it."""
    await env.store.create("small", from_=TINY, parameters={"num_ctx": NUM_CTX})
    messages = [SYSTEM, *HISTORY]
    status, _, body, _ = await env.call("POST", "/v1/chat/completions", {
        "model": "small", "messages": messages, "max_tokens": 2, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(ollama_fit(messages, NUM_CTX - 1).encode())
    await env.idle()


async def test_short_chat_untouched_without_tokenizing(env: Env, tokenize_calls: list[str],
                                                       ) -> None:
    messages = [SYSTEM, *HISTORY[-1:]]
    status, body = await chat(env, messages)
    assert status == 200, body
    assert body["prompt_eval_count"] == len(rendered(messages).encode())
    assert tokenize_calls == []
    await env.idle()


async def test_last_message_alone_too_long_is_sent_for_the_runner_to_cut(
        env: Env, tokenize_calls: list[str]) -> None:
    long = {"role": "user", "content": "cherry " * 40}
    with structlog.testing.capture_logs() as logs:
        status, body = await chat(env, [SYSTEM, *HISTORY[:2], long])
    assert status == 200, body
    assert body["prompt_eval_count"] == NUM_CTX - 1       # the runner kept the tail
    # the whole prompt and [system, assistant, long] were too long: [system, long] is sent
    assert tokenize_calls == [rendered([SYSTEM, *HISTORY[:2], long]),
                              rendered([SYSTEM, HISTORY[1], long])]
    [event] = [e for e in logs if e["event"] == "api.chat_truncated"]
    assert (event["dropped"], event["kept"]) == (2, 1)
    await env.idle()


async def test_truncate_false_sends_everything(env: Env, tokenize_calls: list[str]) -> None:
    status, body = await chat(env, [SYSTEM, *HISTORY], truncate=False)
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})
    assert tokenize_calls == []
    await env.idle()


TEXTS = ["", "a", " ", "  \n\t  ", "hello the world", "Ünïcödé ✓ 日本語 🦙🦙", "\x00\x01\x7f",
         "<s></s><unk>", "x y z " * 30, "🦙 " * 20, "\u00a0\u2009\u3000", "a" * 300]


def test_token_bound_holds_for_byte_fallback_spm(tiny_gguf: Path) -> None:
    pytest.importorskip("llama_cpp")
    from corral.runner.engine import Engine
    from corral.runner.protocol import LaunchSpec

    e = Engine(LaunchSpec(model_path=str(tiny_gguf), num_ctx=256, parallel=1, num_thread=1))
    e.load(lambda p: None)
    try:
        excess = 0
        for text in TEXTS:
            n = len(e.tokenize(text, True, True))
            assert n <= inference.token_bound(text), text
            excess = max(excess, n - len(text.encode()))
        assert excess >= 2   # BOS + the dummy-prefix "▁": bytes alone would not be a bound
    finally:
        e.close()
