"""Per-step timeline of the runner's decode loop, for ``bench/vs_llama_server.py --timeline``.

On PYTHONPATH with CORRAL_TIMELINE_OUT=FILE, every Python process started (the daemon spawns its
runners with the same environment) watches for ``corral.runner.engine``; once that is imported,
its decode loop is wrapped with timers and the totals are written to FILE.<pid>.json each time
the engine goes idle. Product code is not touched; nothing happens without the variable.

Per step: batch build (the part of _decode_group before llama_decode), llama_decode, and the
engine's phases after it that exist in the code at hand: choose (Engine._choose: the step's
tokens from its logits) and take (Engine._take_rows: counting, text, events), or in the engine
before them sampling (_pick) and detokenisation (piece + TextStream.feed); the hand-over of the
step's events (the end of Engine._step: relay_chunks, the jobs' emits, the pipe write), the rest
of the step, and the gap between steps; the decode thread's CPU time per step.

With CORRAL_TIMELINE_MODE=decode only llama_decode and the step are timed (two clock pairs per
step, nothing per token): the cumulative totals (steps, wall and decode-thread CPU of the steps
and of llama_decode inside them) plus every thread's CPU seconds and which threads run Python,
for the CPU split of ``bench/vs_llama_server.py``'s rounds.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time

OUT = os.environ.get("CORRAL_TIMELINE_OUT")
MODE = os.environ.get("CORRAL_TIMELINE_MODE", "full")


def _threads() -> dict[str, float]:
    """CPU seconds per thread of this process."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[tid] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return out


def _write(data: dict) -> None:
    tmp = f"{OUT}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, f"{OUT}.{os.getpid()}.json")


def _install_decode(engine_mod) -> None:
    """Totals only: llama_decode and the step, wall and decode-thread CPU (ns)."""
    import threading

    import llama_cpp

    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    tot = {"steps": 0, "step_ns": 0, "step_cpu_ns": 0, "decode_ns": 0, "decode_cpu_ns": 0}
    real_decode = llama_cpp.llama_decode

    def decode(ctx, batch):
        t, c = clock(), cpu()
        try:
            return real_decode(ctx, batch)
        finally:
            tot["decode_ns"] += clock() - t
            tot["decode_cpu_ns"] += cpu() - c

    llama_cpp.llama_decode = decode
    E = engine_mod.Engine
    real_step = E._step

    def step(self):
        t, c = clock(), cpu()
        real_step(self)
        tot["steps"] += 1
        tot["step_ns"] += clock() - t
        tot["step_cpu_ns"] += cpu() - c
        if not self._has_work() and not self._inbox:
            _write(
                {
                    **tot,
                    "threads": _threads(),
                    "python_threads": [str(t.native_id) for t in threading.enumerate()],
                    "decode_tid": str(threading.get_native_id()),
                    "pid": os.getpid(),
                }
            )

    E._step = step


def _install(engine_mod) -> None:
    import llama_cpp

    from corral.runner import common

    clock = time.perf_counter_ns
    steps: list[tuple] = []
    E = engine_mod.Engine
    # the phases of this engine's step (see the docstring)
    phases = {"choose": "_choose", "take": "_take_rows", "pick": "_pick", "detok": "piece"}
    phases = {k: v for k, v in phases.items() if hasattr(E, v)}
    if "take" in phases:  # _pick is inside _choose, piece inside _take_rows
        phases.pop("pick")
        phases.pop("detok")
    cur = {"build": 0, "decode": 0, **dict.fromkeys(phases, 0), "handover": 0, "calls": 0}
    state = {"last_end": 0, "decode_tid": 0}

    def add(key, ns):
        cur[key] += ns

    real_decode = llama_cpp.llama_decode

    def decode(ctx, batch):
        t = clock()
        add("build", t - state.get("group_start", t))
        rc = real_decode(ctx, batch)
        add("decode", clock() - t)
        add("calls", 1)
        return rc

    llama_cpp.llama_decode = decode

    real_group, real_step, real_slots = E._decode_group, E._step, E._step_slots

    def group(self, g):
        state["group_start"] = clock()
        return real_group(self, g)

    def timed(key, fn):
        def wrapper(*args):
            t = clock()
            try:
                return fn(*args)
            finally:
                add(key, clock() - t)

        return wrapper

    def step_slots(self):
        try:
            return real_slots(self)
        finally:
            state["slots_end"] = clock()

    def step(self):
        state["decode_tid"] = state["decode_tid"] or __import__("threading").get_native_id()
        for k in cur:
            cur[k] = 0
        n_active = sum(1 for s in self._slots if s.job is not None)
        t0, c0 = clock(), time.thread_time_ns()
        gap = t0 - state["last_end"] if state["last_end"] else 0
        real_step(self)
        t1 = clock()
        add("handover", t1 - state["slots_end"])
        state["last_end"] = t1
        pending = any(getattr(s, "pending", None) for s in self._slots if s.job is not None)
        steps.append((n_active, t1 - t0, gap, time.thread_time_ns() - c0, pending, dict(cur)))
        if (
            not any(s.job is not None for s in self._slots)
            and not self._waiting
            and not self._inbox
        ):
            dump()
        return None

    def dump():
        _write(
            {
                "steps": steps[-4000:],
                "threads": _threads(),
                "decode_tid": state["decode_tid"],
                "pid": os.getpid(),
            }
        )

    E._decode_group, E._step, E._step_slots = group, step, step_slots
    for key, name in phases.items():
        setattr(E, name, timed(key, getattr(E, name)))
    if "detok" in phases:
        common.TextStream.feed = timed("detok", common.TextStream.feed)


class _Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "corral.runner.engine":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            (_install_decode if MODE == "decode" else _install)(module)

        spec.loader.exec_module = exec_module
        return spec


if OUT:
    sys.meta_path.insert(0, _Watch())
