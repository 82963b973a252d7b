"""Token choice over a step's logits (runner/sampling.py) against llama.cpp's own samplers, on the
tiny model: greedy decoding gives llama.cpp's own greedy tokens, and seeded sampling draws from
the distribution llama.cpp's chain defines (goodness-of-fit over many draws, not one string)."""

from __future__ import annotations

import ctypes
import math
import threading

import numpy as np
import pytest

from corral.runner import sampling
from corral.runner.protocol import (
    CompletionDone,
    CompletionError,
    CompletionRequest,
    SamplingOptions,
)

llama_cpp = pytest.importorskip("llama_cpp")
from corral.runner.engine import Engine  # noqa: E402

PROMPTS = ["the quick brown", "hello the world", "one two three", "a long story about"]
# prompts after which the tiny model's next-token distribution is wide enough for every chain
# below to keep several tokens (most positions of this random model are nearly one-hot)
WIDE = ["what was", "or he", "this was"]
CHAINS = [
    SamplingOptions(temperature=0.8),  # Ollama's defaults: top_k 40, top_p 0.9
    SamplingOptions(temperature=1.5, top_k=5, top_p=1.0),
    SamplingOptions(temperature=0.6, top_k=100, top_p=0.5, min_p=0.05),
    SamplingOptions(temperature=1.0, top_k=40, top_p=1.0, min_p=0.2),
]


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    """llama-cpp-python's own Llama on the tiny model (flash attention on, as the engine's
    "auto" resolves on a CPU build)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(tiny_gguf),
        n_ctx=256,
        logits_all=True,
        verbose=False,
        n_threads=1,
        flash_attn=True,
    )
    yield llm
    llm.close()


def last_logits(llm, prompt: str) -> np.ndarray:
    """The logits after ``prompt`` (with BOS), float32."""
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[len(tokens) - 1], dtype=np.float32)


def llama_distribution(logits: np.ndarray, o: SamplingOptions) -> dict[int, float]:
    """The distribution llama.cpp's chain (top_k, top_p, min_p, temperature; what dist draws
    from) gives over ``logits``: its samplers applied to the whole vocabulary, then the softmax
    of what they leave."""
    n = len(logits)
    dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
    data = np.zeros(n, dtype=dtype)
    data["id"] = np.arange(n)
    data["logit"] = logits
    arr = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1, sorted=False
    )
    for smpl in (
        llama_cpp.llama_sampler_init_top_k(o.top_k),
        llama_cpp.llama_sampler_init_top_p(o.top_p, 1),
        llama_cpp.llama_sampler_init_min_p(o.min_p, 1),
        llama_cpp.llama_sampler_init_temp(o.temperature),
    ):
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        llama_cpp.llama_sampler_free(smpl)
    kept = data[: arr.size]
    x = kept["logit"].astype(np.float64)
    w = np.exp(x - x.max())
    return dict(zip(kept["id"].tolist(), (w / w.sum()).tolist(), strict=True))


def assert_fits(draws: list[int], expected: dict[int, float]) -> None:
    """Every draw is a token the chain keeps, and the counts fit the distribution: Pearson's
    chi-square over the tokens expected >= 5 times (the rest pooled), below its 1e-6 upper
    quantile (Wilson-Hilferty), so a correct sampler fails once in a million runs."""
    n = len(draws)
    assert set(draws) <= set(expected), set(draws) - set(expected)
    counts: dict[int, int] = {}
    for t in draws:
        counts[t] = counts.get(t, 0) + 1
    bins = [t for t, p in expected.items() if p * n >= 5]
    obs = [counts.get(t, 0) for t in bins]
    exp = [expected[t] * n for t in bins]
    rest_exp = n - sum(exp)
    if rest_exp >= 5:
        obs.append(n - sum(obs))
        exp.append(rest_exp)
    assert len(exp) >= 2, "the chain keeps too few tokens for a test"
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    k = len(exp) - 1
    z = 4.753  # upper 1e-6 point of the standard normal
    limit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    assert chi2 < limit, (chi2, limit, list(zip(obs, exp, strict=True)))


@pytest.mark.parametrize("options", CHAINS)
def test_numpy_chain_draws_from_llamas_distribution(reference, options):
    """5,000 draws with different seeds, and 1,500 successive draws of one seed, from the tiny
    model's logits after two prompts fit the distribution of llama.cpp's own chain."""
    assert sampling.numpy_chain(options)
    for prompt in WIDE[:2]:
        logits = last_logits(reference, prompt)
        expected = llama_distribution(logits, options)
        rows = np.repeat(logits[None, :], 5000, axis=0)
        seeds = [sampling.Chain(options, seed) for seed in range(5000)]
        draws = sampling.sample(rows, seeds).tolist()
        assert_fits(draws, expected)
        one = sampling.Chain(options, 12345)  # one sequence's successive draws
        draws = [int(sampling.sample(rows[:1], [one])[0]) for _ in range(1500)]
        assert one.draws == 1500
        assert_fits(draws, expected)


def test_a_seed_repeats_and_rows_do_not_interfere(reference):
    """Draw i of a seed is the same whatever else shares the step."""
    logits = last_logits(reference, WIDE[0])
    o = CHAINS[0]
    alone = [sampling.sample(logits[None, :], [c])[0] for c in [sampling.Chain(o, 7)] * 50]
    shared = sampling.Chain(o, 7)
    together = []
    for _ in range(50):
        out = sampling.sample(
            np.repeat(logits[None, :], 3, axis=0),
            [sampling.Chain(o, 1), shared, sampling.Chain(o, 2)],
        )
        together.append(out[1])
    assert alone == together
    assert len(set(alone)) > 1  # the draws do move on


@pytest.mark.parametrize("vocab", [1530, 8192, 32000, 128256, 262144, 262147])
def test_top_k_is_exact_and_one_row_matches_the_batch(vocab):
    """The column-maxima top k (8k logits and more, a vocabulary not divisible by the block rows
    too) equals a full sort's, and the one-row version gives the same indices in the same order
    as the batch version gives for that row (what makes sample_one's draws sample's)."""
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab)).astype(np.float32) * 4
    for k in (1, 40, 256):
        got = np.sort(sampling._top_k(logits, k), axis=1)
        want = np.sort(np.argsort(-logits, axis=1)[:, :k], axis=1)
        assert (got == want).all(), k
        for r in range(3):
            assert (
                sampling._top_k(logits[r : r + 1], k)[0] == sampling._top_k_row(logits[r], k)
            ).all()


def test_one_row_draws_what_the_batch_draws():
    """sample_one (a step with one drawn row) picks the token sample() picks for that row, draw
    after draw: random logits of several widths and scales, ties, every chain shape (top_p,
    min_p, both, a cut to one token, top_k 1 and 256)."""
    rng = np.random.default_rng(0)
    chains = [
        *CHAINS,
        SamplingOptions(temperature=0.3, top_k=256, top_p=0.95, min_p=0.01),
        SamplingOptions(temperature=2.0, top_k=1),
        SamplingOptions(temperature=0.7, top_k=40, top_p=0.05),  # nearly always one token left
    ]
    cases = 0
    for vocab in (30, 1530, 32000):
        for trial in range(12):
            logits = (rng.standard_normal((4, vocab)) * rng.uniform(0.3, 8)).astype(np.float32)
            if trial % 3 == 0:
                logits[:, ::5] = np.round(logits[:, ::5])  # exact ties
            for o in chains:
                seeds = rng.integers(0, 2**63, 4).tolist()
                batch = [sampling.Chain(o, s) for s in seeds]
                alone = [sampling.Chain(o, s) for s in seeds]
                for _ in range(3):
                    want = sampling.sample(logits, batch).tolist()
                    got = [sampling.sample_one(logits[i], alone[i]) for i in range(4)]
                    assert got == want, (vocab, o)
                    cases += 4
    assert [c.draws for c in alone] == [3] * 4 and cases > 3000


def test_draws_are_splitmix_counters():
    """The draws a chain takes 64 at a time (uniforms) are uniform(seed, i), bit for bit."""
    for seed in (0, 1, 12345, 2**63 + 5, 2**64 - 1):
        for first in (0, 63, 1000, 2**40):
            want = [sampling.uniform(seed, i) for i in range(first, first + 70)]
            assert sampling.uniforms(seed, first, 70) == want
    c = sampling.Chain(CHAINS[0], 99)
    assert [c.next_u() for _ in range(130)] == [sampling.uniform(99, i) for i in range(130)]
    assert c.draws == 130


def test_which_options_numpy_draws():
    assert sampling.greedy(SamplingOptions(temperature=0))
    assert not sampling.greedy(SamplingOptions(temperature=0, repeat_penalty=1.2))
    assert sampling.numpy_chain(SamplingOptions(temperature=0.8))
    for o in (
        SamplingOptions(temperature=0),
        SamplingOptions(temperature=0.8, top_k=0),  # the whole vocabulary: llama.cpp's sort
        SamplingOptions(temperature=0.8, top_k=1000),
        SamplingOptions(temperature=0.8, repeat_penalty=1.1),
        SamplingOptions(temperature=0.8, typical_p=0.5),
    ):
        assert not sampling.numpy_chain(o), o
    # a penalty over no history is no penalty
    assert sampling.numpy_chain(
        SamplingOptions(temperature=0.8, repeat_penalty=1.1, repeat_last_n=0)
    )


# ---- through the engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def run_all(
    engine: Engine, requests: list[CompletionRequest], relay: list[str] | None = None
) -> list[list[int]]:
    """Submit every request at once (4 decode together, the rest queue); the generated tokens of
    each. With ``relay`` the requests are submitted with relay ids and the steps' text goes to
    relay_chunks (collected there), as for the request pipe's streams."""
    done: dict[int, CompletionDone | CompletionError] = {}
    finished = threading.Semaphore(0)
    engine.relay_chunks = (lambda ids, texts: relay.extend(texts)) if relay is not None else None

    def emitter(i: int):
        def emit(event) -> None:  # decode thread
            if isinstance(event, CompletionDone | CompletionError):
                done[i] = event
                finished.release()

        return emit

    try:
        for i, req in enumerate(requests):
            engine.submit(req, emitter(i), i + 1 if relay is not None else 0)
        for _ in requests:
            assert finished.acquire(timeout=120)
    finally:
        engine.relay_chunks = None
    ends = [done[i] for i in range(len(requests))]
    assert all(isinstance(d, CompletionDone) for d in ends), ends
    return [d.tokens[-d.eval_count :] for d in ends]  # type: ignore[union-attr]


