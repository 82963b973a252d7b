"""Per-step timeline of the runner's decode loop, for ``bench/vs_llama_server.py --timeline``.

On PYTHONPATH with CORRAL_TIMELINE_OUT=FILE, every Python process started (the daemon spawns its
runners with the same environment) watches for ``corral.runner.engine``; once that is imported,
its decode loop is wrapped with timers and the totals are written to FILE.<pid>.json each time
the engine goes idle. Product code is not touched; nothing happens without the variable.

Per step: batch build (the part of _decode_group before llama_decode), llama_decode, sampling
(_pick), detokenisation (piece + TextStream.feed), emit (hand-off to the HTTP thread),
the rest of the step, and the gap between steps; the decode thread's CPU time per step.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time

OUT = os.environ.get("CORRAL_TIMELINE_OUT")


def _install(engine_mod) -> None:
    import llama_cpp

    from corral.runner import common

    clock = time.perf_counter_ns
    steps: list[tuple] = []
    cur = {"decode": 0, "pick": 0, "detok": 0, "emit": 0, "build": 0, "calls": 0}
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

    E = engine_mod.Engine
    real_group, real_pick, real_piece, real_step = E._decode_group, E._pick, E.piece, E._step

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

    def step(self):
        state["decode_tid"] = state["decode_tid"] or __import__("threading").get_native_id()
        for k in cur:
            cur[k] = 0
        n_active = sum(1 for s in self._slots if s.job is not None)
        # wrap each running job's emit once
        for s in self._slots:
            job = s.job
            if job is not None and not getattr(job, "_timed", False):
                job.emit, job._timed = timed("emit", job.emit), True
        t0, c0 = clock(), time.thread_time_ns()
        gap = t0 - state["last_end"] if state["last_end"] else 0
        real_step(self)
        t1 = clock()
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
        threads = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                threads[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
        data = {
            "steps": steps[-4000:],
            "threads": threads,
            "decode_tid": state["decode_tid"],
            "pid": os.getpid(),
        }
        tmp = f"{OUT}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, f"{OUT}.{os.getpid()}.json")

    E._decode_group, E._step = group, step
    E._pick, E.piece = timed("pick", real_pick), timed("detok", real_piece)
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
            _install(module)

        spec.loader.exec_module = exec_module
        return spec


if OUT:
    sys.meta_path.insert(0, _Watch())
