"""Crash-loop backoff (scheduler decision 5), with the harness's fake clock.

A model whose runner fails on every load must not be reloaded as fast as clients retry: loads
of it are spaced by a doubling backoff (bounded loads per minute), requests in between fail at
once with the runner's last error, and other models are not affected.
"""

from __future__ import annotations

import itertools

import pytest

from corral.scheduler import (
    Fail,
    Grant,
    Limits,
    Refusal,
    RequestFinished,
    RunnerExited,
    RunnerLoadFailed,
    RunnerOptions,
    RunnerReady,
    RunnerStopped,
    StartRunner,
    UnloadRequested,
)

from .sched_harness import GB, Harness, cuda, facts, inventory, only

INV = inventory(cuda("0", 24 * GB))
ERR = "llama runner process has terminated: exit status 1: error loading model: bad tensor"


def crash_loop(
    h: Harness, model: str, seconds: float, every: float, fail_after: float
) -> list[float]:
    """A client asks for ``model`` every ``every`` s for ``seconds``; each load fails
    ``fail_after`` s after it starts. Returns the times at which loads started."""
    starts: list[float] = []
    end = h.now + seconds
    loading: tuple[str, float] | None = None
    while h.now < end:
        if loading is not None and h.now >= loading[1]:
            h.do(RunnerLoadFailed(loading[0], ERR))
            loading = None
        eff = h.arrive(model, facts(1 * GB))
        req = h._next_req
        for e in eff:
            if isinstance(e, StartRunner):
                starts.append(h.now)
                loading = (e.runner_id, h.now + fail_after)
        if loading is None:
            assert h.outcome[req] == Fail(
                req, Refusal.LOAD_FAILED, ERR
            )  # failed at once, with the last error
        h.now += every
    return starts


def test_crash_loop_loads_are_spaced_by_a_doubling_backoff() -> None:
    h = Harness(Limits(load_backoff=1.0, load_backoff_max=30.0), inv=INV)
    t0 = h.now
    starts = crash_loop(h, "bad", seconds=180.0, every=0.05, fail_after=0.1)
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(starts)]
    # 1, 2, 4, 8, 16 s after each failed start, then the 30 s cap (plus the client's 50 ms tick)
    assert gaps[:5] == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0], abs=0.051)
    assert all(g == pytest.approx(30.0, abs=0.051) for g in gaps[5:]) and len(gaps) > 7
    # bounded: at most 6 loads in any minute (the first one), 2 per minute after that
    for t in starts:
        assert sum(1 for s in starts if t <= s < t + 60.0) <= 6
    assert sum(1 for s in starts if s >= t0 + 120.0) <= 2
    # every request got exactly one outcome: ~3,600 failures, a handful of loads
    assert len(h.outcome) == len(h.arrived) and len(starts) < 12


def test_other_models_keep_serving_during_the_backoff() -> None:
    h = Harness(Limits(load_backoff=1.0), inv=INV)
    bad = only(h.arrive("bad", facts(1 * GB)), StartRunner)
    h.do(RunnerLoadFailed(bad.runner_id, ERR), dt=0.1)
    good = only(h.arrive("good", facts(1 * GB)), StartRunner)
    assert h.do(RunnerReady(good.runner_id)) == [Grant(2, good.runner_id)]
    assert h.arrive("bad", facts(1 * GB)) == [Fail(3, Refusal.LOAD_FAILED, ERR)]
    h.do(RequestFinished(2))
    assert h.arrive("good", facts(1 * GB)) == [Grant(4, good.runner_id)]


def test_backoff_ends_at_the_deadline_and_success_resets_it() -> None:
    h = Harness(Limits(load_backoff=1.0), inv=INV)
    for delay in (1.0, 2.0, 4.0):  # failures in a row: each backoff doubles
        s = only(h.arrive("m", facts(1 * GB)), StartRunner)
        start = h.now
        h.do(RunnerExited(s.runner_id, ERR), dt=0.2)  # an exit while loading counts too
        h.now = start + delay - 0.01
        assert h.arrive("m", facts(1 * GB)) == [Fail(h._next_req, Refusal.LOAD_FAILED, ERR)]
        h.now += 0.01
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    h.do(RunnerReady(s.runner_id))
    h.do(RequestFinished(h._next_req))
    h.do(UnloadRequested("m"))
    h.do(RunnerStopped(s.runner_id))
    # the success reset the count: the next failure backs off 1 s again
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    h.do(RunnerLoadFailed(s.runner_id, ERR), dt=0.1)
    assert h.arrive("m", facts(1 * GB), dt=0.85) == [Fail(h._next_req, Refusal.LOAD_FAILED, ERR)]
    assert isinstance(only(h.arrive("m", facts(1 * GB), dt=0.05), StartRunner), StartRunner)


def test_a_load_slower_than_its_backoff_is_retried_at_once() -> None:
    """A hung load killed at the stall timeout: the next request loads afresh."""
    h = Harness(Limits(load_backoff=1.0), inv=INV)
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    eff = h.do(RunnerLoadFailed(s.runner_id, "timed out waiting for llama runner to start"), dt=5)
    assert eff == [Fail(1, Refusal.LOAD_FAILED, "timed out waiting for llama runner to start")]
    s2 = only(h.arrive("m", facts(1 * GB)), StartRunner)
    assert s2.runner_id != s.runner_id


def test_backoff_applies_to_compatible_options_only_and_can_be_disabled() -> None:
    h = Harness(Limits(load_backoff=1.0), inv=INV)
    s = only(h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=2048)), StartRunner)
    h.do(RunnerLoadFailed(s.runner_id, ERR), dt=0.1)
    assert h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=2048)) == [
        Fail(2, Refusal.LOAD_FAILED, ERR)
    ]
    other = only(h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=4096)), StartRunner)
    assert other.options.num_ctx == 4096

    h = Harness(Limits(load_backoff=0.0), inv=INV)
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    h.do(RunnerLoadFailed(s.runner_id, ERR), dt=0.1)
    assert isinstance(only(h.arrive("m", facts(1 * GB)), StartRunner), StartRunner)
