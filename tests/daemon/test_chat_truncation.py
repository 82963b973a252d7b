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

import base64
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing

from corral.daemon import gguf_info, model_inputs
from corral.daemon.api import prepare
from corral.daemon.prompt import templates
from corral.daemon.prompt.history import token_bound
from tests.daemon.test_api_robustness import TINY, Env, env  # noqa: F401 - fixture
from tests.daemon.test_templates_library import TOOLS_CHATML
from tests.fixtures.tiny_vision import IMAGE_TOKENS, image_bytes

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


def ollama_fit(messages: list[dict], limit: int, image_tokens: int = 0) -> str:
    """Ollama's loop, newest to oldest, with the fake's tokenizer (UTF-8 bytes); each
    ``[img-N]`` tag costs ``image_tokens`` more."""
    n = len(messages) - 1
    for i in range(n - 1, -1, -1):
        system = [m for m in messages[:i] if m["role"] == "system"]
        text = rendered(system + messages[i:])
        if len(text.encode()) + image_tokens * text.count("[img-") > limit:
            break
        n = i
    return rendered([m for m in messages[:n] if m["role"] == "system"] + messages[n:])


@pytest.fixture
def tokenize_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = prepare.count_tokens

    async def counting(lease: Any, text: str) -> int:
        calls.append(text)
        return await real(lease, text)

    monkeypatch.setattr(prepare, "count_tokens", counting)
    return calls


async def chat(env: Env, messages: list[dict], **extra: Any) -> tuple[int, Any]:
    status, _, body, _ = await env.call(
        "POST",
        "/api/chat",
        {
            "model": TINY,
            "messages": messages,
            "stream": False,
            "options": {"num_ctx": NUM_CTX, "num_predict": 2, "temperature": 0},
            **extra,
        },
    )
    return status, body


