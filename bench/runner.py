"""Benchmark the runner on Gemma 3 270M (2 threads, greedy, 128 tokens).

(a) one stream through the runner's HTTP API vs llama_cpp.Llama.create_completion in-process
    (same model, same threads), decode tok/s measured client-side from the first to the last
    token, ratio printed (target >= 0.95);
(b) aggregate tok/s with 1, 2, 4 and 8 concurrent streams on a parallel-8 runner, and the
    scaling over one stream (target: 4 streams >= 2.0x);
(c) time to first token, p50, per concurrency.

    .venv/bin/python bench/runner.py [--model PATH] [--threads 2] [--tokens 128] [--repeat 2]

Why (b) stays below ~2x on a 2-core CPU (measured on this machine, a 2-core Zen 5 VM; the last
two lines of the output reproduce it). The runner reaches the bare llama_decode ceiling; the
ceiling itself is compute-bound. Gemma 3 270M's tied 640 x 262144 Q8_0 output projection is 168M
of its ~240M multiply-adds per generated token (logits are requested for each sequence's last
token only; prompt tokens compute none). ggml's Q8_0 dot kernel does ~22 GMAC/s per core here,
~7.5 ms per sequence per core, and that cost is per column: batching does not amortise it, it
only amortises the transformer layers (Q5_0/Q4_K, ~5 ms for one token, ~13 ms for four on one
thread). One 4-sequence step therefore costs >= 4 x 7.5 / 2 + ~6 = ~21 ms on 2 threads against
~11 ms for one token, i.e. <= ~2.1x in theory and ~1.6x as measured (28 ms).

The stock build was worse: llamafile's tinyBLAS takes every Q8_0 matmul from 2 columns on and,
with k = 20 blocks per row, is 1.7-2.4x slower per column than vec_dot at 2-4 columns.
scripts/patch-llama.py sends 2-7 columns back to vec_dot. Bare llama_decode, one token of each
of n sequences, ms per call (10th percentile of 40-80 calls; 1 thread: CPU time; 2 threads:
wall, stock and patched runs interleaved):

    n                       1      2      4      8
    1 thread, stock      12.7   46.1   66.4   82.8   (without logits: 4.9  9.1  13.4  24.2)
    1 thread, patched    13.6   25.9   44.7      -
    2 threads, stock     11.2   24.4   35.5   42.2   (n = 1 and 4: medians of 3 interleaved runs)
    2 threads, patched   11.2   23.2   28.0      -   (n = 8 takes the stock path)

Not helping (measured): GGML_LLAMAFILE=OFF (a similar decode gain but prompt processing 460 -> 290
tok/s, and the Q5_0 layers lose tinyBLAS at 4-8 tokens); per-sequence splitting of a step (the
engine already does it when k single calls are cheaper, see Engine._split).
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

from bench.prompts import PROMPTS, chat  # noqa: E402
from corral.runner.protocol import LaunchSpec, Ready, decode_event, encode  # noqa: E402


class Baseline:
    """llama_cpp.Llama.create_completion in this process (streaming, first->last token)."""

    def __init__(self, model: str, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model,
            n_ctx=1024,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=512,
            verbose=False,
        )

    def rate(self, tokens: int) -> float:
        t_first = t_last = 0.0
        n = 0
        for _ in self.llm.create_completion(
            chat(PROMPTS[0]), max_tokens=tokens, temperature=0.0, stream=True
        ):
            now = time.perf_counter()
            t_first = t_first or now
            t_last = now
            n += 1
        return (n - 1) / (t_last - t_first)


def decode_ceiling(
    model: str, threads: int, sizes=(1, 2, 4, 8), steps: int = 30, logits: bool = True
) -> dict[int, float]:
    """tok/s of bare llama_decode calls holding one token of each of n sequences (no sampling,
    no Python per token): what batching can give on this machine at best. ``logits=False``
    skips the output projection (the 262k-vocab matmul) to show its share."""
    import ctypes

    import llama_cpp as L

    quiet = L.llama_log_callback(lambda level, text, user: None)
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    m = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_seq_max, cp.n_batch, cp.n_ubatch = 8 * 1024, 8, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.kv_unified = False
    ctx = L.llama_init_from_model(m, cp)
    b = L.llama_batch_init(512, 0, 1)
    pos = [0] * 8

    def decode(seqs: list[int], per_seq: int) -> float:
        n = 0
        for s in seqs:
            for _ in range(per_seq):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = (
                    100 + pos[s] % 1000,
                    pos[s],
                    1,
                    logits,
                )
                b.seq_id[n][0] = s
                pos[s] += 1
                n += 1
        b.n_tokens = n
        t = time.perf_counter()
        assert L.llama_decode(ctx, b) == 0
        return time.perf_counter() - t

    decode(list(range(8)), 20)
    out = {}
    for k in sizes:
        times = sorted(decode(list(range(k)), 1) for _ in range(steps))
        out[k] = k / times[len(times) // 2]
    L.llama_batch_free(b)
    L.llama_free(ctx)
    L.llama_model_free(m)
    return out


class Runner:
    def __init__(self, spec: LaunchSpec) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.runner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
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
    return {
        "ttft": t_first - t0,
        "first": t_first,
        "last": t_last,
        "start": t0,
        "end": time.perf_counter(),
        "eval_count": done["eval_count"],
        "chunks": chunks,
    }


async def concurrent(url: str, n: int, tokens: int) -> tuple[float, list[float], list[dict]]:
    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(stream(session, url, PROMPTS[i % len(PROMPTS)] + f" ({n})", tokens) for i in range(n))
        )
        wall = time.perf_counter() - t0
    total = sum(r["eval_count"] for r in results)
    return total / wall, [r["ttft"] for r in results], results


async def one_stream_rate(url: str, tokens: int) -> float:
    async with aiohttp.ClientSession() as session:
        r = await stream(session, url, PROMPTS[0], tokens)
    return (r["eval_count"] - 1) / (r["last"] - r["first"])


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

    # (a) alternate the two so that load from other processes hits both alike
    base_llm = Baseline(args.model, args.threads)
    runner = Runner(
        LaunchSpec(
            model_path=args.model,
            num_ctx=args.num_ctx,
            parallel=8,
            num_thread=args.threads,
            num_batch=512,
        )
    )
    try:
        base_llm.rate(16)  # warm-up
        asyncio.run(one_stream_rate(runner.url, 16))
        bases, ones = [], []
        for _ in range(args.repeat + 1):
            bases.append(base_llm.rate(args.tokens))
            ones.append(asyncio.run(one_stream_rate(runner.url, args.tokens)))
        base, one = statistics.median(bases), statistics.median(ones)
        base_llm.llm.close()
        print(
            f"(a) llama_cpp.Llama.create_completion in-process: {base:6.1f} tok/s  "
            f"(runs: {', '.join(f'{x:.1f}' for x in bases)})"
        )
        print(
            f"(a) runner over HTTP, one stream:               {one:6.1f} tok/s  "
            f"(runs: {', '.join(f'{x:.1f}' for x in ones)})"
        )
        print(f"(a) ratio {one / base:.2f} (target >= 0.95)", flush=True)
        agg: dict[int, float] = {}
        for n in (1, 2, 4, 8):
            rates, ttfts = [], []
            for _ in range(args.repeat):
                rate, tt, _ = asyncio.run(concurrent(runner.url, n, args.tokens))
                rates.append(rate)
                ttfts += tt
            agg[n] = statistics.median(rates)
            runs = ", ".join(f"{x:.0f}" for x in rates)
            print(
                f"(b) {n} concurrent streams: aggregate {agg[n]:6.1f} tok/s  "
                f"scaling {agg[n] / agg.get(1, agg[n]):.2f}x (runs: {runs})"
                f"   (c) TTFT p50 {statistics.median(ttfts) * 1000:6.0f} ms",
                flush=True,
            )
        ceiling = decode_ceiling(args.model, args.threads)
        print(
            "ceiling: bare llama_decode, one token of n sequences per call: "
            + ", ".join(f"{k}: {v:.0f} tok/s ({v / ceiling[1]:.2f}x)" for k, v in ceiling.items())
        )
        bare = decode_ceiling(args.model, args.threads, logits=False)
        print(
            "ms per call, of which output projection (same call without logits subtracted): "
            + ", ".join(
                f"{k}: {1e3 * k / v:.1f} ({1e3 * k / v - 1e3 * k / bare[k]:.1f})"
                for k, v in ceiling.items()
            )
        )
        print(
            f"summary: ratio_a={one / base:.3f} scaling_4={agg[4] / agg[1]:.2f} "
            f"scaling_8={agg[8] / agg[1]:.2f}"
        )
    finally:
        runner.close()


if __name__ == "__main__":
    main()
