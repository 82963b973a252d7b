"""The real engine: continuous batching on llama-cpp-python's low-level API.

One of the modules of corral that import ``llama_cpp``, with ``images.py`` (its multimodal
half), ``kvcache.py`` (sequence-state calls) and ``devices.py`` (the engine probe);
tests/test_imports.py holds the list.

Shape: one llama_model, one llama_context with ``n_seq_max = parallel`` and
``n_ctx = num_ctx * parallel`` (per-sequence KV streams, ``kv_unified = false``, so every slot
has exactly num_ctx cells), and ONE decode thread that owns the context. Other threads talk to it
only through ``submit`` (a locked inbox) and ``Job.cancel`` (an Event).

Each step of the decode thread:
1. drops cancelled jobs (their slot is free at once; the slot's KV is kept as its prompt cache),
2. admits waiting jobs into free slots, choosing the free slot whose cached tokens share the
   longest prefix with the prompt; only the tokens after that prefix are evaluated,
3. builds ONE llama_batch over numpy arrays (``_Batch``): the next token of every decoding
   sequence written with a few array stores, then prompt chunks of sequences in prefill while
   the batch has room (``num_batch``),
4. calls llama_decode once (a small pure-decode batch on one OpenMP thread when that measured
   faster, ``_threads_for``),
5. reads the step's logits as one (rows x vocab) array and chooses every row's token at once
   (``_choose``: one argmax for the greedy rows, runner/sampling.py for the usual sampling
   chains, llama.cpp's own chain per sequence only for penalties, typical_p or a grammar), then
   takes each token (``_take_rows``): a token with a complete, plain piece (the piece table)
   that cannot touch a stop string or a limit costs a few list operations; anything else (the
   first token, end of generation, stop strings, partial UTF-8, logprobs, a full context) goes
   through ``_accept``,
6. hands the step's events over at its end: the text of the relay jobs (the daemon's streams)
   in ONE ``relay_chunks`` call for all of them, every other event to its job's ``emit``.

Per step, the Python work that grows with the number of sequences is those list operations
(about a microsecond per sequence); everything else is a fixed number of numpy and ctypes
calls (docs/DESIGN.md "Per-step cost").

Embeddings use a second context with ``embeddings = true`` on the same llama_model (created at
load for an embedding model, else on the first /embed), driven by the caller's thread (the server
serialises /embed calls).

Length: over 900 lines because every ctypes call of the decode loop, sampling and embeddings is
here: the llama.cpp side of a runner reads in one file (images and the probe are apart).
"""

from __future__ import annotations

import collections
import ctypes
import json
import math
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable

import llama_cpp
import numpy as np
import psutil
import structlog
from llama_cpp import llama_grammar

from corral.runner import images, kvcache, sampling
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
    KvCacheReport,
    LaunchSpec,
    MemoryUse,
    SamplingOptions,
    TokenLogprob,
    TopLogprob,
)

log = structlog.get_logger(__name__)

_MiB = 1 << 20

_KV_TYPES = {
    "f32": llama_cpp.GGML_TYPE_F32,
    "f16": llama_cpp.GGML_TYPE_F16,
    "bf16": 30,  # GGML_TYPE_BF16
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
    "q4_1": llama_cpp.GGML_TYPE_Q4_1,
    "iq4_nl": llama_cpp.GGML_TYPE_IQ4_NL,
    "q5_0": llama_cpp.GGML_TYPE_Q5_0,
    "q5_1": llama_cpp.GGML_TYPE_Q5_1,
}
# llama_get_logits returning the address as an int (llama_cpp's binding returns a float pointer,
# whose .contents / cast cost an object each): the step's logits view is cached by address
_logits_address = llama_cpp.llama_cpp._lib["llama_get_logits"]
_logits_address.argtypes, _logits_address.restype = [ctypes.c_void_p], ctypes.c_void_p

_SPLIT = {
    "none": llama_cpp.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_cpp.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_cpp.LLAMA_SPLIT_MODE_ROW,
}

# "load_tensors:   CPU_Mapped model buffer size =   100.00 MiB", "llama_kv_cache:  CUDA0 KV buffer
# size = 36.00 MiB", "llama_context:  CPU compute buffer size = 77.5 MiB", output/RS buffers too.
_BUFFER_LINE = re.compile(
    r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([0-9.]+)\s*MiB"
)
# The vision projector (libmtmd's clip) logs its device, then its weights without "buffer".
_CLIP_DEVICE = re.compile(r"CLIP using (\S+) backend")
_CLIP_WEIGHTS = re.compile(r"load_hparams: model size:\s*([0-9.]+)\s*MiB")
_LOG_DEBUG, _LOG_CONT = (
    1,
    5,
)  # enum ggml_log_level (include/ggml.h): NONE, DEBUG, INFO, WARN, ERROR, CONT
_OOM_TEXT = re.compile(
    r"out of memory|failed to allocate|cudaMalloc failed|unable to allocate", re.I
)


def _device_name(buffer_name: str) -> str:
    """``CPU_Mapped``/``CPU_REPACK``/``CUDA_Host`` -> ``CPU``; ``CUDA0`` -> ``CUDA0``."""
    base, _, suffix = buffer_name.partition("_")
    if base == "CPU" or suffix.lower() == "host":
        return "CPU"
    return base


