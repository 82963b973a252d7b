"""Replicas: throughput of a hot model with ``replicas = 1`` and ``replicas = 2`` on two
simulated GPUs (FakeEngine runners, one slot each, ~0.2 s per request).

One ``corral serve`` with two simulated 24 GiB GPUs and two 8 GiB models made from the same
header-only GGUF shape: ``one`` (policy ``replicas = 1``) and ``two`` (``replicas = 2``).
``--clients`` clients send requests back to back to one of them for ``--seconds``; phases
alternate A-B-A-B in one run (a warm-up phase of each first, where ``two`` gets its replica).
Prints requests/s per setting, the ratio, and how loaded the machine was.

    ./dev bench replicas [--seconds 10] [--rounds 2] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from tests.fixtures.virtual_gguf import write_virtual_llama  # noqa: E402

GiB = 1 << 30
KNOBS = {"tokens_per_second": 50.0, "default_num_predict": 10, "load_time": 0.5}
GPUS = [
    {"id": str(i), "name": f"Sim {i}", "total": 24 * GiB, "free": 24 * GiB, "library": "cuda"}
    for i in range(2)
]
POLICY = '[models."one:latest"]\nreplicas = 1\n\n[models."two:latest"]\nreplicas = 2\n'


async def client(s: aiohttp.ClientSession, url: str, model: str, until: float) -> int:
    n = 0
    body = {"model": model, "prompt": "hi", "stream": False}
    while time.perf_counter() < until:
        async with s.post(f"{url}/api/generate", json=body) as r:
            await r.read()
            assert r.status == 200, r.status
        n += 1
    return n


async def hammer(s: aiohttp.ClientSession, url: str, model: str, clients: int, secs: float):
    t0 = time.perf_counter()
    done = await asyncio.gather(*(client(s, url, model, t0 + secs) for _ in range(clients)))
    return sum(done) / (time.perf_counter() - t0)


async def runners(s: aiohttp.ClientSession, url: str, model: str) -> list[dict]:
    async with s.get(f"{url}/api/ps") as r:
        rows = (await r.json())["models"]
    return next((row["runners"] for row in rows if row["name"] == model), [])


async def main(seconds: float, rounds: int, clients: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY)
        daemon, url = common.spawn_daemon(
            tmp_path / "models",
            CORRAL_RUNNER_ENGINE="fake",
            CORRAL_FAKE_KNOBS=json.dumps(KNOBS),
            CORRAL_SIMULATE_GPUS=json.dumps(GPUS),
            CORRAL_POLICY=str(policy),
            OLLAMA_NUM_PARALLEL="1",
            OLLAMA_CONTEXT_LENGTH="2048",
        )
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                models = {}
                for n in (1, 2):
                    gguf = write_virtual_llama(tmp_path / f"m{n}.gguf", weights_gib=8, name=f"m{n}")
                    models[n] = await common.create_model(s, url, gguf, ("one", "two")[n - 1])
                load_before = common.load_note()
                for n in (1, 2):  # warm-up: loads, and the replica of "two"
                    await hammer(s, url, models[n], clients, 4.0)
                rates: dict[int, list[float]] = {1: [], 2: []}
                for _ in range(rounds):
                    for n in (1, 2):  # A-B-A-B
                        rates[n].append(await hammer(s, url, models[n], clients, seconds))
                shape = {n: await runners(s, url, models[n]) for n in (1, 2)}
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(f"machine: before {load_before}; after {common.load_note()}")
    print(
        f"{clients} clients back to back, one slot per runner, ~0.2 s per request, "
        f"{rounds} x {seconds:.0f} s per setting"
    )
    for n in (1, 2):
        where = ", ".join(f"pid {r['pid']} on GPU {'+'.join(r['gpus'])}" for r in shape[n])
        print(
            f"replicas = {n}: {sum(rates[n]) / len(rates[n]):5.2f} requests/s "
            f"(phases: {', '.join(f'{x:.2f}' for x in rates[n])}); runners: {where}"
        )
    print(f"ratio replicas 2 / 1: {sum(rates[2]) / sum(rates[1]):.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    a = ap.parse_args()
    asyncio.run(main(a.seconds, a.rounds, a.clients))
