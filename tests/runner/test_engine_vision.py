"""Images through llama.cpp's multimodal library, on the tiny model + tiny projector pair.

The projector (tests/fixtures/tiny_vision.py) turns any image into IMAGE_TOKENS embeddings, so
the counts below are exact: prompt_eval_count = text tokens + 16 per image evaluated.
"""

from __future__ import annotations

import base64
import threading

import pytest

from corral.daemon import gguf_info, model_inputs
from corral.runner.protocol import CompletionChunk, CompletionRequest, LaunchSpec, SamplingOptions
from tests.fixtures.tiny_vision import (
    GEMMA3_IMAGE_TOKENS,
    IMAGE_TOKENS,
    image_bytes,
    write_tiny_projector,
)
from tests.runner.conftest import complete, serve

pytest.importorskip("llama_cpp")
from corral.runner.engine import Engine

GREEDY = {"temperature": 0}
PNG = image_bytes("PNG", seed=1)
B64 = base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def engine(tiny_gguf, tiny_projector):
    e = Engine(
        LaunchSpec(
            model_path=str(tiny_gguf),
            projector_path=str(tiny_projector),
            num_ctx=256,
            parallel=2,
            num_thread=1,
            num_batch=256,
        )
    )
    e.load(lambda p: None)
    e.start()
    yield e
    e.close()


async def _tokens(client, text: str, add_special: bool = True) -> list[int]:
    resp = await client.post("/tokenize", json={"content": text, "add_special": add_special})
    return (await resp.json())["tokens"]


def test_the_daemons_image_count_is_the_runners(engine, tiny_projector):
    """Chat truncation counts images by the projector's metadata: the runner agrees, for any
    image size (the mlp projector resizes first)."""
    want = model_inputs.image_tokens(gguf_info.read_info(tiny_projector))
    for size in ((40, 24), (7, 300), (640, 480)):
        _, spans = engine.vision.tokenize("[img-0]", [image_bytes("PNG", seed=5, size=size)], False)
        assert [s.n_pos for s in spans.values()] == [want]


def test_the_daemons_image_count_for_a_gemma3_projector_is_the_runners(tiny_gguf, tmp_path):
    """Gemma 3's projector pools the patch grid: the daemon's count from its metadata is what
    libmtmd makes, for any image size."""
    projector = write_tiny_projector(tmp_path / "gemma3-mmproj.gguf", kind="gemma3")
    want = model_inputs.image_tokens(gguf_info.read_info(projector))
    assert want == GEMMA3_IMAGE_TOKENS == 4
    e = Engine(
        LaunchSpec(
            model_path=str(tiny_gguf),
            projector_path=str(projector),
            num_ctx=256,
            num_thread=1,
            num_batch=256,
        )
    )
    e.load(lambda p: None)
    e.start()
    try:
        for size in ((40, 24), (7, 300), (640, 480)):
            _, spans = e.vision.tokenize("[img-0]", [image_bytes("PNG", seed=5, size=size)], False)
            assert [s.n_pos for s in spans.values()] == [want]
    finally:
        e.close()


async def test_image_is_evaluated_at_its_marker_and_cached(engine):
    async with serve(engine) as (client, _):
        # a fresh prefix, so that no slot's cache helps the first request
        prompt = "look at the picture [img-0] and write"
        _, first = await complete(
            client, prompt=prompt, images=[B64], options={**GREEDY, "num_predict": 6}
        )
        n_text = len(await _tokens(client, "look at the picture ")) + len(
            await _tokens(client, " and write", False)
        )
        assert first["prompt_eval_count"] == n_text + IMAGE_TOKENS
        assert first["eval_count"] == 6
        # the context holds text tokens only (image cells are not tokens)
        assert all(t >= 0 for t in first["tokens"])
        _, again = await complete(
            client, prompt=prompt, images=[B64], options={**GREEDY, "num_predict": 6}
        )
        # the whole prompt is counted, image cells included; all but its last token was cached
        assert again["prompt_eval_count"] == first["prompt_eval_count"]
        assert again["prompt_eval_cached_count"] == again["prompt_eval_count"] - 1
        _, other = await complete(
            client,
            prompt=prompt,
            images=[base64.b64encode(image_bytes("PNG", seed=2)).decode()],
            options={**GREEDY, "num_predict": 6},
        )
        n_prefix = len(await _tokens(client, "look at the picture "))
        # new image, same prefix: the prefix came from the cache
        assert other["prompt_eval_count"] == first["prompt_eval_count"]
        assert other["prompt_eval_cached_count"] == n_prefix


