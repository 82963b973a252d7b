"""Placement on several GPUs through HTTP: a real ``corral serve``, simulated GPUs, fake runners.

GPUs are simulated (``CORRAL_SIMULATE_GPUS``) and runners use the FakeEngine
(``CORRAL_RUNNER_ENGINE=fake``); models are header-only GGUFs that declare several GiB of
tensors (tests/fixtures/virtual_gguf.py), so the memory estimate sees big models while the
files stay a few KiB. The FakeEngine reports no GPU memory, so /api/ps shows the scheduler's
estimate: what these tests check is where the scheduler put each model and what the runner was
told, seen from outside:

* /api/ps: ``size``, ``size_vram`` and corral's ``gpus`` (id, name, vram per GPU);
* the LaunchSpec each runner received: the daemon logs it at debug level (``runner launch
  spec``, with the runner's pid) and the tests match it to the /api/ps row by pid.

Context is pinned (``OLLAMA_CONTEXT_LENGTH=2048``) so KV cache and compute graph stay a few
hundred MiB and the sizes below are the models' weights plus that.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Daemon, create_model, pid_alive, start_daemon
from tests.fixtures.virtual_gguf import write_virtual_llama

pytestmark = pytest.mark.timeout(120)

GiB = 1 << 30
SAFETY = 60.0  # s: a wait that only a broken daemon reaches (never a measure of speed)


def gpus_env(*gpus: tuple[str, float, float]) -> str:
    """CORRAL_SIMULATE_GPUS for (name, total GiB, free GiB) tuples; ids are "0", "1", ..."""
    return json.dumps(
        [
            {
                "id": str(i),
                "name": name,
                "total": int(total * GiB),
                "free": int(free * GiB),
                "library": "cuda",
                "integrated": False,
            }
            for i, (name, total, free) in enumerate(gpus)
        ]
    )


def env(
    gpus: str,
    *,
    hang_load_while: Path | None = None,
    hold_tokens_while: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    """The daemon's environment: simulated ``gpus``, FakeEngine runners. While the file
    ``hang_load_while`` exists loads do not end, while ``hold_tokens_while`` exists streams stop
    after their first token: a test holds a load or a stream open for as long as it needs,
    however slow the machine."""
    knobs: dict = {"tokens_per_second": 50, "default_num_predict": 4}
    if hang_load_while is not None:
        knobs["hang_load_while"] = str(hang_load_while)
    if hold_tokens_while is not None:
        knobs["hold_tokens_while"] = str(hold_tokens_while)
    return {
        "CORRAL_SIMULATE_GPUS": gpus,
        "CORRAL_RUNNER_ENGINE": "fake",
        "CORRAL_FAKE_KNOBS": json.dumps(knobs),
        "CORRAL_LOG_FORMAT": "json",
        "OLLAMA_CONTEXT_LENGTH": "2048",
        **extra,
    }


# ------------------------------------------------------------------------------------ helpers


async def create_virtual(
    s: aiohttp.ClientSession, d: Daemon, tmp_path, name: str, weights_gib: float
) -> str:
    path = write_virtual_llama(tmp_path / f"{name}.gguf", weights_gib=weights_gib, name=name)
    return await create_model(s, d.url, path, name)


async def ps(s: aiohttp.ClientSession, d: Daemon) -> dict[str, dict]:
    async with s.get(f"{d.url}/api/ps") as r:
        assert r.status == 200
        return {row["model"]: row for row in (await r.json())["models"]}


async def generate(s: aiohttp.ClientSession, d: Daemon, model: str, **body) -> dict:
    async with s.post(
        f"{d.url}/api/generate", json={"model": model, "prompt": "hi", "stream": False, **body}
    ) as r:
        data = await r.json()
        assert r.status == 200, data
        return data


def launch_spec(d: Daemon, pid: int) -> dict:
    """The LaunchSpec the runner with ``pid`` received (from the daemon's debug log)."""
    for line in d.log:
        if "runner launch spec" not in line:
            continue
        rec = json.loads(line)
        if rec.get("event") == "runner launch spec" and rec.get("pid") == pid:
            return rec["spec"]
    raise AssertionError(f"no launch spec logged for pid {pid}")


async def wait_for_log(pred, timeout: float = SAFETY) -> bool:
    """Wait until ``pred()`` (a check of the daemon's log) holds; False after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def started(d: Daemon, model: str) -> bool:
    """The daemon has started a runner for ``model`` (it may still be loading)."""
    for line in d.log:
        if "starting runner" in line:
            rec = json.loads(line)
            if rec.get("event") == "starting runner" and rec.get("model") == model:
                return True
    return False


def assert_whole_on(row: dict, gpu_id: str, gpu_name: str) -> None:
    """The model is entirely on one GPU."""
    assert row["size_vram"] == row["size"] > 0, row
    # every GPU here is simulated (CORRAL_SIMULATE_GPUS), and /api/ps says so (issue 20 point 5)
    assert row["gpus"] == [
        {"id": gpu_id, "name": gpu_name, "vram": row["size_vram"], "simulated": True}
    ], row


def assert_spec_matches(d: Daemon, row: dict, *, n_layers: int) -> dict:
    """The runner's LaunchSpec agrees with the placement /api/ps shows for it.

    ``main_gpu`` indexes the placement's GPU list (the runner's CUDA_VISIBLE_DEVICES is narrowed
    to those GPUs on real hardware), ``tensor_split`` gives layers per listed GPU.
    """
    spec = launch_spec(d, row["pid"])
    assert spec["engine"] == "fake"
    gpus = row["gpus"]
    if not gpus:
        assert spec["n_gpu_layers"] == 0
        assert spec["tensor_split"] is None
        return spec
    assert spec["main_gpu"] == 0
    if len(gpus) == 1:
        assert spec["tensor_split"] is None and spec["split_mode"] == "none"
    else:
        split = spec["tensor_split"]
        assert spec["split_mode"] == "layer"
        assert len(split) == len(gpus) and all(x >= 1 for x in split), spec
        assert sum(split) == spec["n_gpu_layers"]
    if row["size_vram"] == row["size"]:
        assert spec["n_gpu_layers"] == n_layers + 1  # every block and the output layer
    else:
        assert 0 < spec["n_gpu_layers"] < n_layers + 1
    return spec


# -------------------------------------------------------------------------------------- tests


async def test_model_goes_to_gpu_with_most_free_then_next_model_to_the_other(tmp_path, session):
    # GPU 0 is the bigger card but 4 GiB of it are used by someone else: GPU 1 has more free.
    gpus = gpus_env(("Sim A", 10, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus)) as d:
        a = await create_virtual(session, d, tmp_path, "a", 5.0)
        b = await create_virtual(session, d, tmp_path, "b", 5.0)
        await generate(session, d, a)
        row_a = (await ps(session, d))[a]
        assert_whole_on(row_a, "1", "Sim B")
        assert 5 * GiB < row_a["size"] < 6 * GiB
        assert_spec_matches(d, row_a, n_layers=32)

        # b does not fit in what is left on GPU 1 (8 - 5.2 GiB): it goes to GPU 0, and both
        # models stay loaded, one per GPU.
        await generate(session, d, b)
        rows = await ps(session, d)
        assert set(rows) == {a, b}
        assert rows[a]["pid"] == row_a["pid"]
        assert_whole_on(rows[a], "1", "Sim B")
        assert_whole_on(rows[b], "0", "Sim A")
        assert_spec_matches(d, rows[b], n_layers=32)


async def test_model_too_big_for_one_gpu_is_split_over_two(tmp_path, session):
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus)) as d:
        big = await create_virtual(session, d, tmp_path, "big", 10.0)
        await generate(session, d, big)
        row = (await ps(session, d))[big]
        assert row["size_vram"] == row["size"] > 10 * GiB
        by_id = {g["id"]: g for g in row["gpus"]}
        assert set(by_id) == {"0", "1"}
        assert sum(g["vram"] for g in row["gpus"]) == row["size_vram"]
        assert by_id["0"]["vram"] <= 6 * GiB and by_id["1"]["vram"] <= 8 * GiB
        spec = assert_spec_matches(d, row, n_layers=32)
        # Layers per GPU follow the bytes per GPU (equal blocks; each GPU also holds a graph).
        split = spec["tensor_split"]
        for g, layers in zip(row["gpus"], split, strict=False):
            share_layers = layers / sum(split)
            share_bytes = g["vram"] / row["size_vram"]
            assert abs(share_layers - share_bytes) < 0.05, (row["gpus"], split)


async def test_sched_spread_puts_even_a_small_model_on_every_gpu(tmp_path, session):
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus, OLLAMA_SCHED_SPREAD="1")) as d:
        small = await create_virtual(session, d, tmp_path, "small", 1.0)
        await generate(session, d, small)
        row = (await ps(session, d))[small]
        assert row["size_vram"] == row["size"]
        assert {g["id"] for g in row["gpus"]} == {"0", "1"}
        assert all(g["vram"] > 0 for g in row["gpus"])
        assert_spec_matches(d, row, n_layers=32)
        # Spread: the model's bytes in proportion to each GPU's free memory (6 : 8 GiB); the
        # layer counts differ more (the output layer alone is a quarter of this model).
        vram = {g["id"]: g["vram"] for g in row["gpus"]}
        assert abs(vram["0"] / row["size_vram"] - 6 / 14) < 0.05, vram


async def test_new_model_evicts_the_idle_model_not_the_busy_one(tmp_path, session):
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus)) as d:
        busy = await create_virtual(session, d, tmp_path, "busy", 5.0)
        idle = await create_virtual(session, d, tmp_path, "idle", 5.0)
        new = await create_virtual(session, d, tmp_path, "new", 5.0)
        # busy is loaded first (the least recently used one), idle second; one per GPU.
        await generate(session, d, busy)
        await generate(session, d, idle)
        before = await ps(session, d)
        assert_whole_on(before[busy], "1", "Sim B")
        assert_whole_on(before[idle], "0", "Sim A")

        # A long stream keeps busy busy: 200 tokens at 50 tokens/s.
        async with session.post(
            f"{d.url}/api/generate",
            json={"model": busy, "prompt": "hi", "options": {"num_predict": 200}},
        ) as stream:
            first = json.loads(await stream.content.readline())
            assert first["done"] is False
            # new fits on neither GPU next to them: the idle model must go, not the busy one.
            await generate(session, d, new)
            rows = await ps(session, d)
            assert set(rows) == {busy, new}
            assert rows[busy]["pid"] == before[busy]["pid"]
            assert rows[busy]["in_flight"] == 1
            assert_whole_on(rows[new], "0", "Sim A")  # where idle was
            assert not pid_alive(before[idle]["pid"])
            # The busy model streamed on throughout and finishes normally.
            lines = [json.loads(raw) async for raw in stream.content if raw.strip()]
        assert lines and lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
        assert not any("error" in x for x in lines)
        assert 1 + sum(1 for x in lines if not x["done"]) == 200


async def test_model_larger_than_all_vram_is_partially_offloaded(tmp_path, session):
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus)) as d:
        huge = await create_virtual(session, d, tmp_path, "huge", 16.0)
        await generate(session, d, huge)
        row = (await ps(session, d))[huge]
        assert 0 < row["size_vram"] < row["size"]
        assert row["size"] > 16 * GiB
        assert row["size_vram"] <= 14 * GiB
        assert {g["id"] for g in row["gpus"]} == {"0", "1"}
        spec = assert_spec_matches(d, row, n_layers=32)
        assert spec["n_gpu_layers"] < 33


async def test_num_gpu_zero_runs_on_cpu(tmp_path, session):
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus)) as d:
        m = await create_virtual(session, d, tmp_path, "m", 1.0)
        await generate(session, d, m, options={"num_gpu": 0})
        row = (await ps(session, d))[m]
        assert row["size_vram"] == 0 and row["gpus"] == [] and row["size"] > 0
        spec = assert_spec_matches(d, row, n_layers=32)
        assert spec["n_gpu_layers"] == 0
        assert spec["use_mmap"] is False  # Ollama's default for CPU runners


async def test_loaded_model_is_served_while_another_loads(tmp_path, session):
    """No head-of-line blocking (Ollama #5724): a load never holds up a loaded model. b's load
    is held open until the requests for a have been answered: with head-of-line blocking they
    would wait for it forever (SAFETY turns that into a failure)."""
    hold = tmp_path / "hold-loads"
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus, hang_load_while=hold)) as d:
        a = await create_virtual(session, d, tmp_path, "a", 5.0)
        b = await create_virtual(session, d, tmp_path, "b", 5.0)
        await generate(session, d, a)  # loaded
        hold.touch()
        loading_b = asyncio.create_task(generate(session, d, b))
        assert await wait_for_log(lambda: started(d, b)), "b's runner never started"
        # b is loading now (and stays so); requests for a are answered, several in a row.
        for _ in range(3):
            r = await asyncio.wait_for(generate(session, d, a, options={"num_predict": 2}), SAFETY)
            assert r["done"] is True
        assert not loading_b.done()
        assert b not in await ps(session, d)  # loads are not listed yet
        hold.unlink()
        assert (await loading_b)["done"] is True
        rows = await ps(session, d)
        assert_whole_on(rows[a], "1", "Sim B")
        assert_whole_on(rows[b], "0", "Sim A")


async def test_gpu_used_by_others_is_not_overcommitted(tmp_path, session):
    """Only 6 of the GPU's 10 GiB are free (another process holds 4): once a 5 GiB model is
    loaded there, a 3 GiB model does not fit next to it; the idle one is evicted first."""
    gpus = gpus_env(("Sim A", 10, 6))
    with start_daemon(tmp_path, **env(gpus)) as d:
        x = await create_virtual(session, d, tmp_path, "x", 5.0)
        y = await create_virtual(session, d, tmp_path, "y", 3.0)
        await generate(session, d, x)
        row_x = (await ps(session, d))[x]
        assert_whole_on(row_x, "0", "Sim A")
        await generate(session, d, y)
        rows = await ps(session, d)
        assert sum(g["vram"] for r in rows.values() for g in r["gpus"]) <= 6 * GiB, rows
        assert set(rows) == {y}
        assert_whole_on(rows[y], "0", "Sim A")
        assert not pid_alive(row_x["pid"])


async def test_busy_model_is_only_evicted_once_its_stream_ends(tmp_path, session):
    """The only victim is busy: it turns ``expiring`` (no new grants), streams to the end, and
    only then stops; the new model waits for it and then takes the GPU. The stream is held after
    its first token until the test has seen all that, however slow the machine."""
    hold = tmp_path / "hold-tokens"
    gpus = gpus_env(("Sim A", 8, 8))
    with start_daemon(tmp_path, **env(gpus, hold_tokens_while=hold)) as d:
        p = await create_virtual(session, d, tmp_path, "p", 5.0)
        q = await create_virtual(session, d, tmp_path, "q", 5.0)
        await generate(session, d, p)
        pid_p = (await ps(session, d))[p]["pid"]
        hold.touch()
        async with session.post(
            f"{d.url}/api/generate",
            json={"model": p, "prompt": "hi", "options": {"num_predict": 100}},
        ) as stream:
            assert json.loads(await stream.content.readline())["done"] is False
            waiting_q = asyncio.create_task(generate(session, d, q))
            loop = asyncio.get_running_loop()
            end = loop.time() + SAFETY
            while (await ps(session, d))[p]["state"] != "expiring":
                assert loop.time() < end
                await asyncio.sleep(0.02)
            assert not waiting_q.done()
            hold.unlink()
            lines = [json.loads(raw) async for raw in stream.content if raw.strip()]
        assert lines[-1]["done"] is True and not any("error" in x for x in lines)
        assert lines[-1]["eval_count"] == 100
        assert (await waiting_q)["done"] is True
        rows = await ps(session, d)
        assert set(rows) == {q}
        assert_whole_on(rows[q], "0", "Sim A")
        assert not pid_alive(pid_p)


async def test_main_gpu_pins_the_model_to_that_gpu(tmp_path, session):
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus)) as d:
        m = await create_virtual(session, d, tmp_path, "m", 1.0)
        await generate(session, d, m, options={"main_gpu": 0})  # not the one with most free
        row = (await ps(session, d))[m]
        assert_whole_on(row, "0", "Sim A")
        spec = assert_spec_matches(d, row, n_layers=32)
        assert spec["main_gpu"] == 0 and spec["split_mode"] == "none"


async def test_two_models_load_at_the_same_time_on_two_gpus(tmp_path, session):
    """Loads of different models overlap (Ollama loads one model at a time): both loads are held
    open, and both runners start while neither has finished."""
    hold = tmp_path / "hold-loads"
    hold.touch()
    gpus = gpus_env(("Sim A", 6, 6), ("Sim B", 8, 8))
    with start_daemon(tmp_path, **env(gpus, hang_load_while=hold)) as d:
        a = await create_virtual(session, d, tmp_path, "a", 5.0)
        b = await create_virtual(session, d, tmp_path, "b", 5.0)
        both = asyncio.gather(generate(session, d, a), generate(session, d, b))
        assert await wait_for_log(lambda: started(d, a) and started(d, b))
        assert not both.done() and not [line for line in d.log if "runner ready" in line]
        hold.unlink()
        ra, rb = await both
        assert ra["done"] and rb["done"]
        rows = await ps(session, d)
        assert {g["id"] for r in rows.values() for g in r["gpus"]} == {"0", "1"}
        for r in rows.values():
            assert r["size_vram"] == r["size"] and len(r["gpus"]) == 1
