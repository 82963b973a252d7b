"""What the daemon adds on top of a runner: time to first token and tiny-request throughput.

Baseline and subject are measured in the same run with the same FakeEngine knobs:
  direct  -> a runner process we spawn ourselves (`python -m corral.runner`, FakeEngine), its
             /completion endpoint called straight;
  daemon  -> `corral serve` (CORRAL_RUNNER_ENGINE=fake) with the tiny model, /api/generate.
Prints p50/p99 added TTFT in ms (target: p50 <= 1 ms) and, for tiny non-streaming requests
(num_predict 1) one after another, requests/s through both measured A-B-A-B in 10 blocks, their
ratio (target >= 0.6) and the CPU µs per request of the daemon, its runner and the direct runner
(user + system time of each process over its blocks). The daemon's log goes to a file: a pipe
drained by a thread of this process took the client's GIL for every request's log line.

    ./dev bench daemon_overhead [--n 200] [--loops]

``--loops`` adds the same daemon on asyncio's own event loop (``CORRAL_EVENT_LOOP=asyncio``) to
the A-B blocks: the default loop (uvloop where installed) against it in one run. Its runner
inherits the setting (since f2a7d47; the direct runner is on the default loop).

A request's fixed cost (issue 18, point 5; target: ratio >= 0.6, added TTFT p50 <= 1 ms).
Requests go one after another, so the CPU of every process on the chain client -> daemon ->
runner -> daemon -> client adds up, and each process wake-up too. Where it stands at 48a0ec5
(the request pipe), this bench, load 1.7-2.5: direct 1691/s, daemon 757/s, ratio 0.45, added
TTFT p50 0.60 ms; CPU per tiny request: daemon 817 us, its runner 233 us, the runner called
directly 340 us. 0.6 asks ~985 us per request through the daemon against ~1,320 us: ~340 us
less, nearly all of it the daemon's own Python (the client's share is the same on both paths).

How it got here, each step measured A-B in one run against the code before it (direct runner
and both daemons alternating in 10 blocks; load averages in brackets; the machine is shared):

1. The daemon's side of a request (5dac2bc -> 48f6eba -> 114ab09). Its runner calls through
   runner_http.RunnerHTTP (keep-alive connections, a pre-built head, one write, a small parser)
   instead of an aiohttp client request; arrival and release dispatched by the scheduler in the
   request's own task when nothing waits; the job's event generator closed (not left to the
   loop's finalizer); the model's GGUF facts and capabilities kept per store record; the Host
   check's verdict per header kept; the answer written before the release, the log line and the
   metrics (responses.send_json), so those overlap the client's next request; a whole answer
   in one round trip without a generator (RunnerClient.complete); the log line rendered in half
   the time (logging.Logfmt); no asyncio.Event per dispatch; the daemon on uvloop. Daemon CPU
   per tiny request 2267 -> 1567 us (load 16), then 803/773/777 -> 717/730/680 us (load 9-7);
   per route at 114ab09 against b6fb374 (load 4.5-3.4): /api/generate 703/733/700 ->
   697/613/633, /api/chat 720/810 -> 680/655, /api/embed 545/535 -> 520/520,
   /v1/chat/completions 715/690 -> 645/665. uvloop against asyncio's loop (``--loops``, load
   5-7): a few per cent of rate, no CPU to speak of.
   Where a tiny /api/generate's time went inside the daemon at 48f6eba (median us from its first
   byte, perf_counter marks, 3,000 requests, load 5): aiohttp's parse and handler task 80-84,
   the middlewares 19-20, the handler (body, resolve, options, prompt, job set-up) 97-103, the
   scheduler's arrival and grant 40-43, the runner call 265-279 after the first byte (the write
   to the runner included), the runner's answer to the client's answer 193-335, after the
   answer (release, close, log, metrics) 115-120.
2. The runner's side (e57a1b7, f2a7d47): a small completion (prompt + tokens <= 256, no images,
   no format: server.INLINE_SUBMIT) is submitted on the event loop, not through an executor
   thread (two thread wake-ups less: ~7 -> 3 voluntary context switches per request), and the
   runner runs on uvloop as the daemon does. Runner called directly by a raw keep-alive client
   (load 4.3-4.7, then 3.3): CPU per request 348 -> 150 -> 135 us back to back, 420 -> 275 ->
   173 us with 0.8 ms of other work between requests. This bench's ratio FELL with it
   (0.48/0.46/0.52 -> 0.35/0.34/0.37, load 3.6-3.3): the direct baseline is the same runner,
   so it gains the same (direct 1355-1381 -> 2087-2270/s), while the daemon's own cost stays.
3. The request pipe (48a0ec5, docs/DESIGN.md "Request pipe"): the daemon's completions go to
   the runner as a line on its stdin and come back on its event pipe, written by the decode
   thread: no HTTP request, no aiohttp handler, no answer write by the runner's loop, no
   wake-up of that loop for the answer. Against cf87fd9, four pairs (load 2.2-3.1): ratio
   0.37/0.30/0.38/0.42 -> 0.41/0.36/0.51/0.53, the daemon's runner 427/460/463/417 ->
   230/217/193/200 us per request, the daemon's own CPU unchanged (~730-800 us). Against
   98032e6, three pairs (load 3.1-2.5): 0.35/0.36/0.31 -> 0.45/0.44/0.40, runner 567/557/680
   -> 233/253/293 us, daemon 1037/1050/1527 -> 963/1017/1430 us. Streams are not slower:
   ``vs_llama_server --model tiny --rounds 2 --streams 1,32``, 48a0ec5 and 98032e6 alternating,
   two runs each (load 3.4-3.9): daemon CPU per token 156/146 vs 137/146 us at 1 stream, 41/37
   vs 39/43 at 32; runner 303/313 vs 342/313 and 182/175 vs 179/194 us.

What is left is the daemon's own ~700-800 us of Python per request: aiohttp's server side (the
request object, its task, the headers, the answer's write), the middlewares, the handler's
steps and the log line, each a few per cent (py-spy and perf: ~73 % of the daemon's CPU in the
interpreter, ~13 % in the kernel, uvloop and aiohttp's C parts ~7 %); no single part that one
change removes. The runner's part (~200 us: its loop's read of the line, the submit, a wake-up
of its decode thread, the answer's write) is now below the direct runner's own (~340 us).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.common import free_port, model_runners, pct  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

KNOBS = {"tokens_per_second": 100000.0, "default_num_predict": 8}
ROUNDS = 10  # A-B blocks of the requests/s measurement


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


def spawn_daemon(models: Path, log_path: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """``corral serve`` on a free port (``env`` set), its log going to ``log_path``: a file, not
    a pipe this process drains, so no thread of the client wakes for each request's log line and
    takes the GIL from it (the direct runner's log goes nowhere)."""
    port = free_port()
    env = {
        **os.environ,
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(models),
        "CORRAL_DEFAULT_MODEL": "",
        "CORRAL_RUNNER_ENGINE": "fake",
        "CORRAL_FAKE_KNOBS": json.dumps(KNOBS),
        "OLLAMA_KEEP_ALIVE": "-1",
        **env,
    }
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral.daemon.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    deadline = time.monotonic() + 60
    while b"Listening" not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("daemon did not start:\n" + log_path.read_text()[-2000:])
        time.sleep(0.05)
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


async def timed(s: aiohttp.ClientSession, url: str, body: dict, n: int) -> float:
    """Seconds for ``n`` requests one after another (tiny non-streaming: the fixed cost)."""
    t0 = time.perf_counter()
    for _ in range(n):
        async with s.post(url, json=body) as r:
            await r.read()
            assert r.status == 200, await r.text()
    return time.perf_counter() - t0


async def rates(
    s: aiohttp.ClientSession,
    paths: dict[str, tuple[str, dict, dict[str, psutil.Process]]],
    n: int,
    rounds: int = ROUNDS,
) -> dict[str, tuple[float, dict[str, float]]]:
    """Per path (url, body, processes): requests/s and each process's CPU µs per request,
    measured A-B-A-B in ``rounds`` blocks of ``n // rounds`` requests so that drift in the
    machine's load hits every path alike."""
    block = max(1, n // rounds)
    wall = dict.fromkeys(paths, 0.0)
    cpu = {k: dict.fromkeys(procs, 0.0) for k, (_, _, procs) in paths.items()}
    for _ in range(rounds):
        for k, (url, body, procs) in paths.items():
            before = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
            wall[k] += await timed(s, url, body, block)
            for name, p in procs.items():
                cpu[k][name] += sum(p.cpu_times()[:2]) - before[name]
    done = block * rounds
    return {
        k: (done / wall[k], {name: t / done * 1e6 for name, t in cpu[k].items()}) for k in paths
    }


async def main(n: int, loops: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = write_tiny_llama(tmp_path / "tiny.gguf", seed=1)
        runner, runner_url = spawn_runner(model)
        daemon, daemon_url = spawn_daemon(tmp_path / "models", tmp_path / "daemon.log")
        procs = [runner, daemon]
        if loops:  # the same daemon on asyncio's own event loop, measured in the same blocks
            other, other_url = spawn_daemon(
                tmp_path / "models-asyncio", tmp_path / "asyncio.log", CORRAL_EVENT_LOOP="asyncio"
            )
            procs.append(other)
        try:
            async with aiohttp.ClientSession() as s:
                await common.create_model(s, daemon_url, model, "tiny")
                if loops:
                    await common.create_model(s, other_url, model, "tiny")
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
                added = [(b - a) * 1000 for a, b in zip(direct, via, strict=True)]
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
                    f"target p50 <= 1 ms: {'OK' if p50_added <= 1 else 'MISSED'}"
                )
                small_direct = {"prompt": "hi", "options": {"num_predict": 1}, "stream": False}
                small_daemon = {
                    "model": "tiny",
                    "prompt": "hi",
                    "options": {"num_predict": 1},
                    "stream": False,
                }
                daemon_proc = psutil.Process(daemon.pid)
                paths = {
                    "direct": (
                        f"{runner_url}/completion",
                        small_direct,
                        {"runner": psutil.Process(runner.pid)},
                    ),
                    "daemon": (
                        f"{daemon_url}/api/generate",
                        small_daemon,
                        {"daemon": daemon_proc, "runner": model_runners(daemon_proc.pid)[0]},
                    ),
                }
                if loops:
                    other_proc = psutil.Process(other.pid)
                    await timed(s, f"{other_url}/api/generate", small_daemon, 5)  # loads it
                    paths["daemon on asyncio"] = (
                        f"{other_url}/api/generate",
                        small_daemon,
                        {"daemon": other_proc, "runner": other_proc.children()[0]},
                    )
                for url, body, _ in paths.values():
                    await timed(s, url, body, 50)  # warm
                got = await rates(s, paths, n)
                (r_direct, cpu_direct), (r_daemon, cpu_daemon) = got["direct"], got["daemon"]
                print(
                    f"tiny non-streaming requests/s: direct {r_direct:.0f}, daemon "
                    f"{r_daemon:.0f}, ratio {r_daemon / r_direct:.2f}  (target >= 0.6)"
                )
                print(
                    f"CPU µs per tiny request: daemon {cpu_daemon['daemon']:.0f} (its runner "
                    f"{cpu_daemon['runner']:.0f}); runner called directly "
                    f"{cpu_direct['runner']:.0f}"
                )
                if loops:
                    r_other, cpu_other = got["daemon on asyncio"]
                    print(
                        f"the daemon on asyncio's loop (CORRAL_EVENT_LOOP=asyncio): {r_other:.0f}"
                        f"/s, ratio {r_other / r_direct:.2f}; CPU µs per tiny request "
                        f"{cpu_other['daemon']:.0f} (its runner {cpu_other['runner']:.0f})"
                    )
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument(
        "--loops",
        action="store_true",
        help="also a daemon on asyncio's own event loop, A-B with the default one (uvloop)",
    )
    args = ap.parse_args()
    asyncio.run(main(args.n, args.loops))
