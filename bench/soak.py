"""Soak: mixed traffic against a real ``corral serve`` for a given time (not part of the tests).

Clients loop over a random mix of /api/generate and /api/chat (streaming and not), /api/embed,
and streams the client abandons after the first tokens (cancellations), spread over more models
than ``OLLAMA_MAX_LOADED_MODELS`` allows at once (model churn). Every interval it prints the
requests and errors so far, the interval's p50/p99 latency, the daemon's RSS and open file
descriptors, the live runner processes and the loads so far; at the end a summary with the
first/last RSS and fd figures (a leak shows as a trend). Exit status 1 if any request failed.

An error is anything but: a 200 whose stream ends with exactly one ``done`` line and no error
line (or a 200 JSON answer), or a deliberately abandoned stream.

    ./dev bench soak [--seconds 600] [--clients 12] [--models 3] [--max-loaded 2]
                     [--engine fake|llama] [--interval 30]

``--engine fake`` (default) runs FakeEngine runners (200 tokens/s per sequence, 0.2 s loads) so
the daemon, not the model, is what is soaked; ``--engine llama`` uses real llama.cpp runners of
the tiny test model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, model_runners, pct  # noqa: E402
from tests.e2e.conftest import create_model  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

KNOBS = {"tokens_per_second": 200.0, "default_num_predict": 16, "load_time": 0.2}


class Daemon:
    def __init__(self, models: Path, args: argparse.Namespace) -> None:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
        env.update(
            {
                "OLLAMA_HOST": f"127.0.0.1:{port}",
                "OLLAMA_MODELS": str(models),
                "CORRAL_DEFAULT_MODEL": "",
                "OLLAMA_MAX_LOADED_MODELS": str(args.max_loaded),
                "OLLAMA_NUM_PARALLEL": "4",
                "OLLAMA_DEBUG": "1",
            }
        )
        if args.engine == "fake":
            env.update({"CORRAL_RUNNER_ENGINE": "fake", "CORRAL_FAKE_KNOBS": json.dumps(KNOBS)})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.daemon.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        self.loads = 0
        self.crashes = 0
        listening = threading.Event()

        def pump() -> None:  # count lines as they come; keep nothing (a soak log is long)
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                if "Listening" in line:
                    listening.set()
                elif "starting runner" in line:
                    self.loads += 1
                elif "exited unexpectedly" in line or "failed to load" in line:
                    self.crashes += 1
            listening.set()

        threading.Thread(target=pump, daemon=True).start()
        if not listening.wait(60) or self.proc.poll() is not None:
            raise SystemExit("daemon did not start")
        self.ps = psutil.Process(self.proc.pid)

    def sample(self) -> tuple[float, int, int]:
        """(RSS MiB, open fds, runner processes) of the daemon."""
        runners = model_runners(self.proc.pid)
        return self.ps.memory_info().rss / 2**20, self.ps.num_fds(), len(runners)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


class Stats:
    def __init__(self) -> None:
        self.requests = 0
        self.errors: list[str] = []
        self.cancelled = 0
        self.latencies: list[float] = []  # this interval, seconds


async def one(
    s: aiohttp.ClientSession, url: str, model: str, rng: random.Random, stats: Stats
) -> None:
    kind = rng.choices(["generate", "chat", "embed", "cancel"], [45, 30, 12, 13])[0]
    stream = rng.random() < 0.6
    opts = {"num_predict": rng.randint(4, 32), "temperature": 0.7}
    if kind == "embed":
        path, body = "/api/embed", {"model": model, "input": ["soak", f"{rng.random()}"]}
    elif kind == "chat":
        path = "/api/chat"
        body = {
            "model": model,
            "stream": stream,
            "options": opts,
            "messages": [{"role": "user", "content": f"hello {rng.randint(0, 9999)}"}],
        }
    else:
        path = "/api/generate"
        body = {
            "model": model,
            "prompt": f"soak {rng.randint(0, 9999)}",
            "options": opts,
            "stream": stream or kind == "cancel",
        }
    t0 = time.monotonic()
    try:
        async with s.post(url + path, json=body) as r:
            if r.status != 200:
                stats.errors.append(f"{path} {r.status} {(await r.text())[:200]}")
                return
            if kind == "cancel":
                await r.content.readline()  # the first token, then the client leaves
                r.close()
                stats.cancelled += 1
                return
            if not body.get("stream", True) or kind == "embed":
                data = await r.json()
                if "error" in data:
                    stats.errors.append(f"{path} 200 {data['error'][:200]}")
                return
            lines = [json.loads(x) async for x in r.content if x.strip()]
            if (
                sum(1 for x in lines if x.get("done")) != 1
                or not lines[-1].get("done")
                or any("error" in x for x in lines)
            ):
                stats.errors.append(f"{path} stream ended badly: {lines[-1:]}")
    except (TimeoutError, aiohttp.ClientError) as exc:
        stats.errors.append(f"{path} {exc!r}")
    finally:
        stats.requests += 1
        if kind != "cancel":
            stats.latencies.append(time.monotonic() - t0)


async def soak(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="corral-soak-") as tmp:
        root = Path(tmp)
        d = Daemon(root / "models", args)
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as s:
                models = [
                    await create_model(
                        s, d.url, write_tiny_llama(root / f"m{k}.gguf", seed=k + 1), f"soak{k}"
                    )
                    for k in range(args.models)
                ]
                stats = Stats()
                end = time.monotonic() + args.seconds
                t0 = time.monotonic()

                async def client(c: int) -> None:
                    rng = random.Random(c)
                    while time.monotonic() < end:
                        await one(s, d.url, rng.choice(models), rng, stats)

                tasks = [asyncio.create_task(client(c)) for c in range(args.clients)]
                samples = []
                print(
                    f"soak: {args.seconds:.0f} s, {args.clients} clients, {args.models} models,"
                    f" OLLAMA_MAX_LOADED_MODELS={args.max_loaded}, OLLAMA_NUM_PARALLEL=4, "
                    f"engine {args.engine}, {os.cpu_count()} CPUs",
                    flush=True,
                )
                print(
                    f"{'t s':>6} {'requests':>9} {'errors':>7} {'cancel':>7} {'p50 ms':>8} "
                    f"{'p99 ms':>8} {'RSS MiB':>8} {'fds':>5} {'runners':>7} {'loads':>6} "
                    f"{'load avg':>8}",
                    flush=True,
                )
                while time.monotonic() < end:
                    await asyncio.sleep(min(args.interval, max(0.0, end - time.monotonic())))
                    lat, stats.latencies = stats.latencies, []
                    rss, fds, runners = d.sample()
                    samples.append((rss, fds))
                    print(
                        f"{time.monotonic() - t0:6.0f} {stats.requests:9d} "
                        f"{len(stats.errors):7d} {stats.cancelled:7d} "
                        f"{pct(lat, 50) * 1000:8.0f} {pct(lat, 99) * 1000:8.0f} {rss:8.1f} "
                        f"{fds:5d} {runners:7d} {d.loads:6d} {os.getloadavg()[0]:8.1f}",
                        flush=True,
                    )
                await asyncio.gather(*tasks)
            rss, fds, _ = d.sample()
            print(
                f"summary: {stats.requests} requests ({stats.cancelled} abandoned on purpose) "
                f"in {time.monotonic() - t0:.0f} s, {len(stats.errors)} errors, {d.loads} "
                f"runner loads, {d.crashes} runner failures; RSS {samples[0][0]:.1f} -> "
                f"{rss:.1f} MiB, fds {samples[0][1]} -> {fds} (first sample -> end)"
            )
            for e in stats.errors[:20]:
                print("  error:", e)
            return 1 if stats.errors else 0
        finally:
            rc = d.stop()
            if rc != 0:
                print(f"daemon exited {rc}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--models", type=int, default=3)
    p.add_argument("--max-loaded", type=int, default=2)
    p.add_argument("--engine", choices=["fake", "llama"], default="fake")
    p.add_argument("--interval", type=float, default=30.0)
    return asyncio.run(soak(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
