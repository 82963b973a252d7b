"""Benchmark the runner on Gemma 3 270M (2 threads, greedy, 128 tokens).

(a) one stream through the runner's HTTP API vs llama_cpp.Llama.create_completion in-process
    (same model, same threads), decode tok/s measured client-side from the first to the last
    token, ratio printed (target >= 0.95);
(b) aggregate tok/s with 1, 2, 4 and 8 concurrent streams on a parallel-8 runner, and the
    scaling over one stream (target: 4 streams >= 2.0x);
(c) time to first token, p50, per concurrency.

    .venv/bin/python bench/runner.py [--model PATH] [--threads 2] [--tokens 128] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from corral.runner.protocol import LaunchSpec, Ready, decode_event, encode  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe a journey across a desert, day by day.",
    "Write a long letter from a lighthouse keeper to his sister.",
    "Tell the history of a small mountain village over 300 years.",
    "Describe every room of an old castle.",
    "Write a detailed recipe book entry for bread, with stories.",
    "Explain the life cycle of stars to a curious child, at length.",
]


def chat(prompt: str) -> str:
    return f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n"


def baseline(model: str, threads: int, tokens: int, repeat: int) -> float:
    """Decode tok/s of llama_cpp.Llama.create_completion (streaming, first->last token)."""
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    rates = []
    for i in range(repeat + 1):  # the first run warms up
        t_first = t_last = 0.0
        n = 0
        for _ in llm.create_completion(chat(PROMPTS[0]), max_tokens=tokens, temperature=0.0, stream=True):
            now = time.perf_counter()
            t_first = t_first or now
            t_last = now
            n += 1
        if i:
            rates.append((n - 1) / (t_last - t_first))
    llm.close()
    return statistics.median(rates)


class Runner:
    def __init__(self, spec: LaunchSpec) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "corral.runner"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.proc.stdin.write(encode(spec) + b"\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit("runner exited during load")
            ev = decode_event(line)
            if isinstance(ev, Ready):
                self.ready = ev
                break
            if not hasattr(ev, "progress"):
                raise SystemExit(f"runner failed: {ev}")
        self.url = f"http://127.0.0.1:{self.ready.port}"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


async def stream(session: aiohttp.ClientSession, url: str, prompt: str, tokens: int) -> dict:
    body = {"prompt": chat(prompt), "options": {"temperature": 0, "num_predict": tokens}}
    t0 = time.perf_counter()
    t_first = t_last = 0.0
    chunks = 0
    async with session.post(url + "/completion", json=body) as resp:
        async for raw in resp.content:
            line = json.loads(raw)
            now = time.perf_counter()
            if line["type"] == "chunk":
                t_first = t_first or now
                t_last = now
                chunks += 1
            elif line["type"] == "done":
                done = line
            else:
                raise RuntimeError(line)
    return {"ttft": t_first - t0, "first": t_first, "last": t_last, "start": t0, "end": time.perf_counter(),
            "eval_count": done["eval_count"], "chunks": chunks}


async def concurrent(url: str, n: int, tokens: int) -> tuple[float, list[float], list[dict]]:
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream(session, url, PROMPTS[i % len(PROMPTS)] + f" ({n})", tokens)
                                         for i in range(n)))
        wall = time.perf_counter() - t0
    total = sum(r["eval_count"] for r in results)
    return total / wall, [r["ttft"] for r in results], results


async def one_stream_rate(url: str, tokens: int, repeat: int) -> float:
    rates = []
    async with aiohttp.ClientSession() as session:
        for i in range(repeat + 1):
            r = await stream(session, url, PROMPTS[0], tokens)
            if i:
                rates.append((r["eval_count"] - 1) / (r["last"] - r["first"]))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--num-ctx", type=int, default=1024)
    args = ap.parse_args()
    if args.model is None:
        from tests.fixtures.gemma import gemma_path

        args.model = str(gemma_path())

    base = baseline(args.model, args.threads, args.tokens, args.repeat)
    print(f"(a) llama_cpp.Llama.create_completion in-process: {base:6.1f} tok/s", flush=True)

    runner = Runner(LaunchSpec(model_path=args.model, num_ctx=args.num_ctx, parallel=8,
                               num_thread=args.threads, num_batch=512))
    try:
        one = asyncio.run(one_stream_rate(runner.url, args.tokens, args.repeat))
        print(f"(a) runner over HTTP, one stream:               {one:6.1f} tok/s   ratio {one / base:.2f} (target >= 0.95)",
              flush=True)
        agg: dict[int, float] = {}
        for n in (1, 2, 4, 8):
            rates, ttfts = [], []
            for _ in range(args.repeat):
                rate, tt, _ = asyncio.run(concurrent(runner.url, n, args.tokens))
                rates.append(rate)
                ttfts += tt
            agg[n] = statistics.median(rates)
            print(f"(b) {n} concurrent streams: aggregate {agg[n]:6.1f} tok/s  scaling {agg[n] / agg.get(1, agg[n]):.2f}x"
                  f"   (c) TTFT p50 {statistics.median(ttfts) * 1000:6.0f} ms", flush=True)
        print(f"summary: ratio_a={one / base:.3f} scaling_4={agg[4] / agg[1]:.2f} scaling_8={agg[8] / agg[1]:.2f}")
    finally:
        runner.close()


if __name__ == "__main__":
    main()
