"""The operator's per-model policy in the pure scheduler: slots, queue limits, GPUs and pins."""

from __future__ import annotations

import math

from corral.scheduler import (
    Fail,
    Grant,
    Limits,
    ModelPolicy,
    PolicyChanged,
    Reject,
    RequestFinished,
    RunnerReady,
    RunnerStopped,
    StartRunner,
    StopRunner,
    UnloadRequested,
)
from tests.scheduler.sched_harness import GB, Harness, cuda, facts, inventory, only

PIN = ModelPolicy(name="big", pinned=True)


def loaded(h: Harness, model: str, size: int, policy: ModelPolicy | None = None, **kw) -> str:
    """Load ``model`` with one request, finish it; the runner id."""
    start = only(h.arrive(model, facts(size), policy=policy, **kw), StartRunner)
    h.do(RunnerReady(start.runner_id, pid=1))
    grant = next(e for e in h.effects if isinstance(e, Grant) and e.runner_id == start.runner_id)
    h.do(RequestFinished(grant.req_id))
    return start.runner_id


def test_num_parallel_per_model() -> None:
    h = Harness(Limits(num_parallel=1), inventory(cuda("0", 24 * GB)))
    start = only(h.arrive("chat", facts(GB), policy=ModelPolicy(num_parallel=4)), StartRunner)
    assert start.parallel == 4
    other = only(h.arrive("batch", facts(GB)), StartRunner)
    assert other.parallel == 1  # OLLAMA_NUM_PARALLEL for models without a rule


def test_max_queue_per_model_rejects_beyond_its_own_limit() -> None:
    h = Harness(Limits(max_queue=100), inventory(cuda("0", 24 * GB)))
    pol = ModelPolicy(max_queue=2)
    h.arrive("m", facts(GB), policy=pol)
    h.arrive("m", facts(GB), policy=pol)
    assert isinstance(only(h.arrive("m", facts(GB), policy=pol), Reject), Reject)
    assert not any(isinstance(e, Reject) for e in h.arrive("other", facts(GB)))  # its own queue


def test_gpus_restrict_placement() -> None:
    h = Harness(inv=inventory(cuda("0", 24 * GB), cuda("1", 12 * GB)))
    start = only(h.arrive("m", facts(GB), policy=ModelPolicy(gpus=("1",))), StartRunner)
    assert start.placement.gpus == ("1",)
    free = only(h.arrive("n", facts(GB)), StartRunner)
    assert free.placement.gpus == ("0",)  # the most room, as without a policy


def test_pinned_is_never_evicted_and_the_unpinned_go_first() -> None:
    h = Harness(inv=inventory(cuda("0", 24 * GB)))
    pinned = loaded(h, "big", 14 * GB, PIN)
    small = loaded(h, "small", 8 * GB)
    # 8 GB more: only by evicting; the pin is older and idle, yet the unpinned runner goes.
    effects = h.arrive("new", facts(8 * GB), dt=400.0)
    assert only(effects, StopRunner).runner_id == small
    assert h.runner(pinned).state == "ready"
    h.do(RunnerStopped(small))
    start = only(h.tick(dt=6.0), StartRunner)  # once its memory is back (reclaim timeout)
    assert start.model_key == "new"


def test_pinned_never_expires_and_keeps_no_request_keep_alive() -> None:
    h = Harness(Limits(default_keep_alive=5.0), inventory(cuda("0", 24 * GB)))
    rid = loaded(h, "big", 4 * GB, PIN, keep_alive=0.0)
    assert h.runner(rid).deadline is None and math.isinf(h.runner(rid).keep_alive)
    assert not h.tick(dt=10_000.0)
    assert not h.do(UnloadRequested("big"))  # `corral stop` / keep_alive 0 leave a pin loaded
    assert h.runner(rid).state == "ready"


def test_load_that_needs_a_pin_waits_for_the_unpinned_then_fails_clearly() -> None:
    h = Harness(inv=inventory(cuda("0", 24 * GB), host_total=16 * GB, host_free=8 * GB))
    loaded(h, "big", 16 * GB, PIN)
    busy = only(h.arrive("small", facts(6 * GB)), StartRunner).runner_id
    h.do(RunnerReady(busy, pid=1))  # "small" has a request in flight
    # 20 GB: does not fit beside the pin even with "small" gone, nor partly (host too small).
    effects = h.arrive("huge", facts(20 * GB, blocks=20))
    assert not any(isinstance(e, Fail) for e in effects)  # it waits for "small" first
    assert h.runner(busy).state == "expiring"
    grant = next(e for e in h.effects if isinstance(e, Grant) and e.runner_id == busy)
    h.do(RequestFinished(grant.req_id))
    h.do(RunnerStopped(busy))
    fail = only(h.tick(dt=6.0), Fail)
    assert "beside the pinned models (big)" in fail.message
    assert h.runner(next(r for r in h.runners() if h.runner(r).pinned)).state == "ready"


def test_slots_all_held_by_pins_fail_at_once() -> None:
    h = Harness(Limits(max_loaded=1), inventory(cuda("0", 24 * GB)))
    loaded(h, "big", 4 * GB, PIN)
    fail = only(h.arrive("other", facts(GB)), Fail)
    assert "slots are held by pinned models (big)" in fail.message


def test_pins_load_beside_each_other_with_partial_offload() -> None:
    h = Harness(inv=inventory(cuda("0", 24 * GB), host_total=64 * GB, host_free=60 * GB))
    loaded(h, "big", 16 * GB, PIN)
    # 16 GB more does not fit on the GPU beside the pin: with only pins loaded it goes partly
    # to the CPU instead of waiting forever.
    start = only(h.arrive("big2", facts(16 * GB, blocks=16), policy=PIN), StartRunner)
    assert 0 < start.placement.n_gpu_layers < 17 and start.placement.cpu_bytes > 0


def test_policy_change_unpins_and_the_runner_expires() -> None:
    h = Harness(Limits(default_keep_alive=5.0), inventory(cuda("0", 24 * GB)))
    rid = loaded(h, "big", 4 * GB, PIN)
    h.do(PolicyChanged({"big": ModelPolicy(name="big")}))
    assert h.runner(rid).keep_alive == 5.0
    assert only(h.tick(dt=6.0), StopRunner).reason == "expired"


def test_policy_change_pins_a_loaded_runner() -> None:
    h = Harness(Limits(default_keep_alive=5.0), inventory(cuda("0", 24 * GB)))
    rid = loaded(h, "big", 4 * GB)
    h.do(PolicyChanged({"big": PIN}))
    assert not h.tick(dt=60.0)
    assert h.runner(rid).pinned
