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

The top k of a wide vocabulary (8k logits or more) come from column maxima (``_top_k``): the
row seen as B rows of C columns (B a power of two near sqrt(vocab / k); the last vocab mod B
logits stay candidates on their own), the k columns with the largest maxima hold the k largest
logits (a logit outside them is smaller than k column maxima), so the exact top k is among
k x B + (vocab mod B) candidates after one vectorised max over the row. Ties at the k-th value
may keep a different one of the tied tokens than llama.cpp's partial sort would (both are
arbitrary among equals).

A step with ONE drawn row (one sequence, or one sampled among greedy ones) takes
:func:`sample_one`: the same operations on that row alone, with the same float32 and float64
roundings, so it draws exactly the token :func:`sample` draws for that row in a batch whose rows
share its top_k (a batch mixing top_k values sums the row's float32 softmax over the largest
top_k, in another order). The kept entries are always a prefix of the sorted top k, so it runs
the chain on that prefix and finds the cut-offs by binary search in the non-decreasing
cumulative sums where the batch path masks and counts: ~15 numpy calls instead of ~50, and none
after the sort when one token is left.
"""

from __future__ import annotations

import math

import numpy as np

from corral.runner.protocol import SamplingOptions

# numpy's top-k is used up to this k; a larger or unlimited top_k (0) with top_p sorts most of
# the vocabulary, which llama.cpp's adaptive partial sort does better
MAX_TOP_K = 256
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
    """One sequence's numpy-sampled chain: its parameters (and their float32 forms, the same
    numbers in both paths), seed and draw counter."""

    __slots__ = (
        "top_k",
        "top_p",
        "min_p",
        "temperature",
        "seed",
        "draws",
        "top_p32",
        "log_min_p32",
        "temp32",
        "_u",
        "_u_at",
    )

    def __init__(self, o: SamplingOptions, seed: int) -> None:
        self.top_k = o.top_k
        self.top_p = o.top_p if 0 < o.top_p < 1.0 else 1.0
        self.min_p = o.min_p if o.min_p > 0 else 0.0
        self.temperature = o.temperature
        self.seed = seed & _MASK
        self.draws = 0
        self.top_p32 = np.float32(self.top_p)
        # min_p's cut-off is max logit + log(min_p), in float32 (0 when there is none)
        self.log_min_p32 = np.float32(math.log(self.min_p)) if self.min_p > 0 else np.float32(0)
        self.temp32 = np.float32(self.temperature)
        self._u: list[float] = []  # uniform(seed, _u_at + i) for the next draws
        self._u_at = 0

    def next_u(self) -> float:
        """``uniform(seed, draws)``, and the counter advances (computed 64 at a time)."""
        i = self.draws - self._u_at
        if not 0 <= i < len(self._u):
            self._u, self._u_at, i = uniforms(self.seed, self.draws, 64), self.draws, 0
        self.draws += 1
        return self._u[i]


def uniform(seed: int, i: int) -> float:
    """Draw ``i`` of ``seed``: a uniform double in [0, 1) (53 bits of splitmix64's output)."""
    z = (seed * _GOLDEN + (i + 1) * _MIX2) & _MASK
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK
    return ((z ^ (z >> 31)) >> 11) * _TO_UNIT


def uniforms(seed: int, first: int, n: int) -> list[float]:
    """``[uniform(seed, i) for i in range(first, first + n)]`` in a few numpy calls (uint64
    arithmetic wraps modulo 2**64 as the masks do)."""
    z = np.arange(first + 1, first + n + 1, dtype=np.uint64) * np.uint64(_MIX2)
    z += np.uint64((seed * _GOLDEN) & _MASK)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return (((z ^ (z >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) * _TO_UNIT).tolist()


def _blocks(vocab: int, k: int) -> int:
    """Rows B of the column-maxima top k (see the module docstring); 1: one argpartition of the
    row, faster below ~8k logits."""
    if vocab < 8192 or vocab < 64 * k:
        return 1
    return 1 << round(math.log2(math.sqrt(vocab / k)))


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits of each row (rows x k, in no particular order)."""
    n, vocab = logits.shape
    if k >= vocab:
        return np.broadcast_to(np.arange(vocab), (n, vocab))
    b = _blocks(vocab, k)
    if b == 1:
        return np.argpartition(logits, vocab - k, axis=1)[:, vocab - k :]
    cols = vocab // b
    body = logits[:, : b * cols].reshape(n, b, cols)
    top = np.argpartition(body.max(axis=1), cols - k, axis=1)[:, cols - k :]  # n x k columns
    cand = body[np.arange(n)[:, None, None], np.arange(b)[None, :, None], top[:, None, :]]
    cand = cand.reshape(n, b * k)
    if b * cols < vocab:
        cand = np.concatenate((cand, logits[:, b * cols :]), axis=1)
    m = cand.shape[1]
    j = np.argpartition(cand, m - k, axis=1)[:, m - k :]
    col = np.minimum(j, b * k - 1) % k  # (the tail's entries are mapped below)
    ids = (j // k) * cols + np.take_along_axis(top, col, axis=1)
    return np.where(j < b * k, ids, j - b * k + b * cols)


def _top_k_row(row: np.ndarray, k: int) -> np.ndarray:
    """``_top_k`` of one row (1-D): the same operations, so the same indices in the same order."""
    vocab = row.shape[0]
    if k >= vocab:
        return np.arange(vocab)
    b = _blocks(vocab, k)
    if b == 1:
        return np.argpartition(row, vocab - k)[vocab - k :]
    cols = vocab // b
    body = row[: b * cols].reshape(b, cols)
    top = np.argpartition(body.max(axis=0), cols - k)[cols - k :]
    cand = body[:, top].reshape(b * k)
    if b * cols < vocab:
        cand = np.concatenate((cand, row[b * cols :]))
    m = cand.shape[0]
    j = np.argpartition(cand, m - k)[m - k :]
    col = np.minimum(j, b * k - 1) % k
    ids = (j // k) * cols + top[col]
    return np.where(j < b * k, ids, j - b * k + b * cols)


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
    top_p = np.array([c.top_p32 for c in chains], dtype=np.float32)
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
        floor = vals[:, 0] + np.array([c.log_min_p32 for c in chains], dtype=np.float32)
        keep &= (vals >= floor[:, None]) | (min_p[:, None] <= 0) | (pos == 0)
    # temperature, then dist: softmax of what is left and one uniform draw per row
    temp = np.array([c.temp32 for c in chains], dtype=np.float32)
    scaled = vals / temp[:, None]
    w = np.where(keep, np.exp((scaled - scaled[:, :1]).astype(np.float64)), 0.0)
    cum = np.cumsum(w, axis=1)
    target = np.array([c.next_u() for c in chains]) * cum[:, -1]
    choice = np.minimum((cum < target[:, None]).sum(axis=1), keep.sum(axis=1) - 1)
    return ids[np.arange(n), choice]


def sample_one(row: np.ndarray, c: Chain) -> int:
    """:func:`sample` of one row (1-D float32) with its chain: the same token (see the module
    docstring); the chain's draw counter advances by one."""
    k = min(row.shape[0], c.top_k)
    ids = _top_k_row(row, k)
    vals = row[ids]
    order = np.argsort(-vals, kind="stable")
    vals = vals[order]
    m = k  # the kept prefix of the sorted top k
    if c.top_p < 1.0 and k > 1:
        e = np.exp(vals - vals[0])
        cum = np.cumsum(e / e.sum(dtype=np.float32), dtype=np.float32)
        m = min(k, int(cum.searchsorted(c.top_p32)) + 1)
    if c.min_p > 0 and m > 1:
        m = max(1, int(np.count_nonzero(vals[:m] >= vals[0] + c.log_min_p32)))
    u = c.next_u()  # drawn even when one token is left, as sample() does
    if m == 1:
        return int(ids[order[0]])
    scaled = vals[:m] / c.temp32
    cum = np.cumsum(np.exp((scaled - scaled[0]).astype(np.float64)))
    return int(ids[order[min(int(cum.searchsorted(u * cum[-1])), m - 1)]])
