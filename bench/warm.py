"""Time to first token of a 2,000-token prompt on Gemma 3 270M: cold, and after the runner was
stopped by a keep-alive expiry, an eviction by another model and a daemon restart, with the
saved prompt caches of issue 22 (docs/DESIGN.md "Saved prompt caches").

Every case starts with the model NOT loaded, so every time to first token includes a runner's
spawn and load; they differ in what is saved:
  cold     the cache directory emptied first: the whole prompt is evaluated
  expiry   the previous request's keep_alive (2s) ran out: its runner saved on the way out
  evict    another model (a tiny one, OLLAMA_MAX_LOADED_MODELS=1) took the only place
  restart  `corral serve` stopped (SIGTERM) and started again on the same store
Each round runs the four in that order (A-B-C-D, A-B-C-D, ...): the cold baseline is measured
between the others, under the same machine load. Prints per case the median TTFT, load time
(the daemon's load_duration, from the request's acquire to its grant) split into the model load
inside the runner (`runner`: the Ready event's load_duration, the daemon's `model_load_s`) and
the rest (`other`: scheduling, the runner's spawn or a spare runner's warm-up still under way,
the handshake), TTFT minus the load (what the saved cache can change: restore or prefill, and
the first token), the prompt evaluation (prompt_eval_duration) and tokens evaluated, the ratios
cold / case, whether the greedy answers are the same, and per round what the load started in
(the daemon's `starting runner` line: a `warm` spare runner, one still `warming` up, `fresh`).

    ./dev bench warm [--rounds 2]

Measured (2 cores shared with other work; medians):
  167c0da, 2 rounds, load 1.1: cold 5.07 s   expiry 0.59 s (8.7x)   evict 0.59 s (8.6x)
                               restart 0.62 s (8.2x); the runner's load 0.58 / 0.45 / 0.41 /
                               0.40 s, restore and first token 0.09-0.15 s
  A-B in one sitting, 1 round each, twice, load 1.0-1.6: llama.cpp's libraries before / after
  scripts/patch-llama.py's load edits (the daemon's runners on LLAMA_CPP_LIB_PATH):
    before   cold 5.34/5.09 s   expiry 1.10/0.93 s   evict 1.33/1.31 s   restart 1.37/1.40 s
             (the runner's load 0.72-1.18 s)
    after    cold 5.45/4.69 s   expiry 0.79/0.54 s   evict 1.09/0.55 s   restart 1.09/0.63 s
             (the runner's load 0.38-0.89 s)
  A-B in one sitting against 47107ad (one spare runner, spawned at the supervisor's start),
  2 rounds each, load 1.7-2.4:
    47107ad  cold 5.90 s   expiry 1.35 s (4.4x)   evict 1.80 s (3.3x)   restart 2.34 s (2.5x)
    2 spares cold 6.12 s   expiry 1.27 s (4.8x)   evict 1.45 s (4.2x)   restart 1.28 s (4.8x)
             (98032e6, 030f41f: two spare runners, the first spawned before the daemon's imports)
After the load every restored case evaluates 1 token instead of 1,997 (30-47x lower than cold's
prefill) and gives the same greedy answer; what remains is the load. A ready runner's load of
Gemma 3 (the runner's share), from timing probes in a build of the wheel's source (thread CPU,
load 3-4), before -> after the load edits:
  the GGUF header (262,144 token strings read)          ~45 ms
  the metadata dump (formatted whole for its log)       ~100 ms -> <1 ms
  the tokens into the vocabulary's hash map             65-100 ms
  the special-token passes over the vocabulary          ~175 ms -> 12-25 ms
  the token-piece cache                                 25-45 ms
  weights read into memory (235 MiB), the context       0.07-0.15 s quiet; seconds under load, in
                                                        fresh 2 MiB pages (DESIGN "Huge pages")
  ~1,500 log lines through the runner's Python callback ~20 ms
10x at load ~1 (a TTFT of ~0.5 s) needs ~0.1 s more off that load: what is left of it is
llama.cpp's own work (the hash map, the piece cache) and first touches of fresh memory.
llama_model_load_from_file alone (mmap, as llama.cpp's default), A-B alternating, load 6:
0.90-1.64 -> 0.55-0.77 s. What precedes the runner's own load (`other`) is the same in every case
since the two spare runners and the early first spare (docs/DESIGN.md "Spare runner"): A-B
alternating in one sitting, 1 round each, twice, against 47107ad (one spare, spawned at the
supervisor's start), load 3.2-4.1:
               expiry        evict         restart
  47107ad      0.02/0.02 s   0.65/0.77 s   0.74/1.06 s   (evict: the tiny model's load took the
                                                          only spare 0.4 s before; restart: the
                                                          spare spawned 5 ms before listening)
  now          0.01/0.04 s   0.02/0.03 s   0.09/0.21 s   (restart: the first spare still `warming`
                                                          at the request in these two rounds)
  (an earlier pair, load 3.2-3.6: now 0.05/0.05, 0.06/0.04, 0.19/0.11 s, every load in a `warm`
  spare.) The first spare, spawned 0.3-0.6 s after exec at load 4.5, was warm 0.4-0.6 s before
  the daemon listened in three starts of an empty store (47107ad: 0.9-1.0 s after); what keeps
  restart's `other` at 0.1-0.2 s with a warm spare is not found yet (the daemon's acquire to its
  `starting runner` line takes ~5 ms). The runner's own load varied 0.8-4.5 s between runs at
  these loads: `other`, not TTFT, is what the spares changed. The ratio falls as the machine
gets quieter: a cold prefill uses both cores and slows down more under load than a load does
(before this work, at load 16-17: cold 50.3 s, expiry 12.3 s, 4.1x; at load 4.5-5.2 with the
spare runner: expiry 1.60 s, 11.0x, evict 3.5x, restart 3.6x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
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

from bench.common import create_model, free_port, model_runners  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

MODEL = "gemma3:270m"
# ~12.35 Gemma tokens per item: 162 items and BOS make ~2,000 tokens
PROMPT = " ".join(
    f"Item {i}: the {w} is on the table."
    for i, w in enumerate(["cat", "hat", "cup", "pen"] * 43)
    if i < 162
)
OPTIONS = {"temperature": 0, "num_predict": 16}
CASES = ("cold", "expiry", "evict", "restart")


class Daemon:
    def __init__(self, models: Path, default_model: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
        env.update(
            {
                "OLLAMA_HOST": f"127.0.0.1:{self.port}",
                "OLLAMA_MODELS": str(models),
                "OLLAMA_MAX_LOADED_MODELS": "1",
                "CORRAL_DEFAULT_MODEL": default_model,
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.daemon.cli", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "corral is ready" in line:
                break
        else:
            raise SystemExit("corral serve did not start")
        # per load of MODEL, from the log: what it started in (a warm spare runner, one still
        # warming up, a fresh process) and the runner's own load time (its Ready line)
        self.loads: list[str] = []
        self.inside: list[float] = []
        # keep reading its log, or it blocks on a full pipe
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if f"model={MODEL}" not in line:
                continue
            if "starting runner" in line:
                m = re.search(r"\sspare(=\w+)?(\s|$)", line)  # older daemons: a bare flag
                self.loads.append(((m.group(1) or "=spare")[1:]) if m else "fresh")
            elif "runner ready" in line and (m := re.search(r"\smodel_load_s=([\d.]+)", line)):
                self.inside.append(float(m.group(1)))

    async def runners_at_most(self, n: int) -> None:
        """Until at most ``n`` runner processes of this daemon are left (a stopping one may
        still be saving its prompt caches; the spare runner waiting for a load is none)."""
        while len([k for k in model_runners(self.proc.pid) if _alive(k)]) > n:
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def generate(s: aiohttp.ClientSession, url: str, model: str, **body) -> tuple[float, dict]:
    """(seconds to the first non-empty piece, the final record with the whole response)."""
    t0 = time.perf_counter()
    first = None
    text = []
    async with s.post(f"{url}/api/generate", json={"model": model, **body}) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = json.loads(raw)
            if line.get("response"):
                first = first or time.perf_counter() - t0
                text.append(line["response"])
            if line.get("done"):
                line["response"] = "".join(text)
                return first or time.perf_counter() - t0, line
    raise SystemExit("stream ended without done")


async def unloaded(s: aiohttp.ClientSession, url: str) -> None:
    while True:
        async with s.get(f"{url}/api/ps") as r:
            if not (await r.json())["models"]:
                return
        await asyncio.sleep(0.05)


async def create_tiny(s: aiohttp.ClientSession, url: str, tmp: Path) -> str:
    return await create_model(s, url, write_tiny_llama(tmp / "tiny.gguf", seed=1), "tiny")


def uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def main(rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="corral-warm-"))
    models = tmp / "models"
    kv = models / "kvcache"
    results: dict[str, list[tuple[float, dict]]] = {c: [] for c in CASES}
    loads = []
    # per case and round: what its load started in, the runner's own load time
    started: dict[str, list[str]] = {c: [] for c in CASES}
    inside: dict[str, list[float]] = {c: [] for c in CASES}

    def note(c: str, d: Daemon) -> None:
        started[c].append(d.loads[-1] if d.loads else "?")
        inside[c].append(d.inside[-1] if d.inside else float("nan"))

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        d = Daemon(models, MODEL)  # imports the embedded model and preloads it
        try:
            tiny = await create_tiny(s, d.url, tmp)
            ask = {"prompt": PROMPT, "raw": True, "options": OPTIONS, "stream": True}
            for r in range(rounds):
                loads.append(uptime())
                # cold: unload, forget everything saved
                await generate(s, d.url, MODEL, prompt="", keep_alive=0)
                await unloaded(s, d.url)
                await d.runners_at_most(0)
                shutil.rmtree(kv, ignore_errors=True)
                results["cold"].append(await generate(s, d.url, MODEL, keep_alive="2s", **ask))
                note("cold", d)
                # expiry: that runner expires after 2 s, saving on its way out
                await unloaded(s, d.url)
                await d.runners_at_most(0)
                results["expiry"].append(await generate(s, d.url, MODEL, **ask))
                note("expiry", d)
                # eviction: the tiny model takes the only place
                await generate(s, d.url, tiny, prompt="hi", options={"num_predict": 2})
                await d.runners_at_most(1)
                results["evict"].append(await generate(s, d.url, MODEL, **ask))
                note("evict", d)
                # restart: no preload this time, the model is in the store
                d.stop()
                d = Daemon(models, "")
                results["restart"].append(await generate(s, d.url, MODEL, **ask))
                note("restart", d)
                print(
                    f"round {r + 1}: "
                    + ", ".join(f"{c} {results[c][-1][0]:.2f}s ({started[c][-1]})" for c in CASES)
                    + f" (load average {loads[-1]})",
                    flush=True,
                )
        finally:
            d.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    cold = statistics.median(t for t, _ in results["cold"])
    answer = results["cold"][0][1]["response"]
    print(
        f"\nGemma 3 270M, {results['cold'][0][1]['prompt_eval_count']}-token prompt, {rounds} "
        f"rounds, load average per round: {'; '.join(loads)} (2 cores)"
    )
    print(
        f"{'case':8} {'TTFT':>8} {'cold/case':>10} {'load':>7} {'runner':>7} {'other':>6}"
        f" {'TTFT-load':>10} {'cold/case':>10} {'prompt eval':>12} {'evaluated':>10}"
        "  same answer  load started in"
    )
    cold_ready = statistics.median(t - rec["load_duration"] / 1e9 for t, rec in results["cold"])
    for c in CASES:
        ttft = statistics.median(t for t, _ in results[c])
        load = statistics.median(rec["load_duration"] / 1e9 for _, rec in results[c])
        own = statistics.median(inside[c])
        other = statistics.median(
            rec["load_duration"] / 1e9 - x
            for (_, rec), x in zip(results[c], inside[c], strict=True)
        )
        pe = statistics.median(rec["prompt_eval_duration"] / 1e9 for _, rec in results[c])
        n = statistics.median(
            rec["prompt_eval_count"] - rec.get("prompt_eval_cached_count", 0)
            for _, rec in results[c]
        )
        ready = statistics.median(t - rec["load_duration"] / 1e9 for t, rec in results[c])
        same = all(rec["response"] == answer for _, rec in results[c])
        print(
            f"{c:8} {ttft:7.2f}s {cold / ttft:9.1f}x {load:6.2f}s {own:6.2f}s {other:5.2f}s"
            f" {ready:9.2f}s {cold_ready / ready:9.1f}x {pe:11.3f}s {n:10.0f}"
            f"  {same!s:11}  {'/'.join(started[c])}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(ap.parse_args().rounds))