async def test_oldest_turns_dropped_system_and_last_kept(
    env: Env,
    tokenize_calls: list[str],
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
    status, _, body, _ = await env.call(
        "POST",
        "/v1/chat/completions",
        {"model": "small", "messages": messages, "max_tokens": 2, "temperature": 0},
    )
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == len(ollama_fit(messages, NUM_CTX - 1).encode())
    await env.idle()


async def test_short_chat_untouched_without_tokenizing(
    env: Env,
    tokenize_calls: list[str],
) -> None:
    messages = [SYSTEM, *HISTORY[-1:]]
    status, body = await chat(env, messages)
    assert status == 200, body
    assert body["prompt_eval_count"] == len(rendered(messages).encode())
    assert tokenize_calls == []
    await env.idle()


async def test_last_message_alone_too_long_is_sent_for_the_runner_to_cut(
    env: Env, tokenize_calls: list[str]
) -> None:
    long = {"role": "user", "content": "cherry " * 40}
    with structlog.testing.capture_logs() as logs:
        status, body = await chat(env, [SYSTEM, *HISTORY[:2], long])
    assert status == 200, body
    # the runner kept num_keep (4) + the tail, half of the rest of the slot left for the answer
    assert body["prompt_eval_count"] == NUM_CTX - (NUM_CTX - 4) // 2
    # the whole prompt and [system, assistant, long] were too long: [system, long] is sent
    assert tokenize_calls == [
        rendered([SYSTEM, *HISTORY[:2], long]),
        rendered([SYSTEM, HISTORY[1], long]),
    ]
    [event] = [e for e in logs if e["event"] == "api.chat_truncated"]
    assert (event["dropped"], event["kept"]) == (2, 1)
    await env.idle()


async def test_truncate_false_sends_everything(env: Env, tokenize_calls: list[str]) -> None:
    status, body = await chat(env, [SYSTEM, *HISTORY], truncate=False)
    assert (status, body) == (400, {"error": "the input length exceeds the context length"})
    assert tokenize_calls == []
    await env.idle()


TEXTS = [
    "",
    "a",
    " ",
    "  \n\t  ",
    "hello the world",
    "Ünïcödé ✓ 日本語 🦙🦙",
    "\x00\x01\x7f",
    "<s></s><unk>",
    "x y z " * 30,
    "🦙 " * 20,
    "\u00a0\u2009\u3000",
    "a" * 300,
]


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
            assert n <= token_bound(text), text
            excess = max(excess, n - len(text.encode()))
        assert excess >= 2  # BOS + the dummy-prefix "▁": bytes alone would not be a bound
    finally:
        e.close()


# ---- images -------------------------------------------------------------------------------------
# The fake runner ignores images (its tokens are the prompt's bytes), so prompt_eval_count shows
# the text the daemon kept; the daemon counts each image as the tiny projector's IMAGE_TOKENS.
# A vision model's context is at least 2048 (Ollama's floor): the first question is padded so
# that the text alone fits it and the text with both images does not.

VISION_CTX = 2048


def with_tags(messages: list[dict]) -> list[dict]:
    """The messages as the daemon renders them: each image's [img-N] tag before its text."""
    out, n = [], 0
    for m in messages:
        if m.get("images"):
            m = {"role": m["role"], "content": f"[img-{n}]{m['content']}"}
            n += 1
        out.append(m)
    return out


def pictures(pad: int, a: str, b: str) -> list[dict]:
    return [
        SYSTEM,
        {"role": "user", "content": "What is this? " + "z" * pad, "images": [a]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And this one?", "images": [b]},
    ]


async def test_images_count_toward_the_context(
    env: Env, tiny_gguf: Path, tiny_projector: Path, tokenize_calls: list[str]
) -> None:
    model = await env.store.write_blob_bytes(tiny_gguf.read_bytes())
    projector = await env.store.write_blob_bytes(tiny_projector.read_bytes())
    await env.store.create(
        "vis",
        files={"tiny.gguf": model.digest, "mmproj.gguf": projector.digest},
        template=TOOLS_CHATML,
    )
    a, b = (base64.b64encode(image_bytes(seed=s)).decode() for s in (1, 2))
    pad = VISION_CTX - 8 - len(rendered(with_tags(pictures(0, a, b))).encode())
    messages = pictures(pad, a, b)
    tagged = with_tags(messages)
    whole = len(rendered(tagged).encode())
    assert whole <= VISION_CTX - 1 < whole + 2 * IMAGE_TOKENS  # the images make it overflow
    expected = ollama_fit(tagged, VISION_CTX - 1, image_tokens=IMAGE_TOKENS)
    assert "[img-1]And this one?" in expected and "Be brief." in expected
    assert "[img-0]" not in expected  # the oldest user message and its image went
    status, _, body, _ = await env.call(
        "POST",
        "/api/chat",
        {
            "model": "vis",
            "messages": messages,
            "stream": False,
            "options": {"num_ctx": VISION_CTX, "num_predict": 2, "temperature": 0},
        },
    )
    assert status == 200, body
    assert body["prompt_eval_count"] == len(expected.encode())
    assert tokenize_calls[0] == rendered(tagged)
    await env.idle()


def test_the_tiny_projectors_image_count_and_ollamas_otherwise(tiny_projector: Path) -> None:
    info = gguf_info.read_info(tiny_projector)
    assert model_inputs.image_tokens(info) == IMAGE_TOKENS == 16
    tiled = SimpleNamespace(metadata={**info.metadata, "clip.vision.image_grid_pinpoints": [1]})
    other = SimpleNamespace(metadata={**info.metadata, "clip.projector_type": "pixtral"})
    for meta in (tiled, other):
        assert model_inputs.image_tokens(meta) == model_inputs.OLLAMA_IMAGE_TOKENS == 768
    gemma3 = {
        "clip.projector_type": "gemma3",
        "clip.vision.image_size": 896,
        "clip.vision.patch_size": 14,
    }  # Gemma 3 4b/12b/27b's projector
    assert model_inputs.image_tokens(SimpleNamespace(metadata=gemma3)) == 256
    merged2 = {**gemma3, "clip.vision.projector.scale_factor": 2}
    assert model_inputs.image_tokens(SimpleNamespace(metadata=merged2)) == 1024
