"""Chat history truncation (Ollama's ``server/prompt.go chatPrompt``): a rendered chat loses its
oldest non-system messages until it fits the runner's slot, deciding by a byte bound
(:func:`token_bound`) before asking the runner to count (``count``, one ``/tokenize`` each).
No transport here: the caller passes the slot size and the counting call once a lease gives them;
a template error while re-rendering is raised as :class:`templates.TemplateError`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import structlog

from corral.daemon.prompt import templates
from corral.daemon.prompt.thinking import Think

log = structlog.get_logger(__name__)

# Tokens a tokenizer adds beyond what the text itself yields: BOS and EOS (add_special) and
# SentencePiece's dummy-prefix space (a one-byte "▁" that can be a token of its own), rounded up.

_ADDED_TOKENS = 4


def token_bound(text: str) -> int:
    """An upper bound on the tokens llama.cpp makes of ``text`` (with BOS), no tokenizer needed.

    Every token the tokenizer cuts from the text covers at least one byte of it: BPE and WPM
    pieces are merges of whole bytes, a parsed special token covers its own text, and
    SentencePiece's byte fallback (the tiny test model, llama 2, gemma) is the worst case, one
    token per byte. SentencePiece first escapes each space to "▁" (3 bytes) and falls back on the
    escaped bytes, so a vocabulary without a "▁" piece spends up to 3 tokens per space: hence 2
    extra per space. Tokens that cover no text are the ``_ADDED_TOKENS``. Not covered: UGM (T5)
    vocabularies, whose charsmap normalization can expand text (NFKC); no chat model uses one,
    and a wrong guess only means the runner truncates (num_keep + tail) instead of us."""
    return len(text.encode("utf-8", "surrogatepass")) + 2 * text.count(" ") + _ADDED_TOKENS


IMAGE_TAG = re.compile(r"\[img-(\d+)\]")  # the runner's image marker (runner/images.py)


@dataclass(slots=True)
class ChatHistory:
    """A rendered chat that can be re-rendered without its oldest messages (Ollama's
    ``server/prompt.go chatPrompt``): :meth:`fit` is called once the runner, hence its context
    per slot, is known. Images count too: each ``[img-N]`` tag of a rendering (N below
    ``n_images``, as the runner reads them) costs ``image_tokens`` positions beside its text."""

    renderer: templates.Renderer
    messages: list[dict]
    tools: Sequence[dict] | None
    think: Think
    prompt: str  # the rendering of all of ``messages``
    image_tokens: int = 0  # positions per image (image_tokens_of)
    n_images: int = 0  # the request's images

    def _image_cost(self, text: str) -> int:
        """The positions the images of ``text`` take. The tag's own text is counted as well,
        a few tokens over, like the bound: the runner never has to cut a fitted prompt."""
        if not self.n_images:
            return 0
        return self.image_tokens * sum(
            1 for m in IMAGE_TAG.finditer(text) if int(m.group(1)) < self.n_images
        )

    def _render(self, start: int) -> str:
        """The system messages before ``start`` + ``messages[start:]``, rendered."""
        if start == 0:
            return self.prompt
        kept = [m for m in self.messages[:start] if m.get("role") == "system"]
        return self.renderer.render(
            kept + self.messages[start:],
            self.tools,
            think=self.think.enabled,
            think_level=self.think.level,
            is_think_set=self.think.is_set,
        )

    async def fit(self, n_ctx: int, count: Callable[[str], Awaitable[int]]) -> str:
        """The prompt with the fewest oldest non-system messages dropped so that it fits the
        slot with room for one generated token (the runner's own truncation limit, so it never
        cuts a prompt fitted here). System messages and the last message always stay; if the
        last message alone does not fit it is sent anyway and the runner truncates it.

        Cost: nothing but a length check when :func:`token_bound` of the whole prompt fits (the
        usual case); otherwise one ``/tokenize`` of the whole prompt and, when it is too long, a
        binary search over the first kept message, tokenizing only renderings whose bound does
        not already fit: O(log n) round trips where Ollama tokenizes up to n renderings. The
        search assumes a longer suffix never renders to fewer tokens (true of chat templates),
        which makes it pick Ollama's message: the oldest one from which every later one fits."""
        limit = n_ctx - 1
        calls = 0

        async def fits(text: str) -> bool:
            nonlocal calls
            images = self._image_cost(text)
            if token_bound(text) + images <= limit:
                return True
            calls += 1
            return await count(text) + images <= limit

        if await fits(self.prompt):
            if calls:
                log.debug("api.chat_fits", tokenize_calls=calls, n_ctx=n_ctx)
            return self.prompt
        lo, hi = 1, len(self.messages) - 1  # hi: the last message is always kept
        best = None
        while lo < hi:
            mid = (lo + hi) // 2
            text = self._render(mid)
            if await fits(text):
                hi, best = mid, text
            else:
                lo = mid + 1
        prompt = best if best is not None else self._render(hi)  # best: the rendering of hi
        log.debug(
            "api.chat_truncated",
            dropped=sum(1 for m in self.messages[:hi] if m.get("role") != "system"),
            kept=len(self.messages) - hi,
            tokenize_calls=calls,
            n_ctx=n_ctx,
        )
        return prompt
