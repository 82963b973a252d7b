"""Dispatch cost of the pure scheduler under load: 12 loaded runners, 512 queued requests.

Steady state: every runner's slots are busy and 512 requests wait (spread over the 12 models).
Each round finishes one in-flight request (which grants the next queued one), brings a new
request (which queues), and now and then cancels a queued request, re-reads the inventory or
ticks the clock. Every ``dispatch`` is timed; p50/p99/max are printed in microseconds.

Run: ``./dev bench scheduler`` (or ``.venv/bin/python bench/scheduler.py [events]``).
Target: p99 < 200 us per event.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time

from corral.scheduler import (
    Gpu,
    Grant,
    HostMemory,
    Inventory,
    InventoryUpdated,
    Limits,
    ModelFacts,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    RunnerOptions,
    RunnerReady,
    Scheduler,
    StartRunner,
    Tick,
)

GB = 1_000_000_000
RUNNERS = 12
QUEUED = 512
PARALLEL = 4


def facts(i: int) -> ModelFacts:
    blocks = 32
    size = (1 + i % 3) * GB
    return ModelFacts(
        architecture="llama",
        file_size=size,
        block_count=blocks,
        n_ctx_train=8192,
        embedding_length=4096,
        head_count=32,
        head_count_kv=8,
        vocab_size=128256,
        layer_bytes=(size // blocks,) * blocks,
    )


def main(events: int = 20000) -> dict[str, float]:
    rng = random.Random(7)
    gpus = tuple(
        Gpu(id=str(i), name="Sim A100", library="cuda", total=80 * GB, free=80 * GB)
        for i in range(4)
    )
    inv = Inventory(gpus=gpus, host=HostMemory(total=512 * GB, free=480 * GB))
    s = Scheduler(
        Limits(
            max_loaded=RUNNERS,
            num_parallel=PARALLEL,
            max_queue=QUEUED + 64,
            default_keep_alive=300.0,
        ),
        inv,
    )
    opts = RunnerOptions(num_ctx=4096, num_ctx_auto=True, num_batch_auto=True)
    models = [(f"/blobs/sha256-{i:064x}", facts(i)) for i in range(RUNNERS)]
    now = 0.0
    next_req = 0
    in_flight: dict[int, str] = {}
    waiting: set[int] = set()

    def dispatch(ev) -> list:
        effects = s.dispatch(ev, now)
        for e in effects:
            if isinstance(e, Grant):
                in_flight[e.req_id] = e.runner_id
                waiting.discard(e.req_id)
        return effects

    # Load the 12 runners and fill their slots.
    for key, f in models:
        for _ in range(PARALLEL):
            next_req += 1
            waiting.add(next_req)
            for e in dispatch(RequestArrived(next_req, key, f, opts)):
                if isinstance(e, StartRunner):
                    dispatch(RunnerReady(e.runner_id, pid=1000))
    assert len(s.snapshot().runners) == RUNNERS, s.snapshot()
    # Queue 512 more.
    for _ in range(QUEUED):
        next_req += 1
        key, f = models[rng.randrange(RUNNERS)]
        waiting.add(next_req)
        dispatch(RequestArrived(next_req, key, f, opts))
    assert s.snapshot().queued == QUEUED

    samples: list[int] = []
    kinds: list[str] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(events):
            now += 0.001
            r = rng.random()
            if r < 0.04 and waiting:
                req = rng.choice(sorted(waiting))
                waiting.discard(req)
                ev = RequestCancelled(req)
            elif r < 0.06:
                ev = InventoryUpdated(inv)
            elif r < 0.08:
                ev = Tick()
            elif len(waiting) < QUEUED:
                next_req += 1
                key, f = models[rng.randrange(RUNNERS)]
                waiting.add(next_req)
                ev = RequestArrived(next_req, key, f, opts)
            else:
                req = rng.choice(sorted(in_flight))
                del in_flight[req]
                ev = RequestFinished(req)
            kinds.append(type(ev).__name__)
            t0 = time.perf_counter_ns()
            effects = s.dispatch(ev, now)
            samples.append(time.perf_counter_ns() - t0)
            for e in effects:
                if isinstance(e, Grant):
                    in_flight[e.req_id] = e.runner_id
                    waiting.discard(e.req_id)
    finally:
        gc.enable()
    snap = s.snapshot()
    by_kind: dict[str, list[int]] = {}
    for k, x in zip(kinds, samples, strict=True):
        by_kind.setdefault(k, []).append(x)
    samples.sort()
    us = [x / 1000 for x in samples]
    result = {
        "events": len(us),
        "p50_us": us[len(us) // 2],
        "p99_us": us[int(len(us) * 0.99)],
        "max_us": us[-1],
        "mean_us": statistics.fmean(us),
        "runners": len(snap.runners),
        "queued_at_end": snap.queued,
        "in_flight_at_end": snap.in_flight,
        "p99_us_by_event": {k: sorted(v)[int(len(v) * 0.99)] / 1000 for k, v in by_kind.items()},
    }
    return result


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    res = main(n)
    print(
        f"scheduler dispatch, {RUNNERS} runners x {PARALLEL} slots, ~{QUEUED} queued requests, "
        f"{res['events']} events"
    )
    print(
        f"  p50 {res['p50_us']:.1f} us   p99 {res['p99_us']:.1f} us   max {res['max_us']:.1f} us"
        f"   mean {res['mean_us']:.1f} us"
    )
    print(
        f"  at end: {res['runners']} runners, {res['queued_at_end']} queued, "
        f"{res['in_flight_at_end']} in flight"
    )
    print(
        "  p99 by event:",
        ", ".join(f"{k} {v:.1f} us" for k, v in sorted(res["p99_us_by_event"].items())),
    )
    print("  target p99 < 200 us:", "met" if res["p99_us"] < 200 else "NOT met")
