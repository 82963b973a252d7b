"""GET /metrics and the scheduling-decision log lines, over the real app, the real Supervisor and
FakeEngine runner processes (simulated GPU, temp store with two tiny llamas).

Every check compares two scrapes parsed with ``prometheus_client.parser``: counters and
histogram counts must move by exactly what the requests between them did.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from corral.daemon import logging as corral_logging
from corral.daemon.api.app import make_app
from corral.daemon.config import Config, HostAddr, SimulatedGpu
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.models.store import Store
from corral.daemon.supervisor import Supervisor

GiB = 1 << 30
SAFETY = float(os.environ.get("TEST_SAFETY", "30"))
A, B = "tiny:latest", "other:latest"
GPU = SimulatedGpu(id="0", total=24 * GiB, free=24 * GiB, name="Sim 24G")


def config(**kw: Any) -> Config:
    knobs = kw.pop("fake_knobs", {})
    base: dict[str, Any] = dict(
        host=HostAddr(host="127.0.0.1", port=11434),
        runner_engine="fake",
        simulate_gpus=(GPU,),
        fake_knobs={"load_time": 0.0, "tokens_per_second": 2000.0, **knobs},
        keep_alive=300.0,
        load_timeout=20.0,
        max_loaded_models=1,
        max_queue=1,
    )
    base.update(kw)
    return Config(**base)


class Scrape:
    """One parsed /metrics answer: families by name, sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.values: dict[tuple[str, frozenset], float] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values


