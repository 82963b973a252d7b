"""What the real Engine and the FakeEngine share: the engine interface, errors, jobs, and the text
stream that turns token bytes into safe-to-emit text (whole UTF-8 characters, stop strings held
back and never emitted). No llama_cpp here.
"""

from __future__ import annotations

import codecs
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from corral.runner.protocol import (
    CompletionChunk,
    CompletionDone,
    CompletionError,
    CompletionRequest,
    EmbedResponse,
    KvCacheReport,
    MemoryUse,
    TokenLogprob,
)

CompletionEvent = CompletionChunk | CompletionDone | CompletionError
Emit = Callable[[CompletionEvent], None]  # called from the decode thread; must not block


def no_op() -> None:
    """The default of hooks nobody set."""


class LoadError(Exception):
    """The model could not be loaded; becomes LoadFailed(reason, oom)."""

    def __init__(self, reason: str, oom: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.oom = oom


class BadRequest(Exception):
    """The request cannot be served as given (HTTP 400); nothing was started."""


# Ollama's answer (llm/llama_server.go) to a prompt longer than the slot when context shift is off
PROMPT_TOO_LONG = (
    "the prompt is longer than the context length currently available to the model; shorten the "
    "prompt, adjust the context length in settings, or use a model with a longer context length"
)
INPUT_TOO_LONG = "the input length exceeds the context length"


def prompt_cut(n_prompt: int, n_ctx: int, num_keep: int, truncate: bool, shift: bool) -> int:
    """How long a prompt of ``n_prompt`` tokens may stay in a slot of ``n_ctx`` cells, as Ollama
    0.33 decides it (``completionPromptForRequest``): all of it when it leaves a cell for the
    answer; else BadRequest when ``truncate`` is off, or when context shift is off (Ollama's
    text); else the first ``num_keep`` tokens and the tail, together
    ``n_ctx - max((n_ctx - keep) // 2, 1)`` (``contextShiftPromptLimit``: about half of what is
    not kept stays free for the answer, as the old runners' first shift left it). Returns the
    length to keep; the caller cuts ``prompt[:keep] + prompt[-(length - keep):]``."""
    if n_prompt <= n_ctx - 1:
        return n_prompt
    if not truncate:
        raise BadRequest(INPUT_TOO_LONG)
    if not shift:
        raise BadRequest(PROMPT_TOO_LONG)
    keep = min(max(0, num_keep), n_ctx - 1)
    return n_ctx - max((n_ctx - keep) // 2, 1)


class Job:
    """One submitted completion. ``cancel()`` is thread-safe and takes effect at the next decode
    step: the sequence's slot and KV are freed and nothing more is emitted."""

    def __init__(self, request: CompletionRequest, emit: Emit) -> None:
        self.request = request
        self.emit = emit
        self.cancelled = threading.Event()
        self.submitted_at = time.perf_counter_ns()
        # set by the engine that accepts it: the prompt's tokens, its images by position,
        # whether the prompt was cut to fit the slot, the engine's sampler state, the seed of
        # its draws, its relay id when its text goes to the engine's relay_chunks (else 0), and
        # the generated tokens that end it with "length"
        self.prompt: list[int] = []
        self.media: dict[int, Any] = {}
        self.truncated = False
        self.sampler: Any = None
        self.seed = 0
        self.relay = 0
        self.limit = 0

    def cancel(self) -> None:
        self.cancelled.set()


class EngineLike(Protocol):
    """The interface server.py drives. ``load`` and ``embed`` block (call them off the event loop);
    ``submit`` is cheap and thread-safe; events reach ``emit`` from the engine's decode thread, the
    last one being exactly one CompletionDone or CompletionError unless the job was cancelled."""

    parallel: int
    n_ctx: int
    n_ctx_per_slot: int
    n_ctx_train: int
    memory: dict[str, MemoryUse]
    # The decode thread (or whoever emitted) calls this after each burst of emits: a step's
    # events, a cancel_all's errors. The server sets it (relay mode writes a burst at once).
    after_emit: Callable[[], None]
    # Where the engine sends what its saved prompt cache did (runner/kvcache.py); the runner
    # sets it to the event pipe before ``load``.
    report: Callable[[KvCacheReport], None]
    # Relay mode (set by the server before any submit): the text chunks of a step's relay jobs
    # (submitted with a ``relay`` id, streaming) come here in ONE call per step, (relay ids,
    # texts), before the step's other events; a job's other events still go to its emit. None:
    # every event goes to emit.
    relay_chunks: Callable[[list[int], list[str]], None] | None

    def load(self, progress: Callable[[float], None]) -> None: ...
    def start(self) -> None: ...
    def submit(self, request: CompletionRequest, emit: Emit, relay: int = 0) -> Job:
        """Queue ``request``; ``relay`` >= 1 (a request of the request pipe): a streamed job's
        plain text chunks go to ``relay_chunks`` with that id instead of ``emit``."""
        ...

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResponse: ...
    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def busy(self) -> int: ...
    def queued(self) -> int: ...
    def kv_used(self) -> int: ...
    def cancel_all(self, reason: str) -> None: ...
    def close(self, save_by: float | None = None) -> None: ...


def take_logprobs(pending: list[TokenLogprob]) -> list[TokenLogprob] | None:
    """The pending logprob entries (None when there are none), leaving ``pending`` empty."""
    if not pending:
        return None
    out = list(pending)
    pending.clear()
    return out


def past_thinking(text: str, open_tag: str, close_tag: str) -> bool:
    """Whether generated ``text`` is past the model's thinking (``CompletionRequest.format_after``):
    it contains the closing tag, or (the opening tag not already in the prompt, i.e.
    ``open_tag`` given) it has started with something that cannot become the opening tag."""
    if close_tag and close_tag in text:
        return True
    if not open_tag:
        return False
    t = text.lstrip()
    return bool(t) and not t.startswith(open_tag) and not open_tag.startswith(t)


class TextStream:
    """Token bytes in, emit-safe text out.

    Guarantees: (1) a UTF-8 character split over tokens is emitted only once complete; (2) text that
    could be the start of a stop string is held back until it cannot be; (3) once a stop string
    appears, the text before it is released and nothing after it ever is (``stopped`` is set).
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        # a piece can only start or complete a stop string if it holds the string's first
        # character (when nothing is held back)
        firsts = "".join(sorted({s[0] for s in self._stop}))
        self._first = re.compile(f"[{re.escape(firsts)}]") if firsts else None
        self._held = ""
        self._partial = False  # the decoder holds the first bytes of a character
        self.stopped = False
        self.text: list[str] = []  # everything released, for stream=false

    def feed(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        text = self._decoder.decode(piece)
        self._partial = bool(self._decoder.getstate()[0])
        return self._release(self._held + text, final=False)

    def passes(self, text: str) -> bool:
        """Whether whole-character ``text`` (a token's piece) would come out of :meth:`feed`
        unchanged, in a stream (``self.text`` is not kept): nothing is held back or half
        decoded and it holds no stop string's first character."""
        return not (
            self._held
            or self._partial
            or self.stopped
            or (self._first is not None and self._first.search(text))
        )

    def finish(self) -> str:
        """Release what is held at the end of the generation (a broken trailing character
        becomes U+FFFD)."""
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(b"", final=True), final=True)

    def _release(self, text: str, final: bool) -> str:
        cut = -1
        for s in self._stop:
            i = text.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self.stopped = True
            self._held = ""
            out = text[:cut]
        elif final:
            self._held = ""
            out = text
        else:
            keep = 0
            for s in self._stop:  # longest suffix of text that is a proper prefix of a stop string
                for n in range(min(len(s) - 1, len(text)), keep, -1):
                    if s.startswith(text[-n:]):
                        keep = n
                        break
            self._held = text[len(text) - keep :] if keep else ""
            out = text[: len(text) - keep]
        if out:
            self.text.append(out)
        return out