class _LlamaLog:
    """Receives llama.cpp's log (any thread), forwards it to stderr line by line, and sums the
    buffer-size lines into bytes per device while ``capture`` is on. The ctypes callback object
    is kept here: if it were garbage-collected, llama.cpp would call freed memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partial = b""
        self.capture = True
        self.memory: dict[str, dict[str, int]] = {}
        self.clip_device = "CPU"
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.verbose = False  # forward GGML_LOG_LEVEL_DEBUG lines too
        self._level = _LOG_DEBUG
        self._callback = llama_cpp.llama_log_callback(self._on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        try:
            if not text:
                return
            with self._lock:
                if level != _LOG_CONT:  # CONT continues the previous line's level
                    self._level = level
                forward = self.verbose or self._level != _LOG_DEBUG
                data = self._partial + text
                *lines, self._partial = data.split(b"\n")
                for raw in lines:
                    self._line(raw.decode("utf-8", errors="replace"), forward)
        except Exception:  # never raise into C
            pass

    def _line(self, line: str, forward: bool = True) -> None:
        if forward:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self.tail.append(line)
        if not self.capture:
            return
        m = _BUFFER_LINE.search(line)
        if m:
            dev = self.memory.setdefault(
                _device_name(m.group(1)), {"weights": 0, "kv": 0, "compute": 0}
            )
            kind = {"model": "weights", "KV": "kv", "RS": "kv"}.get(m.group(2), "compute")
            dev[kind] += int(float(m.group(3)) * _MiB)
        elif m := _CLIP_DEVICE.search(line):
            self.clip_device = _device_name(m.group(1))
        elif m := _CLIP_WEIGHTS.search(line):
            dev = self.memory.setdefault(self.clip_device, {"weights": 0, "kv": 0, "compute": 0})
            dev["weights"] += int(float(m.group(1)) * _MiB)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._line(self._partial.decode("utf-8", errors="replace"))
                self._partial = b""

    def usage(self) -> dict[str, MemoryUse]:
        with self._lock:
            return {d: MemoryUse(**v) for d, v in self.memory.items()}

    def oom_seen(self) -> bool:
        return any(_OOM_TEXT.search(line) for line in self.tail)


_LOG: _LlamaLog | None = None


def init_backend() -> _LlamaLog:
    """llama.cpp's backend initialisation and our log callback, once per process (the first
    load, or a spare runner's warm-up) and the identity of the build (kvcache.build_id, read
    from the libraries' bytes)."""
    global _LOG
    if _LOG is None:
        llama_cpp.llama_backend_init()
        _LOG = _LlamaLog()
        kvcache.build_id()
    return _LOG


class _SchemaConverter(llama_grammar.SchemaConverter):
    """llama-cpp-python's converter writes constants with json.dumps' ASCII escapes, which the
    GBNF parser reads back as code points: a non-BMP character (an emoji) becomes two surrogates,
    i.e. invalid UTF-8. Write constants as real characters instead."""

    def _generate_constant_rule(self, value):
        return self._format_literal(json.dumps(value, ensure_ascii=False))


def schema_to_gbnf(schema: dict) -> str:
    """GBNF for a JSON schema (remote $refs are not fetched)."""
    converter = _SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "input"), "")
    return converter.format_grammar()


def _default_threads() -> int:
    try:
        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, n or os.cpu_count() or 1)


class _Slot:
    """One sequence of the context (seq_id = index). ``cache`` are the tokens whose KV is in the
    sequence at positions 0..len-1; everything else is per-request state."""

    def __init__(self, seq_id: int) -> None:
        self.id = seq_id
        self.cache: list[int] = []
        self.last_used = 0
        self.job: Job | None = None
        # runner/kvcache.py: the partial state at the end of the last prompt (SWA/recurrent
        # models), and how many leading cells are what a fresh evaluation gives (a context
        # shift leaves only the kept ones)
        self.checkpoint: kvcache.Checkpoint | None = None
        self.exact: float = math.inf

    def start(self, job: Job, prompt: list[int], n_cached: int, truncated: bool) -> None:
        self.job = job
        self.media: dict[int, images.Span] = job.media
        self.pending = prompt[n_cached:]  # prompt tokens (and image cells) still to evaluate
        self.n_prompt, self.n_cached = len(prompt), n_cached  # for the counts of the final record
        self.tokens = list(prompt)  # prompt + generated, for the final record
        self.n_generated = 0
        self.next_token: int | None = None  # sampled, to be decoded at the next step
        self.batch_index = -1  # where this slot's logits are in the current batch
        self.text = TextStream(job.request.options.stop)
        self.truncated = truncated
        self.t_start = 0
        self.t_first = 0
        self.sampler, self.grammar = job.sampler
        # how the token is chosen (Engine._choose): numpy's argmax (greedy), a numpy chain
        # (runner/sampling.py), else llama.cpp's chain (penalties, typical_p, a grammar)
        o = job.request.options
        self.argmax = self.sampler is None and sampling.greedy(o)
        self.chain = (
            None if self.sampler is not None or self.argmax else sampling.Chain(o, job.seed)
        )
        self.relay = job.relay  # > 0: its text goes to the engine's relay_chunks
        self.limit = job.limit  # generated tokens that end it with "length"
        self.fast = False  # the next token may be taken by Engine._take_rows' short path
        # the grammar waits until the model is past its thinking (format_after), see _sample
        self.grammar_wait = job.request.format_after if self.grammar else None
        self.generated = ""  # generated text while the grammar waits
        self.logprobs: list[TokenLogprob] = []  # not yet reported (stream) / all (stream=false)

    def release(self) -> None:
        if self.job is not None:
            _free_samplers((self.sampler, self.grammar))
            self.sampler = self.grammar = None
        self.job = None


def _free_samplers(pair: tuple[object, object]) -> None:
    for smpl in pair:
        if smpl:
            llama_cpp.llama_sampler_free(smpl)


class _Batch:
    """The decode batch: a llama_batch whose arrays are numpy memory (one sequence per token), so
    a step writes the tokens of all its sequences with a few array stores, not five ctypes stores
    per token. ``raw`` is what llama_decode gets; nothing here is freed by llama.cpp."""

    def __init__(self, size: int) -> None:
        self.token = np.zeros(size, dtype=np.int32)
        self.pos = np.zeros(size, dtype=np.int32)
        self.seq = np.zeros(size, dtype=np.int32)
        self.logits = np.zeros(size, dtype=np.int8)
        self._n_seq = np.ones(size, dtype=np.int32)
        i32 = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (i32 * size)(*(ctypes.cast(base + 4 * i, i32) for i in range(size)))
        self.raw = llama_cpp.llama_batch(
            n_tokens=0,
            token=self.token.ctypes.data_as(i32),
            embd=None,
            pos=self.pos.ctypes.data_as(i32),
            n_seq_id=self._n_seq.ctypes.data_as(i32),
            seq_id=self._seq_ptrs,
            logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def next_tokens(self, tokens: list[int], pos: list[int], seqs: list[int]) -> None:
        """Entries 0..n-1: one token per sequence, each with logits."""
        n = len(tokens)
        if n == 1:  # scalar stores: a list's conversion costs more for one entry
            self.token[0], self.pos[0], self.seq[0], self.logits[0] = tokens[0], pos[0], seqs[0], 1
            return
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq[:n] = seqs
        self.logits[:n] = 1

    def run(self, at: int, tokens: list[int], pos: int, seq: int, last: bool) -> None:
        """Entries at..at+len-1: prompt tokens of one sequence from position ``pos``; logits for
        the last one if ``last``."""
        end = at + len(tokens)
        self.token[at:end] = tokens
        self.pos[at:end] = np.arange(pos, pos + len(tokens), dtype=np.int32)
        self.seq[at:end] = seq
        self.logits[at:end] = 0
        if last:
            self.logits[end - 1] = 1


class _Candidates:
    """A llama_token_data_array over numpy memory (decode thread only), for sampling by hand."""

    _dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)

    def __init__(self, n: int) -> None:
        self.data = np.zeros(n, dtype=self._dtype)
        self.ids = np.arange(n, dtype=np.intc)
        self.arr = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=n,
            selected=-1,
            sorted=False,
        )

    def fill(self, logits: np.ndarray) -> None:
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.arr.size = len(self.data)
        self.arr.selected = -1
        self.arr.sorted = False

    def apply(self, smpl) -> None:
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(self.arr))

    def selected(self) -> int:
        return int(self.data[self.arr.selected]["id"])