@dataclass
class Env:
    store: Store
    sup: Supervisor
    client: TestClient

    async def scrape(self) -> Scrape:
        async with self.client.get("/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return Scrape(await r.text())

    async def generate(self, model: str, **body: Any) -> tuple[int, list[dict]]:
        payload = {
            "model": model,
            "prompt": "hello there",
            "options": {"num_predict": 6, "temperature": 0},
            **body,
        }
        async with self.client.post("/api/generate", json=payload) as r:
            text = await r.text()
            return r.status, [json.loads(x) for x in text.splitlines() if x.strip()]

    async def until(self, pred: Callable[[], bool]) -> None:
        await asyncio.wait_for(self.sup.wait_until(pred), SAFETY)

    def runners(self, model: str, state: str | None = None) -> list[Any]:
        key = str(self.store.resolve(model).model_path)
        return [
            v
            for v in self.sup.snapshot().runners
            if v.model_key == key and (state is None or v.state == state)
        ]


@pytest.fixture
async def make_env(
    tmp_path: Path,
    tiny_gguf_factory: Callable[[int], Path],
) -> AsyncIterator[Callable[..., Any]]:
    made: list[Env] = []

    async def make(**kw: Any) -> Env:
        store = Store(tmp_path / f"models{len(made)}")
        for name, seed in ((A, 0), (B, 1)):
            layer = await store.write_blob_bytes(tiny_gguf_factory(seed).read_bytes())
            await store.create(name, files={"m.gguf": layer.digest})
        cfg = config(**kw)
        sup = Supervisor(
            cfg,
            store,
            probe=SimulatedProbe(cfg.simulate_gpus, host=(64 * GiB, 48 * GiB)),
            stop_grace=2.0,
            drain_timeout=1.0,
        )
        await sup.start()
        client = TestClient(TestServer(make_app(cfg, store, sup), host="127.0.0.1"))
        await client.start_server()
        env = Env(store, sup, client)
        made.append(env)
        return env

    yield make
    for env in made:
        await env.client.close()
        await asyncio.wait_for(env.sup.close(), SAFETY)


def diff(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


# ---- /metrics ----------------------------------------------------------------------------------


async def test_types_and_inference_extension_names(make_env):
    env = await make_env()
    s = await env.scrape()
    # The model-server protocol's names, each a single server-wide gauge.
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:cache_config_info",
    ):
        assert s.types[name] == "gauge", name
        assert sum(1 for (n, _) in s.values if n == name) == 1, name
    assert s.get("vllm:num_requests_waiting") == 0 and s.get("vllm:num_requests_running") == 0
    assert s.has(
        "vllm:lora_requests_info", max_lora="0", running_lora_adapters="", waiting_lora_adapters=""
    )
    # the picker's cache info: a block is a token (llama.cpp), no runner yet: no blocks
    assert (
        s.get(
            "vllm:cache_config_info",
            block_size="1",
            num_gpu_blocks="0",
            enable_prefix_caching="True",
        )
        == 1
    )
    for name in (
        "corral_http_requests",
        "corral_prompt_tokens",
        "corral_generated_tokens",
        "corral_model_loads",
        "corral_model_unloads",
        "corral_runner_crashes",
        "corral_requests_rejected",
        "corral_model_load_failures",
    ):
        assert s.types[name] == "counter", name
    for name in (
        "corral_time_to_first_token_seconds",
        "corral_inter_token_latency_seconds",
        "corral_request_duration_seconds",
        "corral_model_load_duration_seconds",
    ):
        assert s.types[name] == "histogram", name
    for name in (
        "corral_model_runners",
        "corral_model_in_flight",
        "corral_model_queued",
        "corral_model_parallel_slots",
        "corral_model_kv_cache_usage_ratio",
        "corral_queue_depth",
        "corral_models_loaded",
        "corral_gpu_memory_total_bytes",
        "corral_gpu_memory_free_bytes",
        "corral_gpu_memory_reserved_bytes",
    ):
        assert s.types[name] == "gauge", name
    assert s.get("corral_gpu_memory_total_bytes", gpu="0", gpu_name="Sim 24G") == 24 * GiB
    assert s.get("corral_gpu_memory_reserved_bytes", gpu="0", gpu_name="Sim 24G") == 0


async def test_counters_across_requests_and_a_load_evict_reload_cycle(make_env):
    env = await make_env()
    s0 = await env.scrape()

    status, lines = await env.generate(A)
    assert status == 200
    final = lines[-1]
    pieces = sum(1 for x in lines if x.get("response"))
    assert final["done"] and final["eval_count"] > 0 and pieces >= 2
    s1 = await env.scrape()
    assert diff(s1, s0, "corral_prompt_tokens_total", model=A) == final["prompt_eval_count"]
    assert diff(s1, s0, "corral_generated_tokens_total", model=A) == final["eval_count"]
    assert diff(s1, s0, "corral_time_to_first_token_seconds_count", model=A) == 1
    assert diff(s1, s0, "corral_inter_token_latency_seconds_count", model=A) == pieces - 1
    assert diff(s1, s0, "corral_request_duration_seconds_count", model=A) == 1
    assert (
        diff(s1, s0, "corral_request_duration_seconds_sum", model=A)
        <= final["total_duration"] / 1e9 + 0.5
    )
    assert (
        diff(
            s1, s0, "corral_http_requests_total", route="/api/generate", method="POST", status="200"
        )
        == 1
    )
    # The scrape before counted itself; this one is counted in the next.
    assert (
        diff(s1, s0, "corral_http_requests_total", route="/metrics", method="GET", status="200")
        == 1
    )
    assert diff(s1, s0, "corral_model_loads_total", model=A, reason="new") == 1
    assert diff(s1, s0, "corral_model_load_duration_seconds_count", model=A) == 1
    assert s1.get("corral_model_loaded", model=A) == 1
    assert s1.get("corral_model_runners", model=A, state="ready") == 1
    assert s1.get("corral_model_parallel_slots", model=A) == 1
    assert s1.get("corral_models_loaded") == 1
    assert s1.get("corral_model_in_flight", model=A) == 0
    # The fake runner reports what it holds; the GPU reservation is the placement's.
    assert (
        s1.get("corral_gpu_memory_reserved_bytes", gpu="0", gpu_name="Sim 24G")
        == env.runners(A)[0].placement.gpu_bytes[0]
        > 0
    )

    # B needs the only loaded-model place: A is evicted.
    status, _ = await env.generate(B)
    assert status == 200
    await env.until(lambda: not env.runners(A))
    s2 = await env.scrape()
    assert diff(s2, s1, "corral_model_unloads_total", model=A, reason="evicted") == 1
    assert diff(s2, s1, "corral_model_loads_total", model=B, reason="new") == 1
    assert not s2.has("corral_model_loaded", model=A)
    assert s2.get("corral_model_loaded", model=B) == 1
    assert diff(s2, s1, "corral_prompt_tokens_total", model=A) == 0

    # Other options for B: its runner is reloaded.
    status, _ = await env.generate(B, options={"num_predict": 2, "num_ctx": 1024})
    assert status == 200
    await env.until(lambda: len(env.runners(B)) == 1)
    s3 = await env.scrape()
    assert diff(s3, s2, "corral_model_unloads_total", model=B, reason="reload") == 1
    assert diff(s3, s2, "corral_model_loads_total", model=B, reason="reload") == 1
    assert diff(s3, s2, "corral_model_loads_total", model=B, reason="new") == 0

    # A client error and an unknown path are counted with their status and bounded routes.
    status, _ = await env.generate("missing:latest")
    assert status == 404
    async with env.client.get("/no/such/path") as r:
        assert r.status == 404
    s4 = await env.scrape()
    assert (
        diff(
            s4, s3, "corral_http_requests_total", route="/api/generate", method="POST", status="404"
        )
        == 1
    )
    assert (
        diff(s4, s3, "corral_http_requests_total", route="unmatched", method="GET", status="404")
        == 1
    )


async def test_in_flight_queued_kv_and_rejections(make_env):
    # Slow tokens so that a stream is in flight while we scrape; one slot, one queue place.
    env = await make_env(fake_knobs={"tokens_per_second": 40.0})
    s0 = await env.scrape()
    body = {"model": A, "prompt": "a prompt of a few words", "options": {"num_predict": 400}}
    async with env.client.post("/api/generate", json=body) as first:
        assert first.status == 200
        await first.content.readline()  # streaming: granted, decoding
        queued = asyncio.create_task(env.client.post("/api/generate", json=body))
        await env.until(lambda: env.sup.snapshot().queued == 1)
        async with env.client.post("/api/generate", json=body) as third:
            assert third.status == 503
        s1 = await env.scrape()
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
    assert s1.get("vllm:num_requests_running") == 1
    assert s1.get("vllm:num_requests_waiting") == 1
    assert s1.get("corral_model_in_flight", model=A) == 1
    assert s1.get("corral_model_queued", model=A) == 1
    assert s1.get("corral_queue_depth") == 1
    kv = s1.get("vllm:kv_cache_usage_perc")
    assert 0 < kv < 1 and s1.get("vllm:gpu_cache_usage_perc") == kv
    [runner] = env.sup.snapshot().runners
    cells = str(runner.context_length * runner.parallel)  # the KV cells of the one runner
    info = {"block_size": "1", "num_gpu_blocks": cells, "enable_prefix_caching": "True"}
    assert s1.get("vllm:cache_config_info", **info) == 1
    assert s1.get("corral_model_kv_cache_usage_ratio", model=A) == kv  # the only runner
    assert diff(s1, s0, "corral_requests_rejected_total", reason="queue_full") == 1
    assert (
        diff(
            s1, s0, "corral_http_requests_total", route="/api/generate", method="POST", status="503"
        )
        == 1
    )
    # The runner drops the disconnected stream at its next step; a request served to the end
    # after it (one slot) proves that step happened.
    status, _ = await env.generate(A, options={"num_predict": 2})
    assert status == 200
    s2 = await env.scrape()
    assert s2.get("vllm:num_requests_running") == 0 and s2.get("vllm:num_requests_waiting") == 0
    assert s2.get("vllm:kv_cache_usage_perc") == 0


async def test_runner_crash_is_counted(make_env):
    env = await make_env(fake_knobs={"crash_after_tokens": 3})
    s0 = await env.scrape()
    status, lines = await env.generate(A)
    assert status == 200 and "error" in lines[-1]
    await env.until(lambda: not env.runners(A))
    s1 = await env.scrape()
    assert diff(s1, s0, "corral_runner_crashes_total", model=A) == 1


# ---- decision log lines ------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Callable[[bool], io.StringIO]:
    def configure(json_mode: bool) -> io.StringIO:
        out = io.StringIO()
        corral_logging.configure(level=logging.INFO, json=json_mode, stream=out)
        return out

    yield configure
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def decisions(out: io.StringIO) -> list[dict]:
    recs = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    return [r for r in recs if "decision" in r]


async def test_decision_lines_load_evict_reload_expire_crash(make_env, log_lines):
    out = log_lines(True)
    env = await make_env()
    await env.generate(A)
    await env.generate(B)  # evicts A
    await env.until(lambda: not env.runners(A))
    await env.generate(B, options={"num_predict": 2, "num_ctx": 1024})  # reload
    await env.until(lambda: len(env.runners(B)) == 1)
    pid_b = env.runners(B)[0].pid
    await env.generate(B, options={"num_predict": 2, "num_ctx": 1024}, keep_alive=0)  # expire
    await env.until(lambda: not env.runners(B))
    recs = decisions(out)
    by = [(r["decision"], r.get("reason"), r.get("model")) for r in recs]
    assert by == [
        ("load", "new", A),
        ("evict", "evicted", A),
        ("load", "new", B),
        ("reload", "reload", B),
        ("load", "reload", B),
        ("expire", "expired", B),
    ], by
    load_a, evict, _, _, reload_b, expire = recs
    assert load_a["gpus"] == ["0"] and load_a["gpu_bytes"][0] > 0 and "n_gpu_layers" in load_a
    assert evict["waiting"] == [B] and isinstance(evict["pid"], int)
    assert reload_b["changed"]["num_ctx"][1] == 1024
    # num_ctx was the VRAM tier's (auto) and is now explicit: exactly these two differ.
    assert set(reload_b["changed"]) == {"num_ctx", "num_ctx_auto"}
    assert expire["pid"] == pid_b and expire["keep_alive"] == 0
    ready = [json.loads(x) for x in out.getvalue().splitlines() if '"runner ready"' in x]
    assert [r["model"] for r in ready] == [A, B, B] and all(r["pid"] for r in ready)
    assert all(0 <= r["model_load_s"] <= r["load_s"] for r in ready)  # the runner's own part


async def test_decision_lines_crash_with_stderr_tail_key_value(make_env, log_lines):
    out = log_lines(False)
    env = await make_env(fake_knobs={"crash_after_tokens": 3})
    await env.generate(A)
    await env.until(lambda: not env.runners(A))
    line = next(x for x in out.getvalue().splitlines() if "decision=crash" in x)
    assert f"model={A}" in line and "pid=" in line and "stderr=" in line
    assert "llama runner process has terminated" in line


async def test_decision_line_oom_retry(make_env, log_lines):
    out = log_lines(True)
    env = await make_env(max_loaded_models=2)
    await env.generate(A)
    # From now on every load fails out of memory: B's load fails, the scheduler evicts A and
    # retries B alone once, which fails again.
    env.sup.config = config(fake_knobs={"fail_load_oom": True})
    status, _ = await env.generate(B)
    assert status == 500
    recs = decisions(out)
    by = [(r["decision"], r.get("reason"), r.get("model")) for r in recs]
    assert by == [
        ("load", "new", A),
        ("load", "new", B),
        ("evict", "evicted", A),
        ("load", "oom_retry", B),
    ], by
    failed = [json.loads(x) for x in out.getvalue().splitlines() if "failed to load" in x]
    assert [f["oom"] for f in failed] == [True, True] and all(f["model"] == B for f in failed)
