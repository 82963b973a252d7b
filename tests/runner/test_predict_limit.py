"""The generation limit for every model (``LaunchSpec.predict_limit``, set from
CORRAL_PREDICT_LIMIT): a model that never ends its turn stops after predict_limit x num_ctx
generated tokens with done_reason "length", through context shifts, whatever num_predict asks.

The real engine runs the tiny model (greedy decoding never picks its end token, so only a limit
ends a generation: a model that never emits its end token); the FakeEngine gets
``default_num_predict`` huge, the same behaviour."""

from __future__ import annotations

import pytest

from corral.runner.fake import FakeEngine
from corral.runner.protocol import FakeKnobs, LaunchSpec
from tests.runner.conftest import complete, serve

NEVER_ENDS = FakeKnobs(default_num_predict=10**9, tokens_per_second=0)


@pytest.fixture(scope="module")
def tiny_engine(tiny_gguf):
    pytest.importorskip("llama_cpp")
    from corral.runner.engine import Engine

    e = Engine(
        LaunchSpec(
            model_path=str(tiny_gguf),
            num_ctx=256,
            parallel=1,
            num_thread=1,
            num_batch=256,
            predict_limit=2,
        )
    )
    e.load(lambda p: None)
    e.start()
    yield e
    e.close()


@pytest.mark.parametrize("num_predict", [-1, 100_000])
async def test_engine_stops_a_generation_at_the_limit(tiny_engine, num_predict):
    limit = 2 * tiny_engine.n_ctx_per_slot
    async with serve(tiny_engine) as (client, _):
        _, done = await complete(
            client, prompt="never ends", options={"temperature": 0, "num_predict": num_predict}
        )
    assert done["done_reason"] == "length" and done["eval_count"] == limit


async def test_engine_num_predict_below_the_limit_is_kept(tiny_engine):
    async with serve(tiny_engine) as (client, _):
        _, done = await complete(
            client, prompt="short", options={"temperature": 0, "num_predict": 300}
        )
    assert done["done_reason"] == "length" and done["eval_count"] == 300


def fake(predict_limit: int) -> FakeEngine:
    e = FakeEngine(
        LaunchSpec(
            model_path="fake.gguf",
            engine="fake",
            num_ctx=32,
            predict_limit=predict_limit,
            fake=NEVER_ENDS,
        )
    )
    e.load(lambda p: None)
    e.start()
    return e


@pytest.mark.parametrize("num_predict", [-1, 5000])
async def test_fake_engine_stops_at_the_limit_as_the_real_one(num_predict):
    e = fake(3)
    try:
        async with serve(e) as (client, _):
            _, done = await complete(client, prompt="x", options={"num_predict": num_predict})
            assert done["done_reason"] == "length" and done["eval_count"] == 3 * 32
            _, done = await complete(client, prompt="x", options={"num_predict": 40})
            assert done["done_reason"] == "length" and done["eval_count"] == 40
    finally:
        e.close()


async def test_fake_engine_default_knobs_still_end_their_turn():
    e = FakeEngine(LaunchSpec(model_path="fake.gguf", engine="fake", num_ctx=32, predict_limit=10))
    e.load(lambda p: None)
    e.start()
    try:
        async with serve(e) as (client, _):
            _, done = await complete(client, prompt="x")
        assert done["done_reason"] == "stop" and done["eval_count"] == 16
    finally:
        e.close()