class Engine:
    def __init__(self, spec: LaunchSpec) -> None:
        self.spec = spec
        self.parallel = max(1, spec.parallel)
        self.n_ctx_per_slot = spec.num_ctx
        self.n_ctx = spec.num_ctx * self.parallel
        self.n_ctx_train = 0
        self.memory: dict[str, MemoryUse] = {}
        self.n_threads = spec.num_thread if spec.num_thread > 0 else _default_threads()
        self.model = None
        self.ctx = None
        self.embd_ctx = None
        self.vision: images.Vision | None = None
        self.steps = 0  # decode steps so far (read by tests from emit callbacks)
        self._cond = threading.Condition()
        self._inbox: collections.deque[Job] = collections.deque()
        self._waiting: collections.deque[Job] = collections.deque()
        self._cancel_all: str | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._slots: list[_Slot] = []
        self._active: list[_Slot] = []  # the slots with a job, in slot order (decode thread)
        # EMA seconds of a pure-decode llama_decode by (batch size, OpenMP threads)
        self._cost: dict[tuple[int, int], float] = {}
        self._explore = 0
        self._explore_threads = 0
        self._threads_now = self.n_threads  # what llama_set_n_threads last set
        self._embd_lock = threading.Lock()
        # events of the current step, handed over when it ends: the HTTP side then wakes once per
        # step, not in the middle of sampling (where every ctypes call lets it take the GIL)
        self._outbox: list[tuple[Emit, CompletionChunk | CompletionDone | CompletionError]] = []
        self.after_emit: Callable[[], None] = no_op
        # where saved-prompt-cache counts go (the runner sends them up the event pipe)
        self.report: Callable[[KvCacheReport], None] = lambda report: None
        self._prefix: kvcache.PromptCache | None = None
        # relay mode: the server's sink for a step's text chunks of relay jobs (ids, texts)
        self.relay_chunks: Callable[[list[int], list[str]], None] | None = None
        self._relay_ids: list[int] = []  # this step's, for relay_chunks
        self._relay_texts: list[str] = []
        # token -> its piece: text when it is whole UTF-8, else bytes; None not looked up yet
        # or an end of generation (see _piece_entry)
        self._pieces: list[str | bytes | None] = []
        self._views: dict[tuple[int, int], np.ndarray] = {}  # logits views by (address, rows)
        self._keepalive: list[object] = []  # ctypes objects llama.cpp points at

    # -- load --------------------------------------------------------------------------------

    def load(self, progress: Callable[[float], None]) -> None:
        """Blocking. Raise LoadError(reason, oom) when the model or the context cannot be made."""
        llog = init_backend()
        llog.capture = True
        llog.verbose = self.spec.verbose
        llog.memory.clear()
        spec = self.spec
        if not os.path.exists(spec.model_path):
            raise LoadError(f"model file not found: {spec.model_path}")

        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = spec.n_gpu_layers if spec.n_gpu_layers >= 0 else 999
        mp.split_mode = _SPLIT[spec.split_mode]
        mp.main_gpu = spec.main_gpu
        mp.load_mode = (
            llama_cpp.LLAMA_LOAD_MODE_MMAP if spec.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        )
        if spec.tensor_split:
            n = max(llama_cpp.llama_max_devices(), len(spec.tensor_split))
            arr = (ctypes.c_float * n)(*spec.tensor_split)
            self._keepalive.append(arr)
            mp.tensor_split = arr

        last = [0.0]

        def on_progress(p: float, _user: ctypes.c_void_p) -> bool:
            if p - last[0] >= 0.1 or p >= 1.0:
                last[0] = p
                try:
                    progress(min(1.0, float(p)) * 0.9)
                except Exception:
                    pass
            return True

        cb = llama_cpp.llama_progress_callback(on_progress)
        self._keepalive.append(cb)
        mp.progress_callback = cb

        model = llama_cpp.llama_model_load_from_file(spec.model_path.encode(), mp)
        if not model:
            llog.flush()
            raise LoadError(self._failure_text("failed to load model"), oom=llog.oom_seen())
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_embd = llama_cpp.llama_model_n_embd(model)

        if not spec.embedding:
            cp = self._context_params()
            ctx = llama_cpp.llama_init_from_model(model, cp)
            if not ctx:
                llog.flush()
                raise LoadError(
                    self._failure_text("failed to create the context"), oom=llog.oom_seen()
                )
            self.ctx = ctx
            self.mem = llama_cpp.llama_get_memory(ctx)
            self.n_ctx = llama_cpp.llama_n_ctx(ctx)
            self.n_ctx_per_slot = llama_cpp.llama_n_ctx_seq(ctx)
            self.can_shift = bool(llama_cpp.llama_memory_can_shift(self.mem))
            self.n_batch = max(self.spec.num_batch, self.parallel)
            self._batch = _Batch(self.n_batch)
            self._pieces = [None] * self.n_vocab
            self._slots = [_Slot(i) for i in range(self.parallel)]
            self._candidates = _Candidates(self.n_vocab)
            self._one = _Candidates(1)
            self._prefix = kvcache.PromptCache(self, spec, lambda r: self.report(r))
            if spec.projector_path:
                self.vision = images.Vision(
                    spec.projector_path,
                    model,
                    use_gpu=spec.n_gpu_layers != 0,
                    n_threads=self.n_threads,
                    failure_text=self._failure_text,
                    log_callback=llog._callback,
                )
        else:
            self._embedding_context()  # raises LoadError
            self.n_ctx = self.n_ctx_per_slot
        llog.flush()
        llog.capture = False
        self.memory = llog.usage()
        progress(1.0)

    def _failure_text(self, what: str) -> str:
        assert _LOG is not None
        errors = [line for line in _LOG.tail if "error" in line.lower() or "failed" in line.lower()]
        return f"{what}: {errors[-1].strip()}" if errors else what

    def _context_params(self, embeddings: bool = False):
        spec = self.spec
        cp = llama_cpp.llama_context_default_params()
        cp.n_threads = self.n_threads
        cp.n_threads_batch = self.n_threads
        cp.type_k = cp.type_v = _KV_TYPES[spec.kv_cache_type]
        if spec.flash_attention is not None:
            cp.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if spec.flash_attention
                else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        cp.no_perf = True
        if embeddings:
            cp.n_ctx = spec.num_ctx
            cp.n_batch = cp.n_ubatch = (
                spec.num_ctx
            )  # a non-causal model needs the input in one ubatch
            cp.n_seq_max = 1
            cp.embeddings = True
        else:
            cp.n_ctx = spec.num_ctx * self.parallel
            cp.n_batch = max(spec.num_batch, self.parallel)
            cp.n_ubatch = min(cp.n_batch, 512)
            cp.n_seq_max = self.parallel
            cp.kv_unified = False  # one KV stream per slot, num_ctx cells each
            # llama.cpp's default is the full-size sliding-window cache; llama-server's (and
            # ours) the small one: window + ubatch cells per slot (runner/kvcache.py)
            cp.swa_full = spec.swa_full
            cp.embeddings = False
        return cp

    def _embedding_context(self) -> None:
        """Create the embeddings context (mean pooling when the model declares none)."""
        cp = self._context_params(embeddings=True)
        ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if ctx and llama_cpp.llama_pooling_type(ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            llama_cpp.llama_free(ctx)
            cp.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
            ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not ctx:
            assert _LOG is not None
            raise LoadError(
                self._failure_text("failed to create the embedding context"), oom=_LOG.oom_seen()
            )
        self.embd_ctx = ctx
        self.n_ctx_per_slot = llama_cpp.llama_n_ctx(ctx)

    # -- thread lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self.ctx is None:
            return  # embedding-only runner: no decode thread
        self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)
        self._thread.start()

    def close(self, save_by: float | None = None) -> None:
        """Cancel everything, stop the decode thread, save the slots' prompt caches (until
        ``save_by``, time.monotonic(); with a LaunchSpec.kv_cache), free llama.cpp objects.
        Blocks."""
        with self._cond:
            self._stopping = True
            self._cancel_all = self._cancel_all or "runner closed"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                return  # a decode is stuck; the process exit frees everything
        for slot in self._slots:
            slot.release()
        if self._prefix is not None:
            try:
                self._prefix.save_all(self._slots, save_by)
            except Exception:  # a save must never keep the runner from stopping
                log.exception("saving the prompt caches failed")
            self._prefix = None
        if self.vision is not None:
            self.vision.close()
            self.vision = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        with self._embd_lock:
            if self.embd_ctx is not None:
                llama_cpp.llama_free(self.embd_ctx)
                self.embd_ctx = None
        if self.model is not None:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def busy(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    def queued(self) -> int:
        return len(self._waiting) + len(self._inbox)

    def kv_used(self) -> int:
        """KV cells held by running sequences (read without the decode thread: a snapshot)."""
        return sum(len(s.cache) for s in self._slots if s.job is not None)

    def cancel_all(self, reason: str) -> None:
        """Every queued and running job ends with CompletionError(reason) at the next step."""
        with self._cond:
            self._cancel_all = reason
            self._cond.notify_all()

    # -- tokens --------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), buf, n_max, add_special, parse_special
        )
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), buf, n_max, add_special, parse_special
            )
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        if any(t < 0 or t >= self.n_vocab for t in tokens):
            raise BadRequest(f"token id out of range [0, {self.n_vocab})")
        arr = (llama_cpp.llama_token * max(1, len(tokens)))(*tokens)
        size = 16 * len(tokens) + 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(tokens), buf, size, False, True)
        if n < 0:
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(self.vocab, arr, len(tokens), buf, size, False, True)
        return buf.raw[:n].decode("utf-8", errors="replace")

    # -- submit (any thread) --------------------------------------------------------------------

    def submit(self, request: CompletionRequest, emit: Emit, relay: int = 0) -> Job:
        """Validate, tokenize, build the sampler chain; queue the job (``relay``: see
        EngineLike.submit). Raise BadRequest."""
        if self.ctx is None:
            raise BadRequest("this runner was loaded for embeddings only")
        prompt = list(request.tokens or [])
        if any(t < 0 or t >= self.n_vocab for t in prompt):
            raise BadRequest(f"token id out of range [0, {self.n_vocab})")
        media: dict[int, images.Span] = {}
        if request.prompt and self.vision is not None and request.images:
            ids, spans = self.vision.tokenize(
                request.prompt, request.images, request.add_special and not prompt
            )
            media = {len(prompt) + i: span for i, span in spans.items()}
            prompt += ids
        elif request.prompt:
            prompt += self.tokenize(request.prompt, request.add_special and not prompt, True)
        if not prompt:
            raise BadRequest("empty prompt")
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
        opts = request.options
        truncated = False
        shift = (self.spec.shift if request.shift is None else request.shift) and self.can_shift
        n_ctx = self.n_ctx_per_slot
        limit = prompt_cut(len(prompt), n_ctx, opts.num_keep, request.truncate, shift)
        if len(prompt) > limit:
            keep = images.span_edges(media, max(0, min(opts.num_keep, n_ctx - 1)))[0]
            tail = images.span_edges(media, len(prompt) - (limit - keep))[1]  # images are cut whole
            media = {
                i if i < keep else i - tail + keep: sp
                for i, sp in media.items()
                if i < keep or i >= tail
            }
            prompt = prompt[:keep] + prompt[tail:]
            truncated = True
        if media:  # encode here, off the decode thread, unless a slot has the image cached
            assert self.vision is not None
            cached = {t for slot in self._slots for t in list(slot.cache) if t < 0}
            for span in media.values():
                if span.key not in cached:
                    try:
                        self.vision.encode(span, self.n_embd)
                    except RuntimeError as e:
                        raise BadRequest(
                            f"Failed to create new sequence: failed to process inputs: {e}"
                        ) from None
        job = Job(request, emit)
        job.prompt = prompt
        job.media = media
        job.truncated = truncated
        grammar = self._grammar(request.format)
        numpy_picks = grammar is None and (sampling.greedy(opts) or sampling.numpy_chain(opts))
        job.sampler = (None if numpy_picks else self._sampler(opts, prompt), grammar)
        job.seed = opts.seed if opts.seed >= 0 else random.getrandbits(64)
        job.relay = relay if request.stream and self.relay_chunks is not None else 0
        job.limit = self._limit(opts)
        with self._cond:
            if self._stopping:
                _free_samplers(job.sampler)
                raise BadRequest("runner is shutting down")
            self._inbox.append(job)
            self._cond.notify_all()
        return job

    def _limit(self, o: SamplingOptions) -> int:
        """Generated tokens after which a job ends with "length": num_predict, and
        LaunchSpec.predict_limit x num_ctx (a model that never ends its turn can't hold a slot
        forever)."""
        caps = [o.num_predict] if o.num_predict > 0 else []
        if self.spec.predict_limit:
            caps.append(self.spec.predict_limit * self.n_ctx_per_slot)
        return min(caps, default=sys.maxsize)

    def _grammar(self, fmt: object):
        """The grammar sampler for format "json" or a JSON schema (None without a format). It is
        kept out of the chain: see _pick."""
        if fmt is None:
            return None
        try:
            gbnf = llama_grammar.JSON_GBNF if fmt == "json" else schema_to_gbnf(fmt)  # type: ignore[arg-type]
        except Exception as e:
            raise BadRequest(f"invalid JSON schema in format: {e}") from None
        grammar = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode(), b"root")
        if not grammar:
            raise BadRequest("invalid format: the grammar could not be built")
        return grammar

    def _sampler(self, o: SamplingOptions, prompt: list[int]):
        """Ollama's sampling as a llama.cpp chain: top_k, [penalties], typical_p, top_p, min_p,
        temperature, dist(seed); [penalties] greedy when temperature <= 0."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        penalize = (
            o.repeat_penalty != 1.0 or o.presence_penalty != 0.0 or o.frequency_penalty != 0.0
        )
        last_n = self.n_ctx_per_slot if o.repeat_last_n < 0 else o.repeat_last_n
        if o.temperature <= 0:
            if penalize and last_n:
                add(self._penalties(o, last_n, prompt))
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if o.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(o.top_k))
        if penalize and last_n:
            add(self._penalties(o, last_n, prompt))
        if 0 < o.typical_p < 1.0:
            add(llama_cpp.llama_sampler_init_typical(o.typical_p, 1))
        if 0 < o.top_p < 1.0:
            add(llama_cpp.llama_sampler_init_top_p(o.top_p, 1))
        if o.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(o.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(o.temperature))
        seed = o.seed & 0xFFFFFFFF if o.seed >= 0 else llama_cpp.LLAMA_DEFAULT_SEED
        add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _penalties(self, o: SamplingOptions, last_n: int, prompt: list[int]):
        s = llama_cpp.llama_sampler_init_penalties(
            self.n_vocab, last_n, o.repeat_penalty, o.frequency_penalty, o.presence_penalty
        )
        for t in prompt[-last_n:]:  # the prompt counts as history, not the grammar's
            llama_cpp.llama_sampler_accept(s, t)
        return s

    # -- decode thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                # a step that follows a step with nothing new: no lock (the flags and the inbox
                # are read atomically; anything that arrives now is seen at the next step)
                if (
                    self._active
                    and not self._inbox
                    and self._cancel_all is None
                    and not self._stopping
                ):
                    self._step()
                    continue
                with self._cond:
                    while (
                        not self._stopping
                        and not self._inbox
                        and self._cancel_all is None
                        and not self._has_work()
                    ):
                        self._cond.wait()
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    reason, self._cancel_all = self._cancel_all, None
                    stopping = self._stopping
                if reason is not None:
                    self._fail_everything(reason)
                if stopping:
                    return
                self._step()
        except BaseException as e:  # a bug must not leave clients hanging
            self._fail_everything(f"decode loop failed: {type(e).__name__}: {e}")
            raise

    def _has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def _fail_everything(self, reason: str) -> None:
        for slot in self._slots:
            if slot.job is not None:
                job = slot.job
                self._free(slot)
                if not job.cancelled.is_set():
                    job.emit(CompletionError(error=reason))
        while self._waiting:
            job = self._waiting.popleft()
            _free_samplers(job.sampler)
            if not job.cancelled.is_set():
                job.emit(CompletionError(error=reason))
        self.after_emit()

    def _free(self, slot: _Slot) -> None:
        """The slot takes new work at once. Its KV stays as the prompt cache: with one KV stream
        per slot the cells could not serve another sequence anyway."""
        slot.release()
        slot.last_used = self.steps
        self._refresh_active()

    def _refresh_active(self) -> None:
        """``_active``, the slots with a job in slot order: kept, not derived per step, because
        every step walks it; set again whenever a slot starts or is freed."""
        self._active = [s for s in self._slots if s.job is not None]

    def _admit(self) -> None:
        # drop jobs cancelled while waiting
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            _free_samplers(job.sampler)
        while self._waiting:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            prompt: list[int] = job.prompt

            def common(slot: _Slot, prompt: list[int] = prompt) -> int:
                n = 0
                for a, b in zip(slot.cache, prompt, strict=False):
                    if a != b:
                        break
                    n += 1
                return n

            slot = max(free, key=lambda s: (common(s), -s.last_used))
            n = min(common(slot), len(prompt) - 1)  # at least one token is evaluated for logits
            n = images.span_edges(job.media, n)[0]
            assert self._prefix is not None
            n = self._prefix.reuse(slot, prompt, n, job.media)
            slot.start(job, prompt, n, job.truncated)
            self._refresh_active()

    def _step(self) -> None:
        try:
            self._step_slots()
        finally:
            ids, texts = self._relay_ids, self._relay_texts
            if ids:
                self._relay_ids, self._relay_texts = [], []
                assert self.relay_chunks is not None
                self.relay_chunks(ids, texts)  # before the events: a job's last chunk, then done
            if self._outbox:
                out, self._outbox = self._outbox, []
                for emit, event in out:
                    emit(event)
                self.after_emit()

    def _post(self, job: Job, event: CompletionChunk | CompletionDone | CompletionError) -> None:
        """Emit ``event`` at the end of this step (in order)."""
        self._outbox.append((job.emit, event))

    def _step_slots(self) -> None:
        # 1. cancelled sequences leave at once
        for slot in self._active:
            if slot.job is not None and slot.job.cancelled.is_set():
                self._free(slot)
        # 2. new work joins
        if self._waiting:
            self._admit()
        active = self._active
        if not active:
            return
        # 3-5. normally ONE batch for all; see _split for the exception
        for group in self._split(active):
            self._decode_group(group)
        self.steps += 1

    def _split(self, active: list[_Slot]) -> list[list[_Slot]]:
        """Groups to decode this step, in order. One group (one llama_decode) unless every active
        sequence only decodes its next token and the measured cost says k single-token calls are
        cheaper than one k-token call (ggml's kernels can make a 2-token batch cost more than
        two 1-token ones). Every 32nd such step batches anyway, to keep the measure fresh."""
        k = len(active)
        if k == 1 or any(s.pending for s in active):
            return [active]
        c1, ck = self._best_cost(1), self._best_cost(k)
        self._explore += 1
        if c1 is None or ck is None or c1 * k >= ck or self._explore % 32 == 0:
            return [active]
        return [[s] for s in active]

    def _best_cost(self, n: int) -> float | None:
        known = [c for (size, _), c in self._cost.items() if size == n]
        return min(known) if known else None

    def _threads_for(self, n: int) -> int:
        """OpenMP threads for a pure-decode batch of ``n`` tokens: all of them, or one when that
        measured faster. A small step (a tiny model, a few sequences of a small one) does so
        little at each of the graph's ~70-300 nodes that the threads' barrier hand-offs cost
        more than they share, and on a machine whose cores are shared with other processes a
        partner thread that lost its core stalls every barrier. The count not in use is tried
        again every 32nd such step while the two measured within 1.5x of each other, every 256th
        within 4x (at most ~0.4 % of the steps of a model that gains from its threads), else
        every 2048th (the tiny model's one-sequence step: ~1.8 ms on two threads against ~0.14
        ms on one; a try every 256th step cost ~7 us per token)."""
        full = self.n_threads
        if full == 1:
            return 1
        many, one = self._cost.get((n, full)), self._cost.get((n, 1))
        if many is None:
            return full
        if one is None:
            return 1
        self._explore_threads += 1
        best, other = (1, full) if one < many else (full, 1)
        lo, hi = min(one, many), max(one, many)
        every = 32 if hi < 1.5 * lo else 256 if hi < 4 * lo else 2048
        return other if self._explore_threads % every == 0 else best

    def _use_threads(self, threads: int) -> None:
        if threads != self._threads_now:
            llama_cpp.llama_set_n_threads(self.ctx, threads, threads)
            self._threads_now = threads

    def _decode_group(self, group: list[_Slot]) -> None:
        # 3a. images at the head of a prompt: encoded and decoded on their own (an embeddings
        # batch cannot carry tokens); a prompt ending in an image samples from it right away
        for s in group:
            while s.job is not None and s.pending and s.pending[0] < 0:
                self._eval_image(s, time.perf_counter_ns())
        # 3b. one batch: next tokens first, then prompt chunks while there is room. ``rows``:
        # the slots whose logits this decode produces, in batch order (= their logits rows)
        rows: list[_Slot] = []
        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        for s in group:
            s.batch_index = -1
            t = s.next_token
            if t is not None:
                s.batch_index = len(rows)
                rows.append(s)
                tokens.append(t)
                pos.append(len(s.cache))
                seqs.append(s.id)
                s.cache.append(t)
                s.next_token = None
        b = self._batch
        b.next_tokens(tokens, pos, seqs)
        n = pure_decode = len(rows)
        for s in group:
            if not s.pending or n >= self.n_batch or s.pending[0] < 0:
                continue
            if not s.t_start:
                s.t_start = time.perf_counter_ns()
            take = s.pending[: self.n_batch - n]
            if s.media:
                take = take[: next((i for i, t in enumerate(take) if t < 0), len(take))]
            del s.pending[: len(take)]
            last = not s.pending
            b.run(n, take, len(s.cache), s.id, last)
            s.cache += take
            n += len(take)
            if last:
                s.batch_index = n - 1
                rows.append(s)
        b.raw.n_tokens = n
        # 4. decode (a pure-decode batch with the thread count that measured faster)
        threads = self._threads_for(n) if pure_decode == n else self.n_threads
        self._use_threads(threads)
        t0 = time.perf_counter()
        rc = llama_cpp.llama_decode(self.ctx, b.raw)
        if pure_decode == n and rc == 0:
            key = (n, threads)
            old = self._cost.get(key)
            took = time.perf_counter() - t0
            self._cost[key] = took if old is None else 0.8 * old + 0.2 * took
        if rc != 0:
            reason = f"llama_decode failed ({rc})"
            for s in group:
                job = s.job
                llama_cpp.llama_memory_seq_rm(self.mem, s.id, -1, -1)
                s.cache = []
                self._free(s)
                if job is not None and not job.cancelled.is_set():
                    self._post(job, CompletionError(error=reason))
            return
        # 5. choose and take every row's token (before the next llama_decode overwrites them)
        if rows:
            self._take_rows(rows, self._choose(rows, self._logit_rows(len(rows))))

    def _logit_rows(self, n: int) -> np.ndarray:
        """The last decode's logits, one row per output in batch order (a view of llama.cpp's
        buffer, valid until the next llama_decode)."""
        key = (_logits_address(self.ctx), n)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 256:
                self._views.clear()
            ptr = ctypes.cast(key[0], ctypes.POINTER(ctypes.c_float))
            view = self._views[key] = np.ctypeslib.as_array(ptr, shape=(n, self.n_vocab))
        return view

    def _choose(self, rows: list[_Slot], logits: np.ndarray) -> list[int]:
        """The next token of every row: one argmax for the greedy rows, runner/sampling.py for
        the numpy chains, llama.cpp's chain (``_pick``) for the others, one by one."""
        n = len(rows)
        if n == 1:  # one row: no lists, and sampling.sample_one (the same draw as sample's)
            s = rows[0]
            if s.argmax:
                return [int(logits[0].argmax())]
            if s.chain is not None:
                return [sampling.sample_one(logits[0], s.chain)]
            return [self._pick(s)]
        greedy = [i for i, s in enumerate(rows) if s.argmax]
        if len(greedy) == n:
            return logits.argmax(axis=1).tolist()
        tokens = logits.argmax(axis=1).tolist() if greedy else [0] * n
        drawn = [i for i, s in enumerate(rows) if s.chain is not None]
        if len(drawn) == 1:
            i = drawn[0]
            chain = rows[i].chain
            assert chain is not None
            tokens[i] = sampling.sample_one(logits[i], chain)
        elif drawn:
            chains = [rows[i].chain for i in drawn]
            sub = logits if len(drawn) == n else logits[drawn]
            for i, t in zip(drawn, sampling.sample(sub, chains).tolist(), strict=True):  # type: ignore[arg-type]
                tokens[i] = t
        if len(greedy) + len(drawn) < n:
            for i, s in enumerate(rows):
                if not s.argmax and s.chain is None:
                    tokens[i] = self._pick(s)
        return tokens

    def _take_rows(self, rows: list[_Slot], tokens: list[int]) -> None:
        """Take each row's token. The short path, for a streaming job past its first token that
        needs nothing else from this one (not an end of generation, no logprobs, no thinking
        before a grammar, no limit or full context reached): count it, queue it for the next
        batch and its text for the step's events, the piece from the piece table (a whole UTF-8
        piece that cannot touch a stop string passes as is, anything else through the job's
        TextStream). Anything else goes through _accept."""
        pieces = self._pieces
        n_ctx = self.n_ctx_per_slot
        ids, texts = self._relay_ids, self._relay_texts
        for s, token in zip(rows, tokens, strict=True):
            piece = pieces[token]
            if piece is None:
                piece = self._piece_entry(token)  # still None: an end of generation
            job = s.job
            if (
                piece is None
                or job is None
                or not s.fast
                or s.n_generated + 1 >= s.limit
                or len(s.cache) >= n_ctx
            ):
                self._accept(s, token)
                continue
            s.n_generated += 1
            s.tokens.append(token)
            stream = s.text
            if isinstance(piece, str) and stream.passes(piece):
                text = piece
            else:
                text = stream.feed(piece if isinstance(piece, bytes) else piece.encode())
                if stream.stopped:
                    if text:
                        self._post(job, CompletionChunk(content=text))
                    self._finish(s, "stop")
                    continue
            s.next_token = token
            if not text:
                continue
            if s.relay:
                ids.append(s.relay)
                texts.append(text)
            else:
                self._post(job, CompletionChunk(content=text))

    def _piece_entry(self, token: int) -> str | bytes | None:
        """Fill the piece table's entry of ``token``: its piece as text when it is whole UTF-8,
        else its bytes; None (left unfilled) for an end of generation."""
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return None
        raw = self.piece(token)
        try:
            entry: str | bytes = raw.decode("utf-8")
        except UnicodeDecodeError:
            entry = raw
        self._pieces[token] = entry
        return entry

    def _eval_image(self, s: _Slot, now: int) -> None:
        """Encode the image at the head of ``s.pending`` and decode its embeddings into the
        slot's sequence (in n_batch pieces); logits of its last cell when it ends the prompt.
        A failure ends the request with an error and clears the slot's cache."""
        assert self.vision is not None and s.job is not None
        span = s.media[len(s.cache)]
        if not s.t_start:
            s.t_start = now
        del s.pending[: span.n_pos]
        last = not s.pending
        n_tok, n_embd = span.n_tokens, self.n_embd
        pos0 = len(s.cache)
        batch = None
        non_causal = self.vision.non_causal(span)
        try:
            embd = self.vision.encode(span, n_embd)  # at once unless submit did not encode it
            step = min(n_tok, self.n_batch)
            batch = llama_cpp.llama_batch_init(step, n_embd, 1)
            if non_causal:
                llama_cpp.llama_set_causal_attn(self.ctx, False)
            for off in range(0, n_tok, step):
                k = min(step, n_tok - off)
                ctypes.memmove(batch.embd, embd.ctypes.data + off * n_embd * 4, k * n_embd * 4)
                for i in range(k):
                    self._put_embd(batch, i, pos0 + off + i, s.id, last and off + i == n_tok - 1)
                batch.n_tokens = k
                self._use_threads(self.n_threads)  # a step may have left one thread set
                rc = llama_cpp.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed ({rc}) on an image")
        except RuntimeError as e:
            job = s.job
            llama_cpp.llama_memory_seq_rm(self.mem, s.id, -1, -1)
            s.cache = []
            self._free(s)
            if not job.cancelled.is_set():
                self._post(job, CompletionError(error=str(e)))
            return
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(self.ctx, True)
            if batch is not None:
                llama_cpp.llama_batch_free(batch)
        s.cache += [span.key] * span.n_pos
        span.embd = None  # the KV holds it now
        if last:
            s.batch_index = (n_tok - 1) % step
            self._sample(s)

    @staticmethod
    def _put_embd(b, i: int, pos: int, seq: int, logits: bool) -> None:
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits

    def _sample(self, s: _Slot) -> None:
        """Choose and take the token of one slot (a prompt that ended in an image)."""
        self._accept(s, self._pick(s))

    def _accept(self, s: _Slot, token: int) -> None:
        """Take ``token`` as the slot's next one, in full: the first token's timing, end of
        generation, logprobs, thinking before a grammar, stop strings, limits, a full context."""
        job = s.job
        assert job is not None
        req = job.request
        o = req.options
        now = time.perf_counter_ns()
        if not s.t_first:
            s.t_first = now
            assert self._prefix is not None
            self._prefix.prompt_done(s)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._finish(s, "stop")
        s.tokens.append(token)
        s.n_generated += 1
        piece = self.piece(token)
        if req.logprobs:
            s.logprobs.append(self._logprob(s, token, piece, req.top_logprobs))
        if s.grammar_wait is not None:
            s.generated += piece.decode("utf-8", errors="ignore")
            if past_thinking(s.generated, *s.grammar_wait):
                s.grammar_wait, s.generated = None, ""
        out = s.text.feed(piece)
        if out and req.stream:
            self._post(job, CompletionChunk(content=out, logprobs=take_logprobs(s.logprobs)))
        if s.text.stopped:
            return self._finish(s, "stop")
        if s.n_generated >= s.limit:  # num_predict, or LaunchSpec.predict_limit (see _limit)
            return self._finish(s, "length")
        if len(s.cache) >= self.n_ctx_per_slot:  # the next token has no cell left
            shift = self.spec.shift if req.shift is None else req.shift
            if not shift or o.num_predict == -2 or not self.can_shift:
                return self._finish(s, "length")
            self._shift(s, o.num_keep)
        s.next_token = token
        s.fast = req.stream and not req.logprobs and s.grammar_wait is None

    def _pick(self, s: _Slot) -> int:
        """Sample and accept the slot's next token. With a grammar, llama.cpp's common_sampler
        strategy: sample with the chain alone, keep the token if the grammar accepts it, else
        apply the grammar to the whole vocabulary and sample again (checking a whole 262k vocab
        against the grammar at every step is ~100 ms)."""
        if s.argmax:  # greedy keeps no state: nothing to accept
            return int(self._logits(s.batch_index).argmax())
        if s.chain is not None:
            return sampling.sample_one(self._logits(s.batch_index), s.chain)
        if s.grammar is None or s.grammar_wait is not None:
            return llama_cpp.llama_sampler_sample(s.sampler, self.ctx, s.batch_index)
        logits = self._logits(s.batch_index)
        c = self._candidates
        c.fill(logits)
        c.apply(s.sampler)
        token = c.selected()
        one = self._one
        one.data[0] = (token, 1.0, 0.0)
        one.arr.size, one.arr.selected, one.arr.sorted = 1, -1, False
        one.apply(s.grammar)
        if not np.isfinite(one.data[0]["logit"]):
            c.fill(logits)
            c.apply(s.grammar)
            c.apply(s.sampler)
            token = c.selected()
        llama_cpp.llama_sampler_accept(s.grammar, token)
        llama_cpp.llama_sampler_accept(s.sampler, token)
        return token

    def _logits(self, batch_index: int) -> np.ndarray:
        """The logits row of a batch position (a view, valid until the next llama_decode)."""
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.ctx, batch_index), shape=(self.n_vocab,)
        )

    def _logprob(self, s: _Slot, token: int, piece: bytes, top: int) -> TokenLogprob:
        """The log-softmax of this step's logits (the model's distribution before the sampler
        chain) at ``token``, with the ``top`` most likely tokens. Decode thread, before the next
        llama_decode. Costs two passes over the vocabulary (~1 ms for 262k entries)."""
        logits = self._logits(s.batch_index)
        x = logits.astype(np.float64)
        peak = x.max()
        norm = peak + math.log(float(np.exp(x - peak).sum()))
        alts: list[TopLogprob] = []
        if top > 0:
            k = min(top, self.n_vocab)
            ids = np.argpartition(-x, k - 1)[:k]
            for i in sorted(ids.tolist(), key=lambda t: (-x[t], t)):
                raw = self.piece(i)
                alts.append(
                    TopLogprob(
                        token=raw.decode("utf-8", errors="replace"),
                        logprob=float(x[i] - norm),
                        bytes=list(raw),
                    )
                )
        return TokenLogprob(
            token=piece.decode("utf-8", errors="replace"),
            logprob=float(x[token] - norm),
            bytes=list(piece),
            top_logprobs=alts,
        )

    def _shift(self, s: _Slot, num_keep: int) -> None:
        """Keep num_keep tokens, drop half of the rest, slide the remainder down."""
        n_past = len(s.cache)
        keep = max(0, min(num_keep, n_past - 2))
        discard = (n_past - keep) // 2
        llama_cpp.llama_memory_seq_rm(self.mem, s.id, keep, keep + discard)
        llama_cpp.llama_memory_seq_add(self.mem, s.id, keep + discard, n_past, -discard)
        del s.cache[keep : keep + discard]
        kvcache.PromptCache.shifted(s, keep)
        if s.media:  # a moved image no longer matches its prompt: never reuse its cells
            s.cache[keep:] = [images.POISONED if t < 0 else t for t in s.cache[keep:]]

    def _finish(self, s: _Slot, reason: DoneReason) -> None:
        job = s.job
        assert job is not None
        tail = s.text.finish()
        if tail and job.request.stream:
            self._post(job, CompletionChunk(content=tail, logprobs=take_logprobs(s.logprobs)))
        now = time.perf_counter_ns()
        first = s.t_first or now
        done = CompletionDone(
            logprobs=take_logprobs(s.logprobs),
            content="" if job.request.stream else "".join(s.text.text),
            done_reason=reason,
            prompt_eval_count=s.n_prompt,
            prompt_eval_cached_count=s.n_cached,
            prompt_eval_duration=max(1, first - (s.t_start or first)),
            eval_count=s.n_generated,
            eval_duration=max(1, now - first),
            tokens=[t for t in s.tokens if t >= 0] if s.media else s.tokens,
            truncated=s.truncated,
        )
        self._free(s)
        self._post(job, done)

    # -- embeddings (caller's thread) ---------------------------------------------------------

    def embed(self, inputs: list[str], truncate: bool) -> EmbedResponse:
        """Pooled, L2-normalised vectors. Blocking; serialised by a lock."""
        with self._embd_lock:
            if self.model is None:
                raise BadRequest("runner is closed")
            if self.embd_ctx is None:
                assert _LOG is not None
                try:
                    self._embedding_context()
                except LoadError as e:
                    raise BadRequest(e.reason) from None
            ctx = self.embd_ctx
            n_ctx = llama_cpp.llama_n_ctx(ctx)
            mem = llama_cpp.llama_get_memory(ctx)
            batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            out: list[list[float]] = []
            count = 0
            try:
                for text in inputs:
                    toks = self.tokenize(text, True, True)
                    if len(toks) > n_ctx:
                        if not truncate:
                            raise BadRequest("the input length exceeds the context length")
                        toks = toks[:n_ctx]
                    if not toks:
                        raise BadRequest("cannot embed an empty input")
                    count += len(toks)
                    llama_cpp.llama_memory_clear(mem, True)
                    for i, t in enumerate(toks):
                        batch.token[i] = t
                        batch.pos[i] = i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = True
                    batch.n_tokens = len(toks)
                    if llama_cpp.llama_model_has_encoder(
                        self.model
                    ) and not llama_cpp.llama_model_has_decoder(self.model):
                        rc = llama_cpp.llama_encode(ctx, batch)
                    else:
                        rc = llama_cpp.llama_decode(ctx, batch)
                    if rc != 0:
                        raise RuntimeError(f"embedding decode failed ({rc})")
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                    if not ptr:
                        raise RuntimeError("the model produced no pooled embedding")
                    vec = ptr[: self.n_embd]
                    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
                    out.append([v / norm for v in vec])
            finally:
                llama_cpp.llama_batch_free(batch)
            return EmbedResponse(embeddings=out, prompt_eval_count=count)
