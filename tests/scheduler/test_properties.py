"""Random event sequences through the scheduler with the invariant checker after every event,
then a perfect supervisor drains the system: every request must end exactly once (liveness:
no request waits forever, e.g. behind an eviction victim that gets revived - Ollama #17408)."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.scheduler import (
    Fail,
    Grant,
    InventoryUpdated,
    Limits,
    ModelPolicy,
    PolicyChanged,
    Priority,
    Reject,
    RequestCancelled,
    RequestFinished,
    RunnerExited,
    RunnerLoadFailed,
    RunnerOptions,
    RunnerOutOfMemory,
    RunnerReady,
    RunnerStopped,
    UnloadRequested,
)
from tests.scheduler.sched_harness import GB, Harness, cuda, facts, inventory, metal

MODELS = [
    ("m0", facts(4 * GB, blocks=8)),
    ("m1", facts(10 * GB, blocks=10)),
    ("m2", facts(16 * GB, blocks=16)),
    ("m3", facts(30 * GB, blocks=30)),  # larger than any GPU: partial offload when alone
]
OPTIONS = [
    RunnerOptions(num_ctx=4096, num_ctx_auto=True, num_batch_auto=True),
    RunnerOptions(num_ctx=8192),
    RunnerOptions(num_gpu=0),
]
KEEP_ALIVE = [None, 0.0, 10.0, math.inf]
# Operator policies per model name (None = no policy file)
POLICIES = [
    {},
    {
        "m0": ModelPolicy(name="m0", pinned=True),
        "m1": ModelPolicy(name="m1", num_parallel=3, max_queue=2, priority=Priority.LOW),
        "m2": ModelPolicy(name="m2", gpus=("1",)),
    },
    {"m0": ModelPolicy(name="m0", pinned=True), "m2": ModelPolicy(name="m2", pinned=True)},
    {
        "m0": ModelPolicy(name="m0", replicas=3),
        "m1": ModelPolicy(name="m1", replicas=2, priority=Priority.HIGH),
        "m2": ModelPolicy(name="m2", replicas=2, pinned=True),
    },
]
INVENTORIES = [
    inventory(metal(total=24 * GB, free=24 * GB), host_total=64 * GB, host_free=60 * GB),
    inventory(cuda("0", 12 * GB), cuda("1", 8 * GB), host_total=64 * GB, host_free=60 * GB),
    inventory(host_total=48 * GB, host_free=40 * GB),
]

_arrive = st.tuples(
    st.just("arrive"), st.integers(0, 3), st.integers(0, 2), st.integers(0, 3), st.integers(0, 3)
)
PRIORITIES = [None, Priority.HIGH, Priority.NORMAL, Priority.LOW]
_finish = st.tuples(st.just("finish"), st.integers(0, 50))
_ready = st.tuples(st.just("ready"), st.integers(0, 50), st.booleans())
_stopped = st.tuples(st.just("stopped"), st.integers(0, 50))
action = st.one_of(
    _arrive,
    _arrive,
    _arrive,
    _arrive,
    _finish,
    _finish,
    _finish,
    _ready,
    _ready,
    _ready,
    _stopped,
    _stopped,
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("load_fail"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("crash"), st.integers(0, 50)),
    st.tuples(st.just("time"), st.sampled_from([0.5, 5.0, 400.0])),
    st.tuples(st.just("probe"), st.integers(0, 100)),
    st.tuples(st.just("unload"), st.integers(0, 3)),
    st.tuples(st.just("oom"), st.integers(0, 50)),
    st.tuples(st.just("policy"), st.integers(0, len(POLICIES) - 1)),
)


def _pick(items, i):
    items = sorted(items)
    return items[i % len(items)] if items else None


def _loading(h: Harness) -> set[str]:
    return {r.runner_id for r in h.s.snapshot().runners if r.state == "loading"}


def _live(h: Harness) -> set[str]:
    return {r.runner_id for r in h.s.snapshot().runners}


def _probe(h: Harness, fraction: float = 1.0) -> None:
    """A realistic probe: free = total - what live runners use (times ``fraction``)."""
    snap = h.s.snapshot()
    gpus = []
    for g in h.inv.gpus:
        used = sum(r.placement.bytes_on(g.id) for r in snap.runners)
        gpus.append(
            type(g)(
                id=g.id,
                name=g.name,
                library=g.library,
                total=g.total,
                free=max(0, int((g.total - used) * fraction)),
                integrated=g.integrated,
                min_overhead=g.min_overhead,
            )
        )
    h.do(InventoryUpdated(type(h.inv)(gpus=tuple(gpus), host=h.inv.host)))


def run(h: Harness, actions, policies: dict | None = None) -> None:
    policies = {} if policies is None else policies
    for act in actions:
        kind = act[0]
        if kind == "arrive":
            name, f = MODELS[act[1]]
            h.arrive(
                name,
                f,
                OPTIONS[act[2]],
                KEEP_ALIVE[act[3]],
                policy=policies.get(name),
                priority=PRIORITIES[act[4]],
            )
        elif kind == "policy":
            policies = POLICIES[act[1]]
            h.do(PolicyChanged({name: policies.get(name, ModelPolicy()) for name, _ in MODELS}))
        elif kind == "cancel":
            pending = [r for r in h.arrived if r not in h.outcome and r not in h.cancelled_waiting]
            rid = _pick(pending + list(h.granted), act[1])
            if rid is not None:
                h.do(RequestCancelled(rid))
        elif kind == "finish":
            rid = _pick(h.granted, act[1])
            if rid is not None:
                h.do(RequestFinished(rid))
        elif kind == "ready":
            rid = _pick(_loading(h), act[1])
            if rid is not None and act[2]:
                # the runner reports its real use: a bit less than the estimate, as llama.cpp
                p = h.starts[rid].placement
                h.do(
                    RunnerReady(
                        rid,
                        pid=1,
                        n_ctx=2048,
                        gpu_bytes={
                            g: b * 9 // 10 for g, b in zip(p.gpus, p.gpu_bytes, strict=True)
                        },
                        cpu_bytes=p.cpu_bytes * 9 // 10,
                    )
                )
            elif rid is not None:
                h.do(RunnerReady(rid, pid=1))
        elif kind == "load_fail":
            rid = _pick(_loading(h), act[1])
            if rid is not None:
                h.do(RunnerLoadFailed(rid, "boom", oom=act[2]))
        elif kind == "crash":
            rid = _pick(_live(h) - _loading(h) - h.stop_sent, act[1])
            if rid is not None:
                h.do(RunnerExited(rid, "runner crashed"))
        elif kind == "stopped":
            rid = _pick(h.stop_sent & _live(h), act[1])
            if rid is not None:
                h.do(RunnerStopped(rid))
        elif kind == "time":
            h.tick(dt=act[1])
        elif kind == "probe":
            _probe(h, act[1] / 100)
        elif kind == "unload":
            h.do(UnloadRequested(MODELS[act[1]][0]))
        elif kind == "oom":
            rid = _pick(_live(h) - _loading(h), act[1])
            if rid is not None:
                h.do(RunnerOutOfMemory(rid))


def drain(h: Harness) -> None:
    """A perfect supervisor: loads succeed, requests finish, stops complete, time passes."""
    for _ in range(400):
        waiting = [r for r in h.arrived if r not in h.outcome and r not in h.cancelled_waiting]
        if not waiting and not h.granted:
            return
        if _loading(h):
            h.do(RunnerReady(min(_loading(h)), pid=1))
        elif h.granted:
            h.do(RequestFinished(min(h.granted)))
        elif h.stop_sent & _live(h):
            h.do(RunnerStopped(min(h.stop_sent & _live(h))))
        else:
            _probe(h)
            h.tick(dt=10.0)
    raise AssertionError(f"requests never ended: {waiting}, snapshot {h.s.snapshot()}")


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    inv=st.integers(0, len(INVENTORIES) - 1),
    max_loaded=st.sampled_from([0, 1, 2]),
    parallel=st.sampled_from([1, 2]),
    max_queue=st.sampled_from([2, 8]),
    policies=st.integers(0, len(POLICIES) - 1),
    actions=st.lists(action, min_size=5, max_size=60),
)
def test_random_event_sequences_keep_invariants(
    inv, max_loaded, parallel, max_queue, policies, actions
) -> None:
    h = Harness(
        Limits(
            max_loaded=max_loaded,
            num_parallel=parallel,
            max_queue=max_queue,
            default_keep_alive=300.0,
            priority_aging=10.0,
            replica_after=0.0,
            replica_keep_alive=5.0,
        ),
        inv=INVENTORIES[inv],
    )
    run(h, actions, POLICIES[policies])
    drain(h)
    # every request ended exactly once (or was cancelled while queued)
    for rid in h.arrived:
        assert (rid in h.outcome) != (rid in h.cancelled_waiting), rid
        assert isinstance(h.outcome.get(rid, Grant(rid, "")), (Grant, Reject, Fail))
