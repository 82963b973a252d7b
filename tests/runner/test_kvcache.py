"""Saved prompt caches (runner/kvcache.py, runner/kvstore.py) on the tiny llama model.

Each test runs engines one after another on one cache directory, as runners that stop and start
again: the first saves its slots at close, the next restores the longest saved prefix of a
prompt. What is checked is what a client sees: the same greedy text as a fresh prefill, with
only the new tokens evaluated (``prompt_eval_count`` less ``prompt_eval_cached_count``).
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import numpy as np
import pytest

from corral.runner import kvstore
from corral.runner.protocol import KvCacheReport, KvCacheSpec, LaunchSpec
from tests.fixtures.tiny_vision import image_bytes
from tests.runner.conftest import complete, serve

pytest.importorskip("llama_cpp")
from corral.runner import kvcache
from corral.runner.engine import Engine


def evaluated(done: dict) -> int:
    """The prompt tokens a request evaluated: the whole prompt less what a cache held."""
    return done["prompt_eval_count"] - done.get("prompt_eval_cached_count", 0)


GREEDY = {"temperature": 0, "num_predict": 12}
PROMPT = " ".join(f"the {w} of the world" for w in ("cat", "sea", "hat", "dog", "sun") * 12)
GiB = 1 << 30


class Runner:
    """One engine with a report list, started and closed like a runner process."""

    def __init__(self, model: Path, cache: Path | None, **spec) -> None:
        kv = KvCacheSpec(dir=str(cache), disk_bytes=GiB, memory_bytes=GiB) if cache else None
        fields = {"num_ctx": 512, "parallel": 2, "num_thread": 1, "num_batch": 128, **spec}
        if "kv_cache" not in spec:
            fields["kv_cache"] = kv
        self.engine = Engine(LaunchSpec(model_path=str(model), **fields))
        self.reports: list[KvCacheReport] = []
        self.engine.report = self.reports.append
        self.engine.load(lambda p: None)
        self.engine.start()

    def total(self, name: str) -> int:
        return sum(getattr(r, name) for r in self.reports)

    async def run(self, **body) -> tuple[str, dict]:
        async with serve(self.engine) as (client, _):
            chunks, done = await complete(client, **body)
        return "".join(chunks), done

    def close(self, save_by: float | None = None) -> None:
        self.engine.close(save_by)


def files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/*.kv"))


async def fresh(model: Path, **body) -> tuple[str, dict]:
    r = Runner(model, None)
    try:
        return await r.run(**body)
    finally:
        r.close()


async def test_a_restored_prefix_gives_the_same_greedy_output(tiny_gguf, tmp_path):
    first = Runner(tiny_gguf, tmp_path)
    text1, done1 = await first.run(prompt=PROMPT, options=GREEDY)
    n_prompt = done1["prompt_eval_count"]
    assert n_prompt > 100
    first.close()
    assert first.total("saves") == 1 and first.total("saved_bytes") > 0
    assert len(files(tmp_path)) == 1

    second = Runner(tiny_gguf, tmp_path)
    try:
        # the same prompt: only its last token is evaluated again (for the logits)
        text2, done2 = await second.run(prompt=PROMPT, options=GREEDY)
        assert evaluated(done2) == 1
        assert text2 == text1
        assert second.total("restores") == 1
        assert second.total("restored_tokens") == n_prompt - 1
        # a continuation (the answer and a new turn) evaluates only what is new, in a slot
        # that has not been restored yet (the other one holds the first restore)
        more = PROMPT + text1 + " and then the cat of the sea"
        text3, done3 = await second.run(prompt=more, options=GREEDY)
    finally:
        second.close()
    want3, fresh3 = await fresh(tiny_gguf, prompt=more, options=GREEDY)
    assert text3 == want3
    assert evaluated(done3) < evaluated(fresh3) - 100


async def test_a_file_of_another_key_is_never_used(tiny_gguf, tiny_gguf_factory, tmp_path):
    first = Runner(tiny_gguf, tmp_path)
    await first.run(prompt=PROMPT, options=GREEDY)
    first.close()
    (saved,) = files(tmp_path)
    other_model = tiny_gguf_factory(7)
    for other in (
        Runner(other_model, tmp_path),  # another model
        Runner(tiny_gguf, tmp_path, num_ctx=256),  # another slot size
        Runner(tiny_gguf, tmp_path, kv_cache_type="f32"),  # another KV type
        Runner(tiny_gguf, tmp_path, swa_full=True),  # the full-size sliding-window cache
    ):
        try:
            # the file moved into this runner's own key directory: its header's key decides
            own = other.engine._prefix.store.dir
            own.mkdir(parents=True, exist_ok=True)
            planted = own / saved.name
            planted.write_bytes(saved.read_bytes())
            other.engine._prefix.store._seen = None
            _, done = await other.run(prompt=PROMPT, options=GREEDY)
            assert evaluated(done) > 100  # evaluated in full
            assert other.total("restores") == 0 and other.total("dropped") == 1
            assert not planted.exists()
        finally:
            other.close(save_by=0)  # nothing saved: the deadline has passed
    assert saved.exists()  # the right key's file stays


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
async def test_a_corrupt_or_truncated_file_is_refused_and_removed(tiny_gguf, tmp_path, damage):
    first = Runner(tiny_gguf, tmp_path)
    text1, _ = await first.run(prompt=PROMPT, options=GREEDY)
    first.close()
    (saved,) = files(tmp_path)
    data = bytearray(saved.read_bytes())
    if damage == "flip":
        data[-1000] ^= 0x40  # inside the KV state: only its checksum can tell
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[20] ^= 0x01  # inside the header JSON
    saved.write_bytes(bytes(data))
    second = Runner(tiny_gguf, tmp_path)
    try:
        text2, done2 = await second.run(prompt=PROMPT, options=GREEDY)
    finally:
        second.close(save_by=0)
    assert text2 == text1
    assert evaluated(done2) > 100
    assert second.total("restores") == 0 and second.total("dropped") == 1
    assert not saved.exists()


async def test_the_disk_cap_keeps_the_most_recent_files(tiny_gguf, tmp_path):
    sizes = []
    for i in range(3):
        r = Runner(tiny_gguf, tmp_path)
        await r.run(prompt=f"{i} {PROMPT}", options=GREEDY)
        r.close()
        sizes.append(max(p.stat().st_size for p in files(tmp_path)))
        time.sleep(0.01)  # distinct mtimes
    assert len(files(tmp_path)) == 3
    one = max(sizes)  # the same within a few bytes of header
    newest = max(files(tmp_path), key=lambda p: p.stat().st_mtime)
    # a runner with room for two files: saving a fourth removes the two oldest
    cap = KvCacheSpec(dir=str(tmp_path), disk_bytes=2 * one + one // 2, memory_bytes=GiB)
    r = Runner(tiny_gguf, None, kv_cache=cap)
    await r.run(prompt=f"3 {PROMPT}", options=GREEDY)
    r.close()
    left = files(tmp_path)
    assert len(left) == 2 and newest in left
    assert sum(p.stat().st_size for p in left) <= cap.disk_bytes
    # a prefix larger than the whole cap is not saved at all
    tiny = KvCacheSpec(dir=str(tmp_path), disk_bytes=one // 2, memory_bytes=GiB)
    r = Runner(tiny_gguf, None, kv_cache=tiny)
    await r.run(prompt=f"4 {PROMPT}", options=GREEDY)
    r.close()
    assert r.total("saves") == 0 and r.total("failed_saves") == 1
    assert files(tmp_path) == left


def test_the_memory_budget_drops_the_least_recently_used_files(tmp_path, monkeypatch):
    dropped: list[str] = []
    monkeypatch.setattr(kvstore, "_drop_from_memory", lambda p: dropped.append(p.name))
    store = kvstore.Store(tmp_path, kvstore.cache_key(model="m"), 10**9, 2500)
    for i in range(4):
        assert store.save(np.arange(i, i + 40, dtype=np.int64), bytes(1000), [])
        os.utime(files(tmp_path)[-1], (1000 + i, 1000 + i))
    by_age = sorted(files(tmp_path), key=lambda p: p.stat().st_mtime)
    store.fit_memory()
    # ~1.4 kB each with header and tokens: the newest one fits in 2500 bytes, the rest go
    assert sorted(dropped) == sorted(p.name for p in by_age[:3])


async def test_a_full_disk_fails_no_request(tiny_gguf, tmp_path, monkeypatch):
    real = kvstore.Store.save

    def enospc(self, *a, **k):
        os.makedirs(self.dir, exist_ok=True)
        monkeypatch.setattr(kvstore.os, "replace", _raise_enospc)
        try:
            return real(self, *a, **k)
        finally:
            monkeypatch.undo()

    monkeypatch.setattr(kvstore.Store, "save", enospc)
    r = Runner(tiny_gguf, tmp_path)
    text, _ = await r.run(prompt=PROMPT, options=GREEDY)
    r.close()
    assert text and r.total("failed_saves") == 1 and r.total("saves") == 0
    assert not list(tmp_path.glob("*/*"))  # no temporary file left behind


def _raise_enospc(*a, **k):
    raise OSError(28, "No space left on device")


async def test_images_in_a_saved_prefix_are_restored_or_cut_before(
    tiny_gguf, tiny_projector, tmp_path
):
    png_a, png_b = image_bytes("PNG", seed=1), image_bytes("PNG", seed=2)
    prompt = PROMPT + " look at this picture [img-0] and tell me about it"

    def body(png: bytes) -> dict:
        return {"prompt": prompt, "images": [base64.b64encode(png).decode()], "options": GREEDY}

    def runner() -> Runner:
        return Runner(tiny_gguf, tmp_path, projector_path=str(tiny_projector))

    first = runner()
    text_a, _ = await first.run(**body(png_a))
    first.close()
    # the same image: restored with its text, only the last token is evaluated again
    second = runner()
    try:
        text, done = await second.run(**body(png_a))
    finally:
        second.close(save_by=0)
    assert (text, evaluated(done)) == (text_a, 1)
    # another image at the same place: the restored prefix ends where the image starts
    third = runner()
    try:
        text_b, done_b = await third.run(**body(png_b))
    finally:
        third.close(save_by=0)
    want_b, fresh_b = await fresh_vision(tiny_gguf, tiny_projector, **body(png_b))
    assert text_b == want_b
    restored = third.total("restored_tokens")
    assert third.total("restores") == 1 and restored > 100
    assert evaluated(done_b) == evaluated(fresh_b) - restored
    assert evaluated(done_b) > 16  # the image's cells are evaluated


async def fresh_vision(model: Path, projector: Path, **body) -> tuple[str, dict]:
    r = Runner(model, None, projector_path=str(projector))
    try:
        return await r.run(**body)
    finally:
        r.close()


def test_the_build_identity_is_stable():
    assert kvcache.build_id() == kvcache.build_id() and len(kvcache.build_id()) == 32


GEMMA_PROMPT = " ".join(  # ~1,000 tokens: beyond the 512-cell window and the 768-cell cache
    f"Item {i}: the {w} is on the table." for i, w in enumerate(["cat", "hat", "cup", "pen"] * 20)
)


@pytest.mark.gemma
@pytest.mark.slow
async def test_sliding_window_model_restores_through_checkpoints(gemma_gguf, tmp_path):
    """Gemma 3's sliding-window layers (512 positions) get llama-server's small cache: window +
    ubatch = 640 cells, padded to 768, per slot, so a ~1,000-token prompt overwrites its first
    cells and the sequence can no longer be cut back anywhere. The repeated prompt goes through
    the prompt-end checkpoint, in the same runner and in the next one (restored from the
    file); a continuation (the answer and a new line) evaluates only what is new, in the same
    runner and after the restore, with the same greedy text as a fresh prefill."""
    import llama_cpp

    spec = {"num_ctx": 2048, "parallel": 1, "num_thread": 2, "num_batch": 128}

    def more_of(text: str) -> str:
        return GEMMA_PROMPT + text + " Item 99: the dog"

    first = Runner(gemma_gguf, tmp_path, **spec)
    try:
        text1, done1 = await first.run(prompt=GEMMA_PROMPT, options=GREEDY)
        assert done1["prompt_eval_count"] > 900
        # the small cache really wrapped: the first positions are gone
        assert llama_cpp.llama_memory_seq_pos_min(first.engine.mem, 0) > 0
        again, done_again = await first.run(prompt=GEMMA_PROMPT, options=GREEDY)
        assert (again, evaluated(done_again)) == (text1, 1)
        text_more, done_more = await first.run(prompt=more_of(text1), options=GREEDY)
        assert evaluated(done_more) < 40
        again, done_again = await first.run(prompt=GEMMA_PROMPT, options=GREEDY)
        assert (again, evaluated(done_again)) == (text1, 1)  # the checkpoint is still there
    finally:
        first.close()
    second = Runner(gemma_gguf, tmp_path, **spec)
    try:
        text2, done2 = await second.run(prompt=GEMMA_PROMPT, options=GREEDY)
        assert (text2, evaluated(done2)) == (text1, 1)
        text3, done3 = await second.run(prompt=more_of(text1), options=GREEDY)
    finally:
        second.close(save_by=0)
    assert second.total("restores") == 1
    fresh_runner = Runner(gemma_gguf, None, **spec)
    try:
        want3, fresh3 = await fresh_runner.run(prompt=more_of(text1), options=GREEDY)
    finally:
        fresh_runner.close()
    assert text3 == text_more == want3
    assert evaluated(done3) < 40 < evaluated(fresh3)
