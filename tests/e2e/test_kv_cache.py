"""Saved prompt caches through a real ``corral serve`` and real llama runners (tiny models).

A runner that stops (eviction by another model, keep-alive expiry, daemon restart) saves its
slots' prompt caches; the next runner of the model restores the prompt's prefix: the same
greedy answer, one prompt token evaluated, and /metrics and `corral doctor` count it.
"""

from __future__ import annotations

import re

import pytest

from corral.daemon.cli import doctor
from corral.daemon.config import Config
from tests.e2e.conftest import create_tiny, start_daemon
from tests.e2e.test_scheduler_http import generate, wait_ps


def evaluated(done: dict) -> int:
    """The prompt tokens a request evaluated: the whole prompt less what a cache held."""
    return done["prompt_eval_count"] - done.get("prompt_eval_cached_count", 0)


pytestmark = pytest.mark.timeout(240)

PROMPT = " ".join(f"the {w} of the world" for w in ("cat", "sea", "hat", "dog", "sun") * 12)
GREEDY = {"temperature": 0, "num_predict": 8}


async def metric(session, url: str, name: str, model: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        text = await r.text()
    m = re.search(rf'^{name}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def ask(session, url: str, model: str, **extra) -> dict:
    r = await generate(session, url, model, prompt=PROMPT, raw=True, options=GREEDY, **extra)
    assert r["_status"] == 200, r
    return r


async def test_the_prompt_cache_survives_eviction_expiry_and_restart(tmp_path, session):
    env = {"OLLAMA_MAX_LOADED_MODELS": "1"}
    with start_daemon(tmp_path, **env) as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        b = await create_tiny(session, d.url, tmp_path, "b", 2)
        cold = await ask(session, d.url, a)
        assert evaluated(cold) > 100
        # eviction by another model: a's runner stops and saves
        assert (await ask(session, d.url, b))["_status"] == 200
        warm = await ask(session, d.url, a)
        assert warm["response"] == cold["response"] and evaluated(warm) == 1
        assert await metric(session, d.url, "corral_kv_cache_saves_total", a) >= 1
        assert await metric(session, d.url, "corral_kv_cache_restores_total", a) == 1
        restored = await metric(session, d.url, "corral_kv_cache_restored_tokens_total", a)
        assert restored == cold["prompt_eval_count"] - 1
        # keep-alive expiry
        await ask(session, d.url, a, keep_alive="1s")
        assert await wait_ps(session, d.url, lambda rows: not rows, timeout=30) == []
        after_expiry = await ask(session, d.url, a)
        assert after_expiry["response"] == cold["response"]
        assert evaluated(after_expiry) == 1
    # a daemon restart on the same store
    with start_daemon(tmp_path, **env) as d:
        after_restart = await ask(session, d.url, a)
        assert after_restart["response"] == cold["response"]
        assert evaluated(after_restart) == 1
    kv = doctor._kv_cache(Config(models=d.models))
    # a and b saved once each: later stops found the same prefix already saved
    assert (kv["files"], kv["saves"]) == (2, 2) and kv["bytes"] > 0
    # cold starts: a's and b's first (misses), a's after eviction, expiry, restart (restored)
    assert (kv["restores"], kv["misses"], kv["hit_rate"]) == (3, 2, 0.6)
    assert "hit rate 60% (3 restored of 5 cold starts" in doctor._render_kv_cache(kv)


async def test_no_saving_when_the_cache_is_off(tmp_path, session):
    with start_daemon(tmp_path, OLLAMA_MAX_LOADED_MODELS="1", CORRAL_KV_CACHE_SIZE="0") as d:
        a = await create_tiny(session, d.url, tmp_path, "a", 1)
        b = await create_tiny(session, d.url, tmp_path, "b", 2)
        cold = await ask(session, d.url, a)
        await ask(session, d.url, b)
        again = await ask(session, d.url, a)
        assert evaluated(again) == evaluated(cold)
    assert not (d.models / "kvcache").exists()
