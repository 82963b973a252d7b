"""Priorities under load: 8 batch clients saturate a model while an interactive client sends one
request per second; how long the interactive requests wait, with and without priorities.

One ``corral serve`` (FakeEngine runner, the tiny model, one slot: ``OLLAMA_NUM_PARALLEL=1``,
each request ~0.2 s). Eight batch clients send requests back to back, so about seven always
wait. An interactive client sends one streaming request per second and measures its wait: from
sending to its first streamed line. Phases alternate A-B-A-B in one run:

  with     -> batch requests carry ``X-Corral-Priority: low``, interactive ones ``high``;
  without  -> no header on either (one class: first come, first served, as in Ollama).

Prints the interactive p50/p99 wait per mode and the ratio, and how loaded the machine was.

    ./dev bench priority [--seconds 15] [--rounds 2]
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
from bench.common import pct  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

KNOBS = {"tokens_per_second": 40.0, "default_num_predict": 8}  # ~0.2 s per request
BATCH_CLIENTS = 8


async def first_line(s: aiohttp.ClientSession, url: str, model: str, headers: dict) -> float:
    """Seconds from sending a streaming request to its first line (then read to the end)."""
    t0 = time.perf_counter()
    async with s.post(
        f"{url}/api/generate", json={"model": model, "prompt": "hi"}, headers=headers
    ) as r:
        assert r.status == 200, await r.text()
        await r.content.readline()
        waited = time.perf_counter() - t0
        await r.read()
    return waited


async def batch_client(s: aiohttp.ClientSession, url: str, model: str, mode: dict) -> None:
    body = {"model": model, "prompt": "summarise", "stream": False}
    while True:
        headers = {"X-Corral-Priority": "low"} if mode["with"] else {}
        async with s.post(f"{url}/api/generate", json=body, headers=headers) as r:
            await r.read()
        mode["done"] += 1


async def phase(
    s: aiohttp.ClientSession, url: str, model: str, mode: dict, seconds: float
) -> list[float]:
    """One request per second from the interactive client for ``seconds``; their waits."""
    headers = {"X-Corral-Priority": "high"} if mode["with"] else {}
    tasks = []
    for _ in range(int(seconds)):
        tasks.append(asyncio.ensure_future(first_line(s, url, model, headers)))
        await asyncio.sleep(1.0)
    return list(await asyncio.gather(*tasks))


async def main(seconds: float, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        gguf = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
        daemon, url = common.spawn_daemon(
            tmp_path / "models",
            CORRAL_RUNNER_ENGINE="fake",
            CORRAL_FAKE_KNOBS=json.dumps(KNOBS),
            OLLAMA_NUM_PARALLEL="1",
            OLLAMA_KEEP_ALIVE="-1",
        )
        try:
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:
                model = await common.create_model(s, url, gguf, "tiny")
                await first_line(s, url, model, {})  # load the runner
                mode = {"with": False, "done": 0}
                waits: dict[bool, list[float]] = {True: [], False: []}
                rate: dict[bool, list[float]] = {True: [], False: []}
                load_before = common.load_note()
                for _ in range(rounds):
                    for with_priorities in (True, False):  # A-B-A-B
                        # fresh batch clients per phase: none of the other mode's requests stay
                        # queued (low ones left behind would starve under the normal ones)
                        mode["with"] = with_priorities
                        batch = [
                            asyncio.ensure_future(batch_client(s, url, model, mode))
                            for _ in range(BATCH_CLIENTS)
                        ]
                        await asyncio.sleep(2.0)  # the queue fills up
                        done, t0 = mode["done"], time.perf_counter()
                        waits[with_priorities] += await phase(s, url, model, mode, seconds)
                        rate[with_priorities].append(
                            (mode["done"] - done) / (time.perf_counter() - t0)
                        )
                        for t in batch:
                            t.cancel()
                        await asyncio.gather(*batch, return_exceptions=True)
        finally:
            daemon.terminate()
            daemon.wait(30)
    print(f"machine: before {load_before}; after {common.load_note()}")
    print(
        f"{BATCH_CLIENTS} batch clients back to back, one slot, ~0.2 s per request; "
        f"interactive: one request per second, {len(waits[True])} per mode"
    )
    for with_priorities, name in ((False, "without priorities"), (True, "with priorities")):
        w = waits[with_priorities]
        print(
            f"interactive wait {name:19s} p50 {pct(w, 50) * 1000:7.0f} ms   "
            f"p99 {pct(w, 99) * 1000:7.0f} ms   (batch "
            f"{sum(rate[with_priorities]) / len(rate[with_priorities]):.1f} requests/s)"
        )
    print(
        f"p50 ratio without/with {pct(waits[False], 50) / pct(waits[True], 50):.1f}x, "
        f"p99 ratio {pct(waits[False], 99) / pct(waits[True], 99):.1f}x"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    asyncio.run(main(a.seconds, a.rounds))
