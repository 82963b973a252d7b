"""What the daemon adds on top of a runner: time to first token and tiny-request throughput.

Baseline and subject are measured in the same run with the same FakeEngine knobs:
  direct  -> a runner process we spawn ourselves (`python -m corral.runner`, FakeEngine), its
             /completion endpoint called straight;
  daemon  -> `corral serve` (CORRAL_RUNNER_ENGINE=fake) with the tiny model, /api/generate.
Prints p50/p99 added TTFT in ms (target: p50 <= 2 ms) and requests/s for tiny non-streaming
requests (num_predict 1) through both, with the ratio.

    ./dev bench daemon_overhead [--n 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, pct  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

KNOBS = {"tokens_per_second": 100000.0, "default_num_predict": 8}


def spawn_runner(model: Path) -> tuple[subprocess.Popen, str]:
    spec = {
        "type": "launch",
        "model_path": str(model),
        "engine": "fake",
        "num_ctx": 2048,
        "parallel": 1,
        "fake": KNOBS,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.runner"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write((json.dumps(spec) + "\n").encode())
    proc.stdin.flush()
    for line in proc.stdout:
        ev = json.loads(line)
        if ev["type"] == "ready":
            return proc, f"http://127.0.0.1:{ev['port']}"
        if ev["type"] == "failed":
            raise SystemExit(f"runner failed: {ev['reason']}")
    raise SystemExit("runner exited before Ready")


def spawn_daemon(models: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(models),
        "CORRAL_DEFAULT_MODEL": "",
        "CORRAL_RUNNER_ENGINE": "fake",
        "CORRAL_FAKE_KNOBS": json.dumps(KNOBS),
        "OLLAMA_KEEP_ALIVE": "-1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.daemon.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr
    for line in proc.stderr:
        if "Listening" in line:
            break
    else:
        raise SystemExit("daemon did not start")
    # keep draining stderr so the daemon never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


async def ttft(s: aiohttp.ClientSession, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    async with s.post(url, json=body) as r:
        async for line in r.content:
            if line.strip():
                t = time.perf_counter() - t0
                break
        async for _ in r.content:
            pass
    return t


async def rps(s: aiohttp.ClientSession, url: str, body: dict, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        async with s.post(url, json=body) as r:
            await r.read()
            assert r.status == 200, await r.text()
    return n / (time.perf_counter() - t0)


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
        runner, runner_url = spawn_runner(model)
        daemon, daemon_url = spawn_daemon(tmp_path / "models")
        try:
            async with aiohttp.ClientSession() as s:
                digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
                async with s.post(f"{daemon_url}/api/blobs/{digest}", data=model.read_bytes()) as r:
                    assert r.status in (200, 201)
                async with s.post(
                    f"{daemon_url}/api/create",
                    json={"model": "tiny", "files": {"tiny.gguf": digest}, "stream": False},
                ) as r:
                    assert r.status == 200, await r.text()
                direct_body = {"prompt": "hi", "options": {"num_predict": 8}, "stream": True}
                daemon_body = {
                    "model": "tiny",
                    "prompt": "hi",
                    "options": {"num_predict": 8},
                    "stream": True,
                }
                # warm up both paths (the daemon loads its runner here)
                for _ in range(5):
                    await ttft(s, f"{runner_url}/completion", direct_body)
                    await ttft(s, f"{daemon_url}/api/generate", daemon_body)
                direct, via = [], []
                for _ in range(n):  # interleaved so drift hits both alike
                    direct.append(await ttft(s, f"{runner_url}/completion", direct_body))
                    via.append(await ttft(s, f"{daemon_url}/api/generate", daemon_body))
                added = [(b - a) * 1000 for a, b in zip(direct, via)]
                p50_added = (statistics.median(via) - statistics.median(direct)) * 1000
                print(
                    f"TTFT direct  p50 {statistics.median(direct) * 1000:.3f} ms  "
                    f"p99 {pct(direct, 99) * 1000:.3f} ms"
                )
                print(
                    f"TTFT daemon  p50 {statistics.median(via) * 1000:.3f} ms  "
                    f"p99 {pct(via, 99) * 1000:.3f} ms"
                )
                print(
                    f"added TTFT   p50 {p50_added:.3f} ms  (paired p50 "
                    f"{statistics.median(added):.3f} ms, p99 {pct(added, 99):.3f} ms)  "
                    f"target p50 <= 2 ms: {'OK' if p50_added <= 2 else 'MISSED'}"
                )
                small_direct = {"prompt": "hi", "options": {"num_predict": 1}, "stream": False}
                small_daemon = {
                    "model": "tiny",
                    "prompt": "hi",
                    "options": {"num_predict": 1},
                    "stream": False,
                }
                r_direct = await rps(s, f"{runner_url}/completion", small_direct, n)
                r_daemon = await rps(s, f"{daemon_url}/api/generate", small_daemon, n)
                print(
                    f"tiny non-streaming requests/s: direct {r_direct:.0f}, daemon "
                    f"{r_daemon:.0f}, ratio {r_daemon / r_direct:.2f}"
                )
        finally:
            for p in (runner, daemon):
                p.terminate()
                p.wait(30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    asyncio.run(main(ap.parse_args().n))