async def test_the_image_changes_the_output(engine):
    async with serve(engine) as (client, _):
        outs = set()
        for seed in (3, 4, 5):
            img = base64.b64encode(image_bytes("PNG", seed=seed)).decode()
            chunks, _ = await complete(
                client, prompt="[img-0] the", images=[img], options={**GREEDY, "num_predict": 8}
            )
            outs.add("".join(chunks))
        assert len(outs) > 1


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
async def test_other_formats(engine, fmt):
    async with serve(engine) as (client, _):
        img = base64.b64encode(image_bytes(fmt, seed=7)).decode()
        _, done = await complete(
            client, prompt=f"{fmt} [img-0] is", images=[img], options={**GREEDY, "num_predict": 2}
        )
        assert done["prompt_eval_count"] > IMAGE_TOKENS


async def test_prompt_may_end_with_an_image(engine):
    async with serve(engine) as (client, _):
        chunks, done = await complete(
            client,
            prompt="two images [img-1][img-0]",
            images=[B64, base64.b64encode(image_bytes("PNG", seed=9)).decode()],
            options={**GREEDY, "num_predict": 4},
        )
        assert done["eval_count"] == 4 and chunks
        assert done["prompt_eval_count"] >= 2 * IMAGE_TOKENS


@pytest.mark.parametrize(
    "data,text",
    [
        (base64.b64encode(b"not an image at all").decode(), "image: unknown format"),
        (base64.b64encode(PNG[: len(PNG) // 2]).decode(), "image: unknown format"),
        (base64.b64encode(image_bytes("GIF")).decode(), "image: unknown format"),
    ],
)
async def test_bad_image_is_400(engine, data, text):
    async with serve(engine) as (client, _):
        resp = await client.post("/completion", json={"prompt": "x [img-0]", "images": [data]})
        assert resp.status == 400
        assert (await resp.json())[
            "error"
        ] == f"Failed to create new sequence: failed to process inputs: {text}"


async def test_marker_without_image_is_400(engine):
    async with serve(engine) as (client, _):
        resp = await client.post("/completion", json={"prompt": "x [img-1]", "images": [B64]})
        assert resp.status == 400
        assert "invalid image index: 1" in (await resp.json())["error"]


def test_text_sequences_keep_batching_beside_an_image(engine):
    """A text-only generation and an image request on the same engine share decode steps."""
    steps: dict[int, set[int]] = {0: set(), 1: set()}
    done = threading.Barrier(3, timeout=60)
    results: dict[int, object] = {}

    def emitter(i: int):
        def emit(ev):
            if isinstance(ev, CompletionChunk):
                steps[i].add(engine.steps)
            else:
                results[i] = ev
                threading.Thread(target=done.wait).start()

        return emit

    # the image request first (its submit decodes and encodes the image before it is queued);
    # long generations: a tiny-model step takes well under a millisecond, so the second submit
    # may come some steps after the first job started
    engine.submit(
        CompletionRequest(
            prompt="see [img-0] here",
            images=[image_bytes("PNG", seed=21)],
            options=SamplingOptions(temperature=0, num_predict=600),
        ),
        emitter(1),
    )
    engine.submit(
        CompletionRequest(
            prompt="a long text story", options=SamplingOptions(temperature=0, num_predict=600)
        ),
        emitter(0),
    )
    done.wait()
    assert type(results[1]).__name__ == "CompletionDone", results[1]
    assert len(steps[0] & steps[1]) >= 300, (len(steps[0]), len(steps[1]))


async def test_truncation_cuts_images_whole(engine):
    async with serve(engine) as (client, _):
        words = " ".join(["the"] * 300)
        _, done = await complete(
            client,
            prompt=f"{words} [img-0] end",
            images=[B64],
            options={**GREEDY, "num_predict": 1, "num_keep": 4},
        )
        assert done["truncated"] is True
        resp = await client.post(
            "/completion",
            json={
                "prompt": f"[img-0] {words}",
                "images": [B64],
                "options": {**GREEDY, "num_predict": 1, "num_keep": 8},
            },
        )
        assert resp.status == 200
