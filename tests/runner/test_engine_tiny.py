"""The real engine (llama.cpp, continuous batching) on the tiny random-weight model.

One engine (parallel 4, 256 cells per slot) serves the whole module; tests check mechanics, not
text quality. Greedy decoding never picks </s> on the tiny model (its output row is zero), so
generations run to num_predict unless a grammar or a stop string ends them.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from corral.runner.common import INPUT_TOO_LONG, PROMPT_TOO_LONG, BadRequest
from corral.runner.protocol import CompletionChunk, CompletionRequest, SamplingOptions
from tests.runner.conftest import complete, serve, wait_until

pytest.importorskip("llama_cpp")

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


async def test_generate_counts_and_context(engine):
    async with serve(engine) as (client, _):
        chunks, done = await complete(
            client, prompt="hello the world", options={**GREEDY, "num_predict": 12}
        )
        assert done["done_reason"] == "length" and done["eval_count"] == 12
        assert done["eval_duration"] > 0 and done["prompt_eval_duration"] > 0
        prompt = (
            await (
                await client.post(
                    "/tokenize", json={"content": "hello the world", "add_special": True}
                )
            ).json()
        )["tokens"]
        assert done["tokens"][: len(prompt)] == prompt and len(done["tokens"]) == len(prompt) + 12
        text = (
            await (
                await client.post("/detokenize", json={"tokens": done["tokens"][len(prompt) :]})
            ).json()
        )["content"]
        assert text == "".join(chunks)


def test_parallel_sequences_share_decode_steps(engine):
    """4 requests on a parallel-4 engine get their tokens from the same llama_decode calls."""
    steps: dict[int, set[int]] = {i: set() for i in range(4)}
    done = threading.Barrier(5, timeout=60)

    def emitter(i: int):
        def emit(ev):
            if isinstance(ev, CompletionChunk):
                steps[i].add(engine.steps)
            else:
                threading.Thread(target=done.wait).start()

        return emit

    for i in range(4):
        engine.submit(
            CompletionRequest(
                prompt=f"the {i} word", options=SamplingOptions(temperature=0, num_predict=150)
            ),
            emitter(i),
        )
    done.wait()
    shared = set.intersection(*steps.values())
    assert len(shared) >= 50, steps


async def test_concurrent_http_streams_interleave(engine):
    async with serve(engine) as (client, _):
        order: list[tuple[int, str]] = []

        async def one(i: int):
            resp = await client.post(
                "/completion",
                json={"prompt": f"say {i}", "options": {**GREEDY, "num_predict": 200}},
            )
            async for raw in resp.content:
                order.append((i, json.loads(raw)["type"]))

        await asyncio.gather(*(one(i) for i in range(4)))
        first_done = next(k for k, (_, t) in enumerate(order) if t == "done")
        assert {i for i, _ in order[:first_done]} == {0, 1, 2, 3}


async def test_cancelled_stream_frees_its_slot(engine):
    async with serve(engine) as (client, _):
        resp = await client.post(
            "/completion", json={"prompt": "forever", "options": {"num_predict": -1}}
        )
        await resp.content.readline()
        await wait_until(lambda: engine.busy() == 1)
        resp.close()
        await wait_until(lambda: engine.busy() == 0)
        _, done = await complete(client, prompt="after", options={**GREEDY, "num_predict": 3})
        assert done["eval_count"] == 3


async def test_stop_string_is_not_emitted(engine):
    async with serve(engine) as (client, _):
        chunks, _ = await complete(
            client, prompt="the stop test", options={**GREEDY, "num_predict": 30}
        )
        text = "".join(chunks)
        stop = text[12:16]
        assert stop.strip(), text
        chunks, done = await complete(
            client, prompt="the stop test", options={**GREEDY, "num_predict": 30, "stop": [stop]}
        )
        assert "".join(chunks) == text[: text.index(stop)]
        assert done["done_reason"] == "stop"


async def test_seed_determinism(engine):
    async with serve(engine) as (client, _):
        opts = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "num_predict": 20}
        a, _ = await complete(client, prompt="random", options={**opts, "seed": 42})
        b, _ = await complete(client, prompt="random", options={**opts, "seed": 42})
        c, _ = await complete(client, prompt="random", options={**opts, "seed": 43})
        assert a == b and a != c


async def test_json_schema_output_parses(engine):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "b": {"type": "boolean"}},
        "required": ["n", "b"],
    }
    async with serve(engine) as (client, _):
        for seed in range(3):
            chunks, done = await complete(
                client,
                prompt="json please",
                format=schema,
                options={"seed": seed, "num_predict": 200},
            )
            assert (
                done["done_reason"] == "stop"
            )  # the grammar completed, then only </s> was allowed
            value = json.loads("".join(chunks))
            assert isinstance(value["n"], int) and isinstance(value["b"], bool)


async def test_json_format_constrains_output(engine):
    """format "json": the random model rarely closes a string, so only the shape is checked here;
    the Gemma e2e test parses a whole "json" answer."""
    async with serve(engine) as (client, _):
        chunks, _ = await complete(
            client, prompt="json please", format="json", options={**GREEDY, "num_predict": 20}
        )
        text = "".join(chunks).lstrip()
        assert text[0] in '{["-0123456789tfn'


async def test_json_schema_forces_multibyte_utf8_across_tokens(engine):
    """The tiny vocabulary has no é/€/😀 pieces: the grammar makes the model spell them byte by
    byte, and the stream must still only carry whole characters."""
    value = "héllo wörld € 😀"
    schema = {"type": "object", "properties": {"w": {"enum": [value]}}, "required": ["w"]}
    async with serve(engine) as (client, _):
        chunks, done = await complete(
            client, prompt="x", format=schema, options={"seed": 2, "num_predict": 300}
        )
        assert json.loads("".join(chunks)) == {"w": value}
        assert all("\ufffd" not in c for c in chunks)
        assert done["eval_count"] > len(value)  # more tokens than characters: bytes were split


async def test_invalid_schema_is_400(engine):
    async with serve(engine) as (client, _):
        r = await client.post(
            "/completion", json={"prompt": "x", "format": {"type": "nonsense-type"}}
        )
        assert r.status == 400


async def test_prompt_cache_second_turn_evaluates_only_new_tokens(engine):
    """prompt_eval_count is the whole prompt every time (Ollama's count, cache_n + prompt_n);
    prompt_eval_cached_count the part the slot's cache held, which was not evaluated."""

    async def count(text: str, special: bool) -> int:
        body = await (
            await client.post("/tokenize", json={"content": text, "add_special": special})
        ).json()
        return len(body["tokens"])

    async with serve(engine) as (client, _):
        turn1 = "the first turn of a chat about water and the earth and people who live near it"
        chunks, done1 = await complete(client, prompt=turn1, options={**GREEDY, "num_predict": 10})
        n1 = await count(turn1, True)
        assert done1["prompt_eval_count"] == n1
        assert 0 <= done1["prompt_eval_cached_count"] < n1
        # a follow-up as text: at least the first turn's prompt is reused
        turn2 = turn1 + "".join(chunks) + " and then a follow up question"
        _, done2 = await complete(client, prompt=turn2, options={**GREEDY, "num_predict": 5})
        assert done2["prompt_eval_count"] == await count(turn2, True)
        assert n1 - 1 <= done2["prompt_eval_cached_count"] < done2["prompt_eval_count"]
        # the same prompt again: all of it but the last token from the cache, still counted
        _, again = await complete(client, prompt=turn2, options={**GREEDY, "num_predict": 5})
        assert again["prompt_eval_count"] == done2["prompt_eval_count"]
        assert again["prompt_eval_cached_count"] == again["prompt_eval_count"] - 1
        # generate's context: the previous tokens + new text; only the new part (and the last
        # generated token, which was sampled but never decoded) is evaluated
        _, done3 = await complete(
            client, tokens=done2["tokens"], prompt=" next", options={**GREEDY, "num_predict": 3}
        )
        assert done3["prompt_eval_count"] == len(done2["tokens"]) + await count(" next", False)
        evaluated = done3["prompt_eval_count"] - done3["prompt_eval_cached_count"]
        assert evaluated == await count(" next", False) + 1


async def test_context_shift_keeps_generating(engine):
    async with serve(engine) as (client, _):
        _, done = await complete(client, prompt="shift", options={**GREEDY, "num_predict": 400})
        assert done["eval_count"] == 400 and done["done_reason"] == "length"
        _, done = await complete(
            client, prompt="no shift", shift=False, options={**GREEDY, "num_predict": 400}
        )
        assert done["done_reason"] == "length" and done["eval_count"] < 256
        _, done = await complete(client, prompt="fill", options={**GREEDY, "num_predict": -2})
        assert done["done_reason"] == "length" and len(done["tokens"]) == 256 + 1


async def test_long_prompt_is_truncated_or_refused(engine):
    words = " ".join(["water"] * 400)
    async with serve(engine) as (client, _):
        _, done = await complete(
            client, prompt=words, options={**GREEDY, "num_predict": 2, "num_keep": 4}
        )
        # Ollama 0.33's cut: the first num_keep tokens and the tail, about half of the rest of
        # the slot left for the answer: 256 - (256 - 4) // 2
        assert done["truncated"] and done["prompt_eval_count"] == 130
        body = {"content": words, "add_special": True}
        full = (await (await client.post("/tokenize", json=body)).json())["tokens"]
        assert done["tokens"][:130] == full[:4] + full[-126:]
        r = await client.post("/completion", json={"prompt": words, "truncate": False})
        assert (r.status, (await r.json())["error"]) == (400, INPUT_TOO_LONG)
        # context shift off: nothing to cut by, Ollama's 400
        r = await client.post("/completion", json={"prompt": words, "shift": False})
        assert (r.status, (await r.json())["error"]) == (400, PROMPT_TOO_LONG)
    with pytest.raises(BadRequest):
        engine.submit(CompletionRequest(tokens=[10**6]), lambda ev: None)


async def test_embeddings_for_several_inputs(engine):
    async with serve(engine) as (client, _):
        body = await (
            await client.post("/embed", json={"input": ["hello world", "water", "hello world"]})
        ).json()
        a, b, a2 = body["embeddings"]
        assert len(a) == 64 and a == a2 and a != b
        assert abs(sum(v * v for v in a) - 1.0) < 1e-4
        assert body["prompt_eval_count"] > 3
        long = " ".join(["water"] * 400)
        r = await client.post("/embed", json={"input": [long], "truncate": False})
        assert r.status == 400 and "exceeds the context length" in (await r.json())["error"]
        body = await (await client.post("/embed", json={"input": [long]})).json()
        assert len(body["embeddings"]) == 1


def test_memory_comes_from_llama_log(engine):
    cpu = engine.memory["CPU"]
    assert cpu.weights > 500_000 and cpu.kv > 0 and cpu.compute > 0
    assert engine.n_ctx == 1024 and engine.n_ctx_per_slot == 256


async def test_penalties_and_top_k_change_sampling(engine):
    async with serve(engine) as (client, _):
        base = {"num_predict": 40, "seed": 5}
        greedy, _ = await complete(client, prompt="loop", options={**base, "temperature": 0})
        top1, _ = await complete(
            client, prompt="loop", options={**base, "temperature": 1.0, "top_k": 1}
        )
        assert top1 == greedy  # top_k 1 is greedy whatever the temperature
        for penalty in (
            {"repeat_penalty": 3.0},
            {"presence_penalty": 5.0},
            {"frequency_penalty": 5.0},
        ):
            other, _ = await complete(
                client, prompt="loop", options={**base, "temperature": 0, **penalty}
            )
            assert other != greedy, penalty


async def test_greedy_takes_argmax_with_llama_greedy_tokens(engine, monkeypatch):
    """A plain greedy chain is sampled with numpy's argmax, not llama_sampler_sample, and gives the
    tokens llama.cpp's own greedy sampler gives (parallel sequences, so rows other than 0)."""
    import corral.runner.engine as engine_mod

    calls = []
    real = engine_mod.llama_cpp.llama_sampler_sample
    monkeypatch.setattr(
        engine_mod.llama_cpp, "llama_sampler_sample", lambda *a: calls.append(1) or real(*a)
    )

    async def run() -> list[list[int]]:
        async with serve(engine) as (client, _):
            outs = await asyncio.gather(
                *(
                    complete(
                        client, prompt=f"argmax {i} test", options={**GREEDY, "num_predict": 25}
                    )
                    for i in range(3)
                )
            )
        return [done["tokens"] for _, done in outs]

    fast = await run()
    assert calls == []
    monkeypatch.setattr(engine_mod.sampling, "greedy", lambda options: False)
    slow = await run()
    assert len(calls) == 3 * 25
    assert fast == slow


async def test_health_reports_kv_cells_of_running_sequences(engine):
    async with serve(engine) as (client, _):
        prompt = await (
            await client.post("/tokenize", json={"content": "count the cells", "add_special": True})
        ).json()
        resp = await client.post(
            "/completion",
            json={"prompt": "count the cells", "options": {**GREEDY, "num_predict": 200}},
        )
        await resp.content.readline()  # decoding: prompt + >= 1 token in KV
        health = await (await client.get("/health")).json()
        assert health["kv_total"] == engine.n_ctx == 4 * 256
        assert len(prompt["tokens"]) <= health["kv_used"] <= len(prompt["tokens"]) + 200
        resp.close()
        await wait_until(lambda: engine.busy() == 0)
        # The finished slot keeps its tokens as prompt cache: not counted as used.
        assert (await (await client.get("/health")).json())["kv_used"] == 0


def _log_softmax_rows(tiny_gguf, tokens: list[int]):
    """In-process reference: llama-cpp-python's own Llama evaluates ``tokens`` and returns the
    log-softmax of every position's logits (float64). Flash attention on, as the engine's
    "auto" resolves on this CPU build (off, the logits differ by ~5e-3), one token per ubatch
    as the engine decodes generated tokens (flash attention over a many-token ubatch differs
    by up to ~1.4e-3 at some positions)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(tiny_gguf),
        n_ctx=256,
        logits_all=True,
        verbose=False,
        n_threads=1,
        flash_attn=True,
        n_batch=1,
        n_ubatch=1,
    )
    try:
        llm.eval(tokens)
        x = np.asarray(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    peak = x.max(axis=1, keepdims=True)
    return x - (peak + np.log(np.exp(x - peak).sum(axis=1, keepdims=True)))


async def test_logprobs_match_an_in_process_computation(engine, tiny_gguf):
    """Each generated token's logprob and top-5 alternatives agree within 1e-3 with the
    log-softmax of the logits llama-cpp-python computes in-process for the same tokens, streamed
    (entries spread over the chunks) and not."""
    opts = {"temperature": 0.9, "seed": 7, "num_predict": 10}
    async with serve(engine) as (client, _):
        resp = await client.post(
            "/completion",
            json={"prompt": "the quick", "options": opts, "logprobs": True, "top_logprobs": 5},
        )
        entries, done = [], None
        async for raw in resp.content:
            line = json.loads(raw)
            entries += line.get("logprobs") or []
            if line["type"] == "done":
                done = line
        resp = await client.post(
            "/completion",
            json={
                "prompt": "the quick",
                "options": opts,
                "stream": False,
                "logprobs": True,
                "top_logprobs": 5,
            },
        )
        whole = await resp.json()
        bad = await client.post(
            "/completion", json={"prompt": "x", "logprobs": True, "top_logprobs": 21}
        )
        assert (
            bad.status == 400
            and "top_logprobs must be between 0 and 20" in (await bad.json())["error"]
        )
    assert done is not None and len(entries) == done["eval_count"] == 10
    assert (
        whole["tokens"] == done["tokens"]
    )  # same seed, same tokens (the 2nd run hits the prompt cache)
    assert [e["token"] for e in whole["logprobs"]] == [e["token"] for e in entries]
    assert [e["logprob"] for e in whole["logprobs"]] == pytest.approx(
        [e["logprob"] for e in entries], abs=1e-3
    )
    tokens = done["tokens"]
    n_prompt = len(tokens) - 10
    ref = _log_softmax_rows(tiny_gguf, tokens)
    for k, e in enumerate(entries):
        pos = n_prompt + k
        row = ref[pos - 1]  # the logits that predicted tokens[pos]
        assert abs(e["logprob"] - row[tokens[pos]]) < 1e-3, (k, e)
        top = sorted(row, reverse=True)[:5]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(top, abs=1e-3)
        assert e["logprob"] <= e["top_logprobs"][0]["logprob"] + 1e-9
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"]


async def test_format_after_waits_for_the_thinking_to_end(engine):
    """With format_after the grammar starts only once the closing tag was generated: the text
    before it is unconstrained, the text after it is JSON. The tiny model's own greedy output
    stands in for the thinking: its first characters play the closing tag."""
    async with serve(engine) as (client, _):
        free, _ = await complete(client, prompt="hello", options={**GREEDY, "num_predict": 8})
        text = "".join(free)
        close = text[:4]
        assert not close.lstrip().startswith("{")
        chunks, done = await complete(
            client,
            prompt="hello",
            format="json",
            format_after=["", close],
            options={**GREEDY, "num_predict": 40},
        )
        out = "".join(chunks)
        assert out.startswith(close)
        rest = out[out.index(close) + len(close) :]
        assert rest.lstrip().startswith("{")  # the grammar took over right after it
        if done["done_reason"] == "stop":
            json.loads(rest)
