"""FakeEngine: the runner's engine interface without llama.cpp, for tests of the daemon.

It keeps the real engine's ordering: a load that takes time and reports progress, at most
``parallel`` sequences decoding at once (the rest wait in FIFO order), one token per sequence per
step at ``tokens_per_second``, cancellation at the next step, stop strings and num_predict honoured,
a final CompletionDone with counts and durations, a prompt cache as the real one reports it (a
prompt's longest common prefix with what one of the last ``parallel`` sequences left in its slot,
at least one token evaluated). Vocabulary: ids 0..255 are bytes, 256+k is
``WORDS[k]``; so tokenize/detokenize round-trip and ``tokens`` of the final record detokenize to
prompt + output.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import random
import threading
import time
from collections.abc import Callable

from corral.runner.common import (
    BadRequest,
    Emit,
    Job,
    LoadError,
    TextStream,
    no_op,
    past_thinking,
    prompt_cut,
    take_logprobs,
)
from corral.runner.protocol import (
    MAX_TOP_LOGPROBS,
    CompletionChunk,
    CompletionDone,
    CompletionError,
    CompletionRequest,
    DoneReason,
    EmbedResponse,
    FakeKnobs,
    KvCacheReport,
    LaunchSpec,
    MemoryUse,
    TokenLogprob,
    TopLogprob,
)

WORDS = [
    "the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " lazy",
    " dog",
    ".",
    " A",
    " bird",
    " sings",
    ",",
]
JSON_WORDS = ['{"', "fake", '":', " true", "}"]  # what format="json"/schema produces
_BASE = 256
_MiB = 1 << 20


class _Seq:
    def __init__(
        self, job: Job, prompt: list[int], limit: int, rng: random.Random, capped: bool
    ) -> None:
        self.job = job
        self.tokens = list(prompt)
        self.n_prompt = len(prompt)
        self.n_cached = 0
        self.limit = limit
        self.capped = capped  # limit is LaunchSpec.predict_limit x num_ctx
        self.rng = rng
        self.text = TextStream(job.request.options.stop)
        self.started = time.perf_counter_ns()
        self.first_token_at = 0
        self.done = False
        fmt = job.request.format is not None
        self.grammar_wait = job.request.format_after if fmt else None
        self.json = fmt and self.grammar_wait is None  # the "grammar" (JSON_WORDS) applies
        self.generated = ""
        self.n_json = 0
        self.logprobs: list[TokenLogprob] = []


class FakeEngine:
    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.knobs: FakeKnobs = spec.fake
        self.parallel = spec.parallel
        self.n_ctx_per_slot = spec.num_ctx
        self.n_ctx = spec.num_ctx * spec.parallel
        self.n_ctx_train = spec.num_ctx
        self.memory: dict[str, MemoryUse] = dict(self.knobs.memory or {})
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[_Seq] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._emitted = 0  # tokens over the process, for crash_after_tokens
        # what the last `parallel` sequences left in their slots (prompt + output but the last
        # token, which was sampled and never decoded), newest last
        self._slot_caches: collections.deque[list[int]] = collections.deque(maxlen=spec.parallel)
        self.after_emit: Callable[[], None] = no_op
        self.report: Callable[[KvCacheReport], None] = lambda report: None  # keeps no KV
        self.relay_chunks: Callable[[list[int], list[str]], None] | None = None
        self._relay_ids: list[int] = []  # this step's text of relay jobs, as the real engine
        self._relay_texts: list[str] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self, progress: Callable[[float], None]) -> None:
        k = self.knobs
        while k.hang_load_while is not None and os.path.exists(k.hang_load_while):
            time.sleep(0.05)
        steps = max(1, int(k.load_time / 0.05))
        for i in range(steps):
            time.sleep(k.load_time / steps)
            progress((i + 1) / steps)
        if k.fail_load_oom or k.fail_load:
            reason = k.fail_load or "cudaMalloc failed: out of memory (fake)"
            raise LoadError(reason, oom=k.fail_load_oom)
        if not self.memory and not (self.spec.n_gpu_layers > 0 and k.gpu_offload):
            kv = self.n_ctx * 1024
            self.memory = {"CPU": MemoryUse(weights=1 * _MiB, kv=kv, compute=_MiB // 2)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fake-decode", daemon=True)
        self._thread.start()

    def close(self, save_by: float | None = None) -> None:
        self.cancel_all("runner closed")
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: CompletionRequest, emit: Emit, relay: int = 0) -> Job:
        prompt = list(request.tokens or [])
        if request.prompt:
            prompt += self.tokenize(request.prompt, request.add_special, True)
        if not prompt:
            raise BadRequest("empty prompt")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        # the real engine's cut of a prompt that leaves no cell for the answer
        shift = self.spec.shift if request.shift is None else request.shift
        num_keep = request.options.num_keep
        limit = prompt_cut(len(prompt), self.n_ctx_per_slot, num_keep, request.truncate, shift)
        truncated = len(prompt) > limit
        if truncated:
            keep = min(max(0, num_keep), self.n_ctx_per_slot - 1)
            prompt = prompt[:keep] + prompt[len(prompt) - (limit - keep) :]
        job = Job(request, emit)
        job.prompt = prompt
        job.truncated = truncated
        job.relay = relay if request.stream and self.relay_chunks is not None else 0
        with self._cond:
            if self._stopping:
                raise BadRequest("runner is shutting down")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def cancel_all(self, reason: str) -> None:
        with self._cond:
            jobs = list(self._waiting) + [s.job for s in self._active]
            self._waiting.clear()
            self._active.clear()
            for job in jobs:
                if not job.cancelled.is_set():
                    job.emit(CompletionError(error=reason))
                    job.cancel()
        self.after_emit()

    def busy(self) -> int:
        return len(self._active)

    def queued(self) -> int:
        return len(self._waiting)

    def kv_used(self) -> int:
        return sum(
            len(s.tokens) for s in list(self._active) if not s.done and not s.job.cancelled.is_set()
        )

    # -- decode loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        period = 1.0 / self.knobs.tokens_per_second if self.knobs.tokens_per_second > 0 else 0.0
        while True:
            with self._cond:
                while not self._stopping and not self._active and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    return
                t0 = time.perf_counter()
                self._admit()
                for seq in self._active:
                    self._step(seq)
                self._hand_over()
                self._active = [s for s in self._active if not s.done]
            rest = period - (time.perf_counter() - t0)
            if rest > 0:
                time.sleep(rest)

    def _hand_over(self) -> None:
        """The step's events are out: its relay text first (one call), then after_emit."""
        if self._relay_ids:
            assert self.relay_chunks is not None
            self.relay_chunks(self._relay_ids, self._relay_texts)
            self._relay_ids, self._relay_texts = [], []
        self.after_emit()

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.parallel:
            job = self._waiting.popleft()
            if job.cancelled.is_set():
                continue
            o = job.request.options
            n = o.num_predict
            if n < 0:
                n = (
                    self.knobs.default_num_predict
                    if n == -1
                    else self.n_ctx_per_slot - len(job.prompt)
                )
            # as the real engine: the limit ends a generation with "length" whatever num_predict
            # asks
            cap = self.spec.predict_limit * self.n_ctx_per_slot
            capped = 0 < cap < n
            rng = random.Random(o.seed if o.seed >= 0 else None)
            prompt = job.prompt
            seq = _Seq(job, prompt, max(0, cap if capped else n), rng, capped)
            seq.n_cached = max((_common(c, prompt) for c in self._slot_caches), default=0)
            self._active.append(seq)

    def _step(self, seq: _Seq) -> None:
        job = seq.job
        if job.cancelled.is_set():
            seq.done = True
            return
        hold = self.knobs.hold_tokens_while
        if hold is not None and seq.first_token_at and os.path.exists(hold):
            return
        generated = len(seq.tokens) - seq.n_prompt
        if generated < seq.limit and not seq.text.stopped:
            if seq.json:
                tok = _BASE + len(WORDS) + seq.n_json % len(JSON_WORDS)
                seq.n_json += 1
            else:
                tok = _BASE + seq.rng.randrange(len(WORDS))
            seq.tokens.append(tok)
            if not seq.first_token_at:
                seq.first_token_at = time.perf_counter_ns()
            piece = self._piece(tok)
            if job.request.logprobs:
                seq.logprobs.append(self._logprob(tok, seq.json, job.request.top_logprobs))
            if seq.grammar_wait is not None:
                seq.generated += piece.decode()
                if past_thinking(seq.generated, *seq.grammar_wait):
                    seq.grammar_wait, seq.json = None, True
            out = seq.text.feed(piece)
            if out and job.relay and not seq.logprobs:
                self._relay_ids.append(job.relay)
                self._relay_texts.append(out)
            elif out and job.request.stream:
                job.emit(CompletionChunk(content=out, logprobs=take_logprobs(seq.logprobs)))
            self._emitted += 1
            if (
                self.knobs.crash_after_tokens is not None
                and self._emitted >= self.knobs.crash_after_tokens
            ):
                self._hand_over()  # what was emitted so far is out, as with a real crash mid-stream
                os._exit(1)
            if len(seq.tokens) - seq.n_prompt < seq.limit and not seq.text.stopped:
                return
        tail = seq.text.finish()
        if tail and job.request.stream:
            job.emit(CompletionChunk(content=tail, logprobs=take_logprobs(seq.logprobs)))
        now = time.perf_counter_ns()
        first = seq.first_token_at or now
        n_gen = len(seq.tokens) - seq.n_prompt
        at_limit = n_gen >= seq.limit and not seq.text.stopped
        reason: DoneReason = (
            "length"
            if at_limit and (seq.capped or job.request.options.num_predict != -1)
            else "stop"
        )
        seq.done = True
        self._slot_caches.append(seq.tokens[:-1] if n_gen else seq.tokens)
        job.emit(
            CompletionDone(
                content="" if job.request.stream else "".join(seq.text.text),
                done_reason=reason,
                prompt_eval_count=seq.n_prompt,
                prompt_eval_cached_count=seq.n_cached,
                truncated=job.truncated,
                prompt_eval_duration=max(1, first - seq.started),
                eval_count=n_gen,
                eval_duration=max(1, now - first),
                tokens=seq.tokens,
                logprobs=take_logprobs(seq.logprobs),
            )
        )

    def _logprob(self, tok: int, json_mode: bool, top: int) -> TokenLogprob:
        """The fake's true distribution: JSON_WORDS are certain, WORDS are drawn uniformly."""
        if json_mode:
            cands, lp = [tok], 0.0
        else:
            cands, lp = [_BASE + i for i in range(len(WORDS))], -math.log(len(WORDS))
        alts = [
            TopLogprob(token=self._piece(t).decode(), logprob=lp, bytes=list(self._piece(t)))
            for t in cands[:top]
        ]
        piece = self._piece(tok)
        return TokenLogprob(token=piece.decode(), logprob=lp, bytes=list(piece), top_logprobs=alts)

    # -- tokens and embeddings -----------------------------------------------------------------

    def _piece(self, tok: int) -> bytes:
        if tok < _BASE:
            return bytes([tok])
        vocab = WORDS + JSON_WORDS
        return vocab[(tok - _BASE) % len(vocab)].encode()

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._piece(t) for t in tokens).decode("utf-8", errors="replace")

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResponse:
        out, count = [], 0
        for text in inputs:
            toks = self.tokenize(text, True, True)
            if len(toks) > self.n_ctx_per_slot:
                if not truncate:
                    raise BadRequest("the input length exceeds the context length")
                toks = toks[: self.n_ctx_per_slot]
            count += len(toks)
            digest = hashlib.sha256(bytes(t & 0xFF for t in toks)).digest()
            vec = [
                (digest[i % len(digest)] - 127.5) / 127.5 for i in range(self.knobs.embedding_dim)
            ]
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return EmbedResponse(embeddings=out, prompt_eval_count=count)


def _common(cache: list[int], prompt: list[int]) -> int:
    """Tokens of ``prompt`` a slot holding ``cache`` need not evaluate: the common prefix, less
    the prompt's last token (a prompt is never served from the cache whole)."""
    n = 0
    for a, b in zip(cache, prompt[:-1], strict=False):
        if a != b:
            break
        n += 1
    return n
