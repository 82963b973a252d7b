"""The slots' prompt caches beyond what the live KV holds: cut points, checkpoints, and saved
prefixes that outlive the runner (docs/DESIGN.md "Saved prompt caches").

The engine calls four hooks: :meth:`PromptCache.reuse` when a job joins a slot (how much of the
prompt needs no evaluation, restoring a saved prefix when that gives more),
:meth:`PromptCache.prompt_done` when a prompt has been evaluated, :meth:`PromptCache.shifted`
after a context shift and :meth:`PromptCache.save_all` when the runner stops (not on a crash).

Cutting a sequence back: with a plain KV cache any prefix can stay. Sliding-window layers (Gemma
3: 512 positions) in llama-server's small cache (``swa_full`` off: window + ubatch cells per
slot) overwrite the cells no later token sees, so a cut is valid only when the cells the window
needs are still there: llama.cpp's state keeps positions ``pos_max - n_swa + 1
.. pos_max``, and after cutting to ``n`` the next token (at ``n``) needs ``n - n_swa + 1 ..``, so
``pos_min <= n + 1 - n_swa``, i.e. at most one cell may go. A recurrent state cannot be cut at
all. For those models each slot keeps a **checkpoint** at the end of its last prompt (the
partial state, ``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``: the window's cells or the recurrent
state, a few MB), as llama-server does: a later prompt sharing that prompt (the same system
prompt and question again, or the chat so far) cuts the full layers there and puts the
checkpoint back.

Saved prefixes: at the stop, each slot's tokens and whole sequence state (plus its checkpoint)
go to a :class:`~corral.runner.kvstore.Store` file; a new runner of the same key restores the
entry with the longest usable prefix of an incoming prompt into the slot before the rest is
evaluated, when that beats the slot's own cache by at least MIN_TOKENS.

Imports llama_cpp (with engine.py, images.py and devices.py): the state calls live here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp
import msgspec
import numpy as np
import structlog

from corral.runner import kvstore
from corral.runner.images import POISONED, Span, span_edges
from corral.runner.protocol import KvCacheReport, LaunchSpec

log = structlog.get_logger(__name__)

MIN_TOKENS = 32  # shorter prefixes are not saved, and a restore must gain at least this many
CHECKPOINT_MAX = 256 << 20  # a larger partial state is not copied at every prompt's end
_PARTIAL = llama_cpp.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY


@functools.cache
def build_id() -> str:
    """The llama.cpp build's identity: the package version and the contents of libllama (which
    writes and reads the state) and libggml-base (its types). Another build never reads our
    files, even one of the same version."""
    h = hashlib.sha256(llama_cpp.__version__.encode())
    lib = Path(llama_cpp.__file__).parent / "lib"
    for stem in ("libllama", "libggml-base"):
        found = sorted(p for p in lib.glob(stem + ".*") if p.is_file())
        h.update(stem.encode())
        if found:
            h.update(found[0].read_bytes())
    return h.hexdigest()[:32]


class Checkpoint:
    """The partial state of a slot after ``tokens`` (its KV holds more, or the same)."""

    __slots__ = ("tokens", "data")

    def __init__(self, tokens: list[int], data: bytearray) -> None:
        self.tokens = tokens
        self.data = data

    @property
    def boundary(self) -> int:
        return len(self.tokens)


def _ptr(buf: bytearray) -> Any:
    return (ctypes.c_uint8 * len(buf)).from_buffer(buf)


class PromptCache:
    """One engine's cut/checkpoint logic and its saved-prefix store (None without one)."""

    def __init__(
        self, engine: Any, spec: LaunchSpec, report: Callable[[KvCacheReport], None]
    ) -> None:
        self.ctx = engine.ctx
        self.mem = engine.mem
        model = engine.model
        self.n_swa = int(llama_cpp.llama_model_n_swa(model))
        self.recurrent = bool(
            llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        )
        self.partial = self.n_swa > 0 or self.recurrent  # cuts are limited: checkpoints help
        self.report = report
        self._counts: dict[str, int] = {}
        self.store: kvstore.Store | None = None
        kv = spec.kv_cache
        if kv is not None and kv.disk_bytes > 0:
            key = kvstore.cache_key(
                build=build_id(),
                model=kvstore.model_digest(spec.model_path),
                projector=kvstore.model_digest(spec.projector_path)
                if spec.projector_path
                else None,
                n_ctx=engine.n_ctx_per_slot,
                n_seq=engine.parallel,
                type_k=spec.kv_cache_type,
                type_v=spec.kv_cache_type,
                flash_attention=spec.flash_attention,
                swa_full=spec.swa_full,
            )
            self.store = kvstore.Store(kv.dir, key, kv.disk_bytes, kv.memory_bytes)
            self.store.read_ahead()  # this key's newest files into memory while we wait
            self._count(dropped=self.store.take_dropped())
            self._flush()

    # -- counters ------------------------------------------------------------------------------

    def _count(self, **deltas: int) -> None:
        for k, v in deltas.items():
            if v:
                self._counts[k] = self._counts.get(k, 0) + v

    def _flush(self) -> None:
        if self._counts:
            counts, self._counts = self._counts, {}
            self.report(msgspec.structs.replace(KvCacheReport(), **counts))

    # -- hooks ---------------------------------------------------------------------------------

    def reuse(self, slot: Any, prompt: list[int], n: int, media: dict[int, Span]) -> int:
        """Make ``slot`` hold the longest usable prefix of ``prompt`` (at most ``n`` of its own
        cached tokens, or a saved prefix when that is longer by MIN_TOKENS) and return its
        length. Decode thread, before the job starts."""
        m, ck = self._plan_slot(slot, n, media)
        store = self.store
        if store is not None and len(prompt) - 1 - m >= MIN_TOKENS:
            found = self._plan_store(prompt, media)
            if found is not None and found[1] >= m + MIN_TOKENS:
                got = self._restore(slot, *found)
                self._count(dropped=store.take_dropped())
                if got:
                    self._flush()
                    return got
                m, ck = 0, None  # the slot's sequence was cleared
            if m < MIN_TOKENS:
                self._count(misses=1)  # a cold start the store could not help
            self._count(dropped=store.take_dropped())
            self._flush()
        return self._cut(slot, m, ck)

    def prompt_done(self, slot: Any) -> None:
        """The slot's prompt has just been evaluated: keep its partial state as the slot's
        checkpoint (models whose KV cannot be cut back freely)."""
        if not self.partial:
            return
        ck = slot.checkpoint
        if ck is not None and ck.boundary == len(slot.cache) and self._valid(slot, ck):
            return  # the same prompt end as before
        seq = slot.id
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, seq, _PARTIAL)
        if not 0 < size <= CHECKPOINT_MAX:
            slot.checkpoint = None
            return
        data = ck.data if ck is not None and len(ck.data) == size else bytearray(size)
        if llama_cpp.llama_state_seq_get_data_ext(self.ctx, _ptr(data), size, seq, _PARTIAL):
            slot.checkpoint = Checkpoint(list(slot.cache), data)
        else:
            slot.checkpoint = None

    @staticmethod
    def shifted(slot: Any, keep: int) -> None:
        """A context shift moved the cells after ``keep``: only the first ``keep`` are what a
        fresh evaluation gives, and the checkpoint's positions are gone."""
        slot.checkpoint = None
        slot.exact = min(slot.exact, keep)

    def save_all(self, slots: list[Any], deadline: float | None) -> None:
        """Save every slot's cached prefix (most recently used first) until ``deadline``
        (time.monotonic()); the decode thread has stopped. Never raises for I/O."""
        store = self.store
        if store is None:
            return
        entries = store.scan()
        chosen: list[tuple[Any, np.ndarray]] = []
        for slot in sorted(slots, key=lambda s: -s.last_used):
            tokens = self._savable(slot)
            if tokens is None:
                continue
            if any(self._covers(other, tokens) for _, other in chosen):
                continue
            old = next((e for e in entries if self._covers_entry(e, tokens)), None)
            if old is not None:
                store.touch(old)  # already saved (restored and not extended, or a prefix)
                continue
            chosen.append((slot, tokens))
        saved = 0
        for slot, tokens in chosen:
            if deadline is not None and time.monotonic() > deadline:
                self._count(failed_saves=1)
                continue
            state = self._state(slot.id)
            ck = slot.checkpoint
            cks = (
                [(ck.boundary, ck.data)]
                if ck is not None and ck.boundary < len(tokens) and self._valid(slot, ck)
                else []
            )
            size = store.save(tokens, state, cks) if state is not None else 0
            if size:
                saved += 1
                self._count(saves=1, saved_bytes=size)
                if not self.partial:  # an older prefix of this one is redundant now
                    for e in list(store.entries):
                        if len(e.tokens) < len(tokens) and self._is_prefix(e.tokens, tokens):
                            store.remove(e, "superseded by a longer prefix")
                            store.dropped -= 1  # not a refusal
            else:
                self._count(failed_saves=1)
        store.fit_memory()
        self._count(dropped=store.take_dropped())
        self._flush()
        if chosen:
            log.info("prompt caches saved", saved=saved, slots=len(chosen), dir=str(store.dir))

    # -- planning ------------------------------------------------------------------------------

    def _valid(self, slot: Any, ck: Checkpoint) -> bool:
        b = ck.boundary
        return b <= len(slot.cache) and slot.cache[:b] == ck.tokens

    def _can_cut(self, seq: int, n: int, have: int) -> bool:
        """Whether the sequence (``have`` cells) may be cut back to ``n`` (see the module doc)."""
        if n >= have or n == 0:
            return True
        if self.recurrent:
            return False
        if self.n_swa <= 0:
            return True
        pos_min = llama_cpp.llama_memory_seq_pos_min(self.mem, seq)
        return pos_min <= max(0, n + 1 - self.n_swa)

    def _plan_slot(
        self, slot: Any, n: int, media: dict[int, Span]
    ) -> tuple[int, Checkpoint | None]:
        """The longest prefix (<= n) the slot's own KV can keep, and the checkpoint it needs."""
        if self._can_cut(slot.id, n, len(slot.cache)):
            return n, None
        ck = slot.checkpoint
        if ck is not None and self._valid(slot, ck):
            for m in self._cut_points(ck.boundary):
                if 0 < m <= n and span_edges(media, m)[0] == m:
                    return m, ck
        return 0, None

    def _cut_points(self, boundary: int) -> tuple[int, ...]:
        """Where a state covering ``boundary`` tokens may end up after a cut."""
        return (boundary,) if self.recurrent else (boundary, boundary - 1)

    def _plan_store(
        self, prompt: list[int], media: dict[int, Span]
    ) -> tuple[kvstore.Entry, int, kvstore.Section | None] | None:
        """The saved entry giving the longest usable prefix of ``prompt``: (entry, length, the
        checkpoint section to put back, if any)."""
        assert self.store is not None
        entries = self.store.scan()
        if not entries:
            return None
        p = np.asarray(prompt, dtype=np.int64)
        limit = len(prompt) - 1  # at least one token is evaluated for logits
        best: tuple[kvstore.Entry, int, kvstore.Section | None] | None = None
        for e in entries:
            c = min(kvstore.common_prefix(e.tokens, p), limit)
            if c < MIN_TOKENS or (best is not None and c <= best[1]):
                continue
            if not self.partial:
                m = span_edges(media, c)[0]
                if best is None or m > best[1]:
                    best = (e, m, None)
                continue
            for s in sorted(e.sections, key=lambda s: -s.boundary):
                m = next(
                    (
                        m
                        for m in self._cut_points(s.boundary)
                        if m <= c and span_edges(media, m)[0] == m
                    ),
                    0,
                )
                if m and (best is None or m > best[1]):
                    best = (e, m, s if s.kind == "checkpoint" else None)
                    break
        return best

    # -- state moves ---------------------------------------------------------------------------

    def _clear(self, slot: Any) -> int:
        llama_cpp.llama_memory_seq_rm(self.mem, slot.id, -1, -1)
        slot.cache = []
        slot.checkpoint = None
        slot.exact = float("inf")
        return 0

    def _cut(self, slot: Any, m: int, ck: Checkpoint | None) -> int:
        """Keep ``m`` cells of the slot's own sequence (through ``ck`` when given)."""
        seq = slot.id
        if m == 0:
            return self._clear(slot) if slot.cache else 0
        ok = True
        if ck is not None:
            ok = bool(
                llama_cpp.llama_memory_seq_rm(self.mem, seq, ck.boundary, -1)
                and llama_cpp.llama_state_seq_set_data_ext(
                    self.ctx, _ptr(ck.data), len(ck.data), seq, _PARTIAL
                )
            )
            have = ck.boundary
        else:
            have = len(slot.cache)
        if ok and m < have:
            ok = bool(llama_cpp.llama_memory_seq_rm(self.mem, seq, m, -1))
        if not ok:
            return self._clear(slot)
        slot.cache = slot.cache[:m]
        if m <= slot.exact:
            slot.exact = float("inf")  # what follows is evaluated afresh
        return m

    def _restore(
        self, slot: Any, entry: kvstore.Entry, m: int, section: kvstore.Section | None
    ) -> int:
        """Put ``entry`` (cut to ``m``, through its checkpoint ``section``) into the slot."""
        store = self.store
        assert store is not None
        data = store.read(entry, entry.state)
        ck_data = store.read(entry, section) if data is not None and section is not None else None
        if data is None or (section is not None and ck_data is None):
            return 0
        seq = slot.id
        self._clear(slot)
        if not llama_cpp.llama_state_seq_set_data(self.ctx, _ptr(data), len(data), seq):
            store.remove(entry, "llama.cpp refused the state")
            return self._clear(slot)
        have = len(entry.tokens)
        ok = True
        if section is not None and ck_data is not None:
            have = section.boundary
            ok = bool(
                llama_cpp.llama_memory_seq_rm(self.mem, seq, have, -1)
                and llama_cpp.llama_state_seq_set_data_ext(
                    self.ctx, _ptr(ck_data), len(ck_data), seq, _PARTIAL
                )
            )
        if ok and m < have:
            ok = self._can_cut(seq, m, have) and bool(
                llama_cpp.llama_memory_seq_rm(self.mem, seq, m, -1)
            )
        if not ok:
            return self._clear(slot)
        tokens = entry.tokens.tolist()
        slot.cache = tokens[:m]
        if section is not None and ck_data is not None:
            slot.checkpoint = Checkpoint(tokens[: section.boundary], ck_data)
        store.touch(entry)
        self._count(restores=1, restored_tokens=m, restored_bytes=len(data) + len(ck_data or b""))
        log.debug("prompt cache restored", slot=seq, tokens=m, file=entry.path.name)
        return m

    def _state(self, seq: int) -> bytearray | None:
        size = llama_cpp.llama_state_seq_get_size(self.ctx, seq)
        if size <= 0:
            return None
        buf = bytearray(size)
        got = llama_cpp.llama_state_seq_get_data(self.ctx, _ptr(buf), size, seq)
        return buf if got == size else None

    # -- what to save --------------------------------------------------------------------------

    def _savable(self, slot: Any) -> np.ndarray | None:
        """The tokens of the slot's exact prefix worth saving (its sequence cut to them)."""
        n = len(slot.cache)
        exact = min(n, slot.exact)
        if exact < n:  # a context shift: only the kept head is a fresh evaluation's
            if exact < MIN_TOKENS or not self._can_cut(slot.id, exact, n):
                return None
            llama_cpp.llama_memory_seq_rm(self.mem, slot.id, exact, -1)
            slot.cache = slot.cache[:exact]
            n = exact
        if n < MIN_TOKENS or POISONED in slot.cache:
            return None
        return np.asarray(slot.cache, dtype=np.int64)

    @staticmethod
    def _is_prefix(short: np.ndarray, long: np.ndarray) -> bool:
        return len(short) <= len(long) and kvstore.common_prefix(short, long) == len(short)

    def _covers(self, have: np.ndarray, tokens: np.ndarray) -> bool:
        """Whether a saved ``have`` already serves every prefix ``tokens`` would."""
        if len(have) == len(tokens):
            return self._is_prefix(tokens, have)
        return not self.partial and self._is_prefix(tokens, have)

    def _covers_entry(self, e: kvstore.Entry, tokens: np.ndarray) -> bool:
        if self._covers(e.tokens, tokens):
            return True
        n = len(tokens)  # a partial model: one of its boundaries is this prefix's end
        return any(s.boundary == n for s in e.sections) and self._is_prefix(tokens, e.tokens)