@pytest.mark.parametrize("relay", [False, True])
def test_greedy_is_llamas_own_greedy_output(engine, reference, relay):
    """Four prompts decoded together (rows 0-3 of the step's logits, argmax of each) give the
    tokens llama.cpp's own greedy sampler gives for each prompt alone (Llama.generate, temp 0)."""
    n = 40
    want = []
    for prompt in PROMPTS:
        tokens = reference.tokenize(prompt.encode(), add_bos=True)
        out = []
        for t in reference.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(t)
            if len(out) == n:
                break
        want.append(out)
    opts = SamplingOptions(temperature=0, num_predict=n)
    texts: list[str] = []
    got = run_all(
        engine,
        [CompletionRequest(prompt=p, options=opts) for p in PROMPTS],
        texts if relay else None,
    )
    assert got == want
    assert bool(texts) == relay  # the relay's text went by the step's short path


def test_seeded_draws_through_the_engine_fit_llamas_distribution(engine, reference):
    """The first token of 400 requests with seeds 0..399 (4 at a time, through the engine's step)
    fits the distribution of llama.cpp's chain over the tiny model's logits; the same seed
    repeats its tokens."""
    prompt = WIDE[2]
    o = SamplingOptions(temperature=0.8, num_predict=1)
    expected = llama_distribution(last_logits(reference, prompt), o)
    reqs = [
        CompletionRequest(
            prompt=prompt, options=SamplingOptions(temperature=0.8, num_predict=1, seed=s)
        )
        for s in range(400)
    ]
    draws = [t[0] for t in run_all(engine, reqs, relay=[])]
    assert_fits(draws, expected)
    again = CompletionRequest(
        prompt=prompt, options=SamplingOptions(temperature=0.8, num_predict=8, seed=5)
    )
    assert run_all(engine, [again]) == run_all(engine, [again], relay=[])
