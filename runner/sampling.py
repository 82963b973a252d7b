"""Token choice over a decode step's logits with numpy, for all sequences at once.

The engine reads a step's logits as one (sequences x vocab) array (a view of llama.cpp's output
buffer). Greedy rows are one ``argmax``. Rows whose sampling chain is Ollama's usual
``top_k -> top_p -> min_p -> temperature -> dist`` (no penalties, no typical_p, no grammar) are
sampled here in a handful of numpy calls for the whole step, instead of llama.cpp's
``llama_sampler_sample`` per sequence, which first fills a candidate array of the whole
vocabulary (262k entries for Gemma 3, ~300 us per token on the decode thread).

The distribution is llama.cpp's (src/llama-sampler.cpp of the vendored version), step by step:

* top_k: the k largest logits, in descending order (llama_sampler_top_k_impl's partial sort);
* top_p: softmax of those (float32), cumulative sum in that order, kept up to and including the
  first entry where it reaches p (at least one);
* min_p: kept while logit >= max logit + log(p) (at least one);
* temperature: logits / t;
* dist: softmax of what is left, one uniform draw u, the first entry whose running sum reaches
  u x total.

Only the random stream differs: llama.cpp's dist draws from a std::mt19937 per sequence; here
draw i of a sequence with seed s is a counter-based hash (splitmix64 of s and i), the same for a
given (seed, draw) whatever else shares the step. A fixed seed still repeats its output; the
draws are uniform on [0, 1) with 53 bits, so every token keeps exactly its probability.
tests/runner/test_sampling.py checks the distribution against llama.cpp's own chain.

The top k of a wide vocabulary come from block maxima (``_top_k``): the vocabulary split into
blocks of 256, the k blocks with the largest maxima hold the k largest logits (a logit outside
them is smaller than k block maxima), so the exact top k is found among k x 256 candidates after
one pass over the row. Ties at the k-th value may keep a different one of the tied tokens than
llama.cpp's partial sort would (both are arbitrary among equals).
"""

from __future__ import annotations

import numpy as np

from corral.runner.protocol import SamplingOptions

# numpy's top-k is used up to this k; a larger or unlimited top_k (0) with top_p sorts most of
# the vocabulary, which llama.cpp's adaptive partial sort does better
MAX_TOP_K = 256
_BLOCK = 256
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK = (1 << 64) - 1
_TO_UNIT = 1.0 / (1 << 53)


def numpy_chain(o: SamplingOptions) -> bool:
    """Whether ``o`` samples with a chain this module draws from exactly (temperature > 0,
    0 < top_k <= MAX_TOP_K, no penalties, no typical_p)."""
    penalize = o.repeat_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0
    return (
        o.temperature > 0
        and 0 < o.top_k <= MAX_TOP_K
        and not (penalize and o.repeat_last_n != 0)
        and not 0 < o.typical_p < 1.0
    )


def greedy(o: SamplingOptions) -> bool:
    """Whether ``o`` is plain greedy decoding (the first largest logit)."""
    penalize = o.repeat_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0
    return o.temperature <= 0 and not (penalize and o.repeat_last_n != 0)


class Chain:
    """One sequence's numpy-sampled chain: its parameters, seed and draw counter."""

    __slots__ = ("top_k", "top_p", "min_p", "temperature", "seed", "draws")

    def __init__(self, o: SamplingOptions, seed: int) -> None:
        self.top_k = o.top_k
        self.top_p = o.top_p if 0 < o.top_p < 1.0 else 1.0
        self.min_p = o.min_p if o.min_p > 0 else 0.0
        self.temperature = o.temperature
        self.seed = seed & _MASK
        self.draws = 0


def uniform(seed: int, i: int) -> float:
    """Draw ``i`` of ``seed``: a uniform double in [0, 1) (53 bits of splitmix64's output)."""
    z = (seed * _GOLDEN + (i + 1) * _MIX2) & _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return ((z ^ (z >> 31)) >> 11) * _TO_UNIT


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits of each row (rows x k, in no particular order)."""
    n, vocab = logits.shape
    if vocab <= 4 * k * _BLOCK or vocab % _BLOCK:
        if k >= vocab:
            return np.broadcast_to(np.arange(vocab), (n, vocab))
        return np.argpartition(logits, vocab - k, axis=1)[:, vocab - k :]
    blocks = logits.reshape(n, vocab // _BLOCK, _BLOCK)
    maxima = blocks.max(axis=2)
    top = np.argpartition(maxima, maxima.shape[1] - k, axis=1)[:, maxima.shape[1] - k :]
    rows = np.arange(n)[:, None]
    cand = blocks[rows, top].reshape(n, k * _BLOCK)
    j = np.argpartition(cand, k * _BLOCK - k, axis=1)[:, k * _BLOCK - k :]
    return top[rows, j // _BLOCK] * _BLOCK + j % _BLOCK


def sample(logits: np.ndarray, chains: list[Chain]) -> np.ndarray:
    """One token per row of ``logits`` (rows x vocab, float32) with the row's chain; each
    chain's draw counter advances by one."""
    n, vocab = logits.shape
    k = min(vocab, max(c.top_k for c in chains))
    rows = np.arange(n)[:, None]
    ids = _top_k(logits, k)
    vals = logits[rows, ids]
    order = np.argsort(-vals, axis=1, kind="stable")  # descending, as llama.cpp's partial sort
    ids = ids[rows, order]
    vals = vals[rows, order].astype(np.float32)
    pos = np.arange(k)
    top_k = np.array([c.top_k for c in chains])
    keep = pos < top_k[:, None]
    # top_p: softmax (float32) over the top k, kept through the first cumulative sum >= p
    top_p = np.array([c.top_p for c in chains], dtype=np.float32)
    if (top_p < 1.0).any():
        e = np.where(keep, np.exp(vals - vals[:, :1]), np.float32(0))
        p = e / e.sum(axis=1, keepdims=True, dtype=np.float32)
        cum = np.cumsum(p, axis=1, dtype=np.float32)
        reached = cum >= top_p[:, None]
        last = np.where(reached.any(axis=1), reached.argmax(axis=1), k - 1)
        keep &= (pos <= last[:, None]) | (top_p[:, None] >= 1.0)
    # min_p: logit >= max + log(p)
    min_p = np.array([c.min_p for c in chains])
    if (min_p > 0).any():
        floor = vals[:, 0] + np.log(np.where(min_p > 0, min_p, 1.0)).astype(np.float32)
        keep &= (vals >= floor[:, None]) | (min_p[:, None] <= 0) | (pos == 0)
    # temperature, then dist: softmax of what is left and one uniform draw per row
    temp = np.array([c.temperature for c in chains], dtype=np.float32)
    scaled = vals / temp[:, None]
    w = np.where(keep, np.exp((scaled - scaled[:, :1]).astype(np.float64)), 0.0)
    cum = np.cumsum(w, axis=1)
    u = []
    for c in chains:
        u.append(uniform(c.seed, c.draws))
        c.draws += 1
    target = np.array(u) * cum[:, -1]
    choice = np.minimum((cum < target[:, None]).sum(axis=1), keep.sum(axis=1) - 1)
    return ids[np.arange(n), choice]
