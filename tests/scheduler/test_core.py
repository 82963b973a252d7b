"""corral's own scheduler guarantees beyond Ollama's catalogue (issue 2 item 3): the queue limit
counts every waiting request, no head-of-line blocking across models, shared loads, the
``expiring`` state, crashes, keep-alive, host RAM, memory reclaim, shutdown, snapshots."""

from __future__ import annotations

import math

import pytest

from corral.scheduler import (
    QUEUE_FULL_MESSAGE,
    SHUTTING_DOWN_MESSAGE,
    Abort,
    Fail,
    Grant,
    InventoryUpdated,
    Limits,
    Refusal,
    Reject,
    RequestCancelled,
    RequestFinished,
    RunnerExited,
    RunnerOptions,
    RunnerReady,
    RunnerStopped,
    Scheduler,
    Shutdown,
    StartRunner,
    StopReason,
    StopRunner,
    Tick,
)
from tests.scheduler.sched_harness import GB, Harness, cuda, facts, inventory, kinds, metal, only

GPU24 = inventory(cuda("0", 24 * GB), host_total=64 * GB, host_free=60 * GB)


def start_ready(h: Harness, model: str, size: int = 1 * GB, **kw) -> tuple[str, int]:
    eff = h.arrive(model, facts(size), **kw)
    s = only(eff, StartRunner)
    req = h._next_req
    assert Grant(req, s.runner_id) in h.do(RunnerReady(s.runner_id, pid=1))
    return s.runner_id, req


def test_max_queue_counts_requests_waiting_for_a_slot_on_a_loaded_model() -> None:
    """Ollama #7758: requests to a loaded model bypassed OLLAMA_MAX_QUEUE. Here they count."""
    h = Harness(Limits(max_queue=2, num_parallel=1), inv=GPU24)
    rid, a = start_ready(h, "m")
    assert h.arrive("m", facts(1 * GB)) == []  # waits for the slot
    assert h.arrive("m", facts(1 * GB)) == []
    # Retry-After: one grant just now, two waiting -> 1 s (the floor)
    assert h.arrive("m", facts(1 * GB)) == [Reject(4, Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, 1.0)]
    assert h.arrive("other", facts(1 * GB)) == [
        Reject(5, Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, 1.0)
    ]
    assert h.do(RequestFinished(a)) == [Grant(2, rid)]
    assert h.s.snapshot().queued == 1


def test_cancelled_while_queued_leaves_the_queue_and_is_counted_nowhere() -> None:
    h = Harness(Limits(max_queue=1, num_parallel=1), inv=GPU24)
    rid, a = start_ready(h, "m")
    h.arrive("m", facts(1 * GB))
    assert h.do(RequestCancelled(2)) == []
    assert h.s.snapshot().queued == 0
    assert h.arrive("m", facts(1 * GB)) == []  # room again
    assert h.do(RequestFinished(a)) == [Grant(3, rid)]  # 2 never gets anything
    assert 2 not in h.outcome


def test_cancel_of_a_granted_request_releases_its_slot() -> None:
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    rid, a = start_ready(h, "m")
    h.arrive("m", facts(1 * GB))
    assert h.do(RequestCancelled(a)) == [Grant(2, rid)]


def test_no_head_of_line_blocking_across_models() -> None:
    h = Harness(Limits(num_parallel=2), inv=GPU24)
    rb, b = start_ready(h, "b")
    start_a = only(h.arrive("a", facts(2 * GB)), StartRunner)  # a loads...
    assert h.arrive("b", facts(1 * GB)) == [Grant(3, rb)]  # ...b is served meanwhile
    start_c = only(h.arrive("c", facts(2 * GB)), StartRunner)  # and c loads at the same time
    assert {r.state for r in h.s.snapshot().runners if r.runner_id != rb} == {"loading"}
    assert h.do(RunnerReady(start_c.runner_id)) == [Grant(4, start_c.runner_id)]
    assert h.do(RunnerReady(start_a.runner_id)) == [Grant(2, start_a.runner_id)]


def test_loaded_model_requests_are_not_held_up_by_a_model_waiting_for_eviction() -> None:
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    rb, b = start_ready(h, "b", 16 * GB)
    assert h.arrive("big", facts(20 * GB)) == []  # needs b gone; b is busy -> expiring
    assert h.runner(rb).state == "expiring"
    assert h.arrive("b", facts(16 * GB)) == []  # b is expiring: its requests queue behind
    assert h.s.snapshot().waiting == {"big": 1, "b": 1}
    # a loaded model with a free slot is served at once, whatever waits elsewhere
    h2 = Harness(Limits(num_parallel=2), inv=GPU24)
    rb2, _ = start_ready(h2, "b", 16 * GB)
    rl, _ = start_ready(h2, "l", 1 * GB)
    assert h2.arrive("big", facts(20 * GB)) == []
    assert h2.arrive("l", facts(1 * GB)) == [Grant(4, rl)]


def test_models_waiting_for_the_same_memory_go_by_their_oldest_request() -> None:
    """a started waiting first, but the request that made it wait was cancelled: c's request
    is now older than any of a's, so c loads first when the memory frees (decision 2: models by
    their next requests' ranks, not by when they started waiting)."""
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    rx, x = start_ready(h, "x", 20 * GB)
    a1 = h._next_req + 1
    assert h.arrive("a", facts(15 * GB), dt=1.0) == []  # needs x gone; x is busy
    assert h.arrive("c", facts(15 * GB), dt=1.0) == []  # only one of a and c fits
    assert h.arrive("a", facts(15 * GB), dt=1.0) == []
    assert h.do(RequestCancelled(a1), dt=1.0) == []
    assert h.s.snapshot().waiting == {"a": 1, "c": 1}
    assert h.do(RequestFinished(x)) == [StopRunner(rx, StopReason.EVICTED)]
    h.do(RunnerStopped(rx))
    start = only(h.do(InventoryUpdated(GPU24)), StartRunner)  # x's memory is seen free
    assert start.model_key == "c"


def test_two_requests_for_one_unloaded_model_share_one_load() -> None:
    h = Harness(Limits(num_parallel=2), inv=GPU24)
    eff1 = h.arrive("m", facts(1 * GB))
    eff2 = h.arrive("m", facts(1 * GB))
    s = only(eff1, StartRunner)
    assert eff2 == []
    assert h.do(RunnerReady(s.runner_id)) == [Grant(1, s.runner_id), Grant(2, s.runner_id)]


def test_waiters_beyond_parallel_wait_for_a_slot_of_the_shared_load() -> None:
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    h.arrive("m", facts(1 * GB))
    assert h.do(RunnerReady(s.runner_id)) == [Grant(1, s.runner_id)]
    assert h.do(RequestFinished(1)) == [Grant(2, s.runner_id)]


def test_expiring_victim_is_never_revived() -> None:
    """Ollama #17408: a request to the eviction victim restored its keep-alive and the pending
    load waited forever. Here the victim takes no new grant; its requests queue behind."""
    h = Harness(Limits(num_parallel=2), inv=GPU24)
    rv, a = start_ready(h, "victim", 16 * GB)
    assert h.arrive("big", facts(20 * GB)) == []
    assert h.runner(rv).state == "expiring"
    assert h.arrive("victim", facts(16 * GB), keep_alive=math.inf) == []  # no grant, no revive
    assert h.do(RequestFinished(a)) == [StopRunner(rv, "evicted")]
    h.do(RunnerStopped(rv))
    eff = h.do(InventoryUpdated(GPU24))
    big = only(eff, StartRunner)
    assert big.model_key == "big"
    h.do(RunnerReady(big.runner_id))
    assert h.outcome[2] == Grant(2, big.runner_id)
    h.do(RequestFinished(2))
    # the victim's model reloads afterwards (evicting the idle big model)
    assert StopRunner(big.runner_id, "evicted") in h.effects


def test_busy_runner_is_never_stopped() -> None:
    h = Harness(Limits(num_parallel=1, max_loaded=1), inv=GPU24)
    ra, a = start_ready(h, "a")
    assert h.arrive("b", facts(1 * GB)) == []  # needs the only slot: a is busy
    assert h.runner(ra).state == "expiring"
    assert h.tick(dt=10_000) == []
    assert h.do(RequestFinished(a)) == [StopRunner(ra, "evicted")]


def test_crash_aborts_in_flight_requests_and_next_request_reloads() -> None:
    h = Harness(Limits(num_parallel=2), inv=GPU24)
    rid, a = start_ready(h, "m")
    h.arrive("m", facts(1 * GB))
    assert h.outcome[2] == Grant(2, rid)
    eff = h.do(RunnerExited(rid, "llama runner process has terminated: signal: killed"))
    assert eff == [
        Abort(1, rid, "llama runner process has terminated: signal: killed"),
        Abort(2, rid, "llama runner process has terminated: signal: killed"),
    ]
    assert h.do(RequestFinished(1)) == []  # late release: ignored
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    assert s.runner_id != rid


def test_exit_while_loading_fails_the_waiters() -> None:
    h = Harness(inv=GPU24)
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    h.arrive("m", facts(1 * GB))
    eff = h.do(RunnerExited(s.runner_id, "error loading model: bad magic"))
    assert eff == [
        Fail(1, Refusal.LOAD_FAILED, "error loading model: bad magic"),
        Fail(2, Refusal.LOAD_FAILED, "error loading model: bad magic"),
    ]


def test_load_failure_keeps_waiters_with_other_options() -> None:
    h = Harness(inv=GPU24)
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=8192))
    eff = h.do(RunnerExited(s.runner_id, "boom"))
    assert eff[0] == Fail(1, Refusal.LOAD_FAILED, "boom")
    assert only(eff, StartRunner).options.num_ctx == 8192


def test_keep_alive_is_sticky_and_defaults_to_the_limit() -> None:
    h = Harness(Limits(default_keep_alive=300.0), inv=GPU24)
    rid, a = start_ready(h, "m")
    h.do(RequestFinished(a))
    assert h.s.next_deadline() == pytest.approx(h.now + 300.0)
    h.arrive("m", facts(1 * GB), keep_alive=10.0)
    h.do(RequestFinished(2))
    assert h.s.next_deadline() == pytest.approx(h.now + 10.0)
    h.arrive("m", facts(1 * GB))  # no keep_alive: the last one sticks
    h.do(RequestFinished(3))
    assert h.runner(rid).deadline == pytest.approx(h.now + 10.0)
    assert h.tick(dt=9.9) == []
    assert h.tick(dt=0.1) == [StopRunner(rid, "expired")]


def test_keep_alive_forever_has_no_deadline_and_zero_unloads_when_idle() -> None:
    h = Harness(inv=GPU24)
    rid, a = start_ready(h, "m", keep_alive=math.inf)
    h.do(RequestFinished(a))
    assert h.s.next_deadline() is None and h.runner(rid).deadline is None
    assert h.tick(dt=1e9) == []
    h.arrive("m", facts(1 * GB), keep_alive=0.0)
    assert h.do(RequestFinished(2)) == [StopRunner(rid, "expired")]


def test_cpu_only_model_must_fit_host_ram() -> None:
    h = Harness(inv=inventory(host_total=16 * GB, host_free=12 * GB))
    eff = h.arrive("huge", facts(20 * GB))
    assert eff == [
        Fail(
            1,
            Refusal.TOO_LARGE,
            "model requires more system memory (18.6 GiB) than is available (11.2 GiB)",
        )
    ]


def test_cpu_only_host_ram_is_not_double_counted() -> None:
    """Host usable = min(measured free, total - our reservations): a loaded CPU model is not
    counted twice when the probe already sees it, nor missed when the probe does not."""
    inv = inventory(host_total=32 * GB, host_free=30 * GB)
    h = Harness(inv=inv)
    ra, a = start_ready(h, "a", 12 * GB)
    h.do(RequestFinished(a))
    # probe has not seen a's memory: free 30, total - reserved = 20 -> 20 usable: b (12) fits
    rb, b = start_ready(h, "b", 12 * GB)
    h.do(RequestFinished(b))
    # probe sees both (free 6): c (5 GB) fits in min(6, 32 - 24 = 8)
    h.do(InventoryUpdated(inventory(host_total=32 * GB, host_free=6 * GB)))
    assert kinds(h.arrive("c", facts(5 * GB))) == ["StartRunner"]
    # d (8 GB) does not: 1 GB left -> evict the least recently used idle runner
    assert h.arrive("d", facts(8 * GB)) == [StopRunner(ra, "evicted")]


def test_gpu_memory_is_reserved_until_seen_back_or_deadline() -> None:
    h = Harness(Limits(reclaim_timeout=5.0), inv=inventory(cuda("0", 10 * GB)))
    ra, a = start_ready(h, "a", 8 * GB)
    h.do(InventoryUpdated(inventory(cuda("0", 10 * GB, 2 * GB))))  # probe sees it
    h.do(RequestFinished(a))
    assert h.arrive("b", facts(8 * GB)) == [StopRunner(ra, "evicted")]
    assert h.do(RunnerStopped(ra)) == []  # not yet: memory still reserved
    assert h.s.snapshot().reclaiming == (ra,)
    assert h.do(InventoryUpdated(inventory(cuda("0", 10 * GB, 3 * GB)))) == []  # 1 of 8 back
    eff = h.do(InventoryUpdated(inventory(cuda("0", 10 * GB, 9 * GB))))  # 7 of 8 back
    assert kinds(eff) == ["StartRunner"]
    # the deadline path
    h2 = Harness(Limits(reclaim_timeout=5.0), inv=inventory(cuda("0", 10 * GB)))
    ra, a = start_ready(h2, "a", 8 * GB)
    h2.do(InventoryUpdated(inventory(cuda("0", 10 * GB, 2 * GB))))
    h2.do(RequestFinished(a))
    h2.arrive("b", facts(8 * GB))
    h2.do(RunnerStopped(ra))
    assert h2.s.next_deadline() == pytest.approx(h2.now + 5.0)
    assert h2.tick(dt=4.9) == []
    assert kinds(h2.tick(dt=0.1)) == ["StartRunner"]  # the reservation is dropped
    assert h2.s.snapshot().reclaiming == ()


def test_embedding_only_model_gets_one_slot() -> None:
    h = Harness(Limits(num_parallel=4), inv=GPU24)
    s = only(h.arrive("emb", facts(1 * GB, is_embedding_model=True), embedding=True), StartRunner)
    assert s.parallel == 1
    s = only(h.arrive("chat", facts(1 * GB)), StartRunner)
    assert s.parallel == 4


def test_partial_offload_only_when_nothing_else_is_loaded() -> None:
    h = Harness(inv=GPU24)
    ra, a = start_ready(h, "small", 1 * GB)
    h.do(RequestFinished(a))
    assert h.arrive("huge", facts(30 * GB, blocks=30)) == [StopRunner(ra, "evicted")]
    h.do(RunnerStopped(ra))
    eff = h.do(InventoryUpdated(GPU24))
    s = only(eff, StartRunner)
    p = s.placement
    assert 0 < p.n_gpu_layers < 31 and p.cpu_bytes > 0 and p.gpus == ("0",)
    assert p.vram <= 24 * GB


def test_shutdown_fails_queued_and_rejects_new_requests() -> None:
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    rid, a = start_ready(h, "m")
    h.arrive("m", facts(1 * GB))
    eff = h.do(Shutdown())
    assert eff == [Fail(2, Refusal.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)]
    assert h.arrive("m", facts(1 * GB)) == [Reject(3, Refusal.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)]
    assert h.do(RequestFinished(a)) == [StopRunner(rid, "shutdown")]


def test_snapshot_states_and_deadlines() -> None:
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    s = only(h.arrive("m", facts(1 * GB)), StartRunner)
    assert h.runner(s.runner_id).state == "loading"
    h.do(RunnerReady(s.runner_id, pid=4242, n_ctx=2048))
    r = h.runner(s.runner_id)
    assert (r.state, r.pid, r.in_flight, r.deadline, r.context_length) == (
        "ready",
        4242,
        1,
        None,
        2048,
    )
    h.arrive("m", facts(1 * GB))
    assert h.runner(s.runner_id).queued == 1
    h.do(Shutdown())
    assert h.runner(s.runner_id).state == "expiring"
    h.do(RequestFinished(1))
    assert h.runner(s.runner_id).state == "stopping"
    snap = h.s.snapshot()
    assert snap.in_flight == 0 and snap.queued == 0


def test_ready_report_replaces_the_estimate_in_the_ledger() -> None:
    h = Harness(inv=inventory(cuda("0", 24 * GB), cuda("1", 24 * GB)))
    s = only(h.arrive("m", facts(4 * GB)), StartRunner)
    h.do(RunnerReady(s.runner_id, gpu_bytes={s.placement.gpus[0]: 5 * GB}, cpu_bytes=123))
    r = h.runner(s.runner_id)
    assert r.placement.gpu_bytes == (5 * GB,) and r.placement.cpu_bytes == 123
    assert sum(g.reserved for g in h.s.snapshot().gpus) == 5 * GB


def test_reload_keeps_later_waiters_in_order() -> None:
    """FIFO per model: a request whose options differ reloads; the next one, with the first
    options again, reloads again (Ollama's thrash on alternating options, #7773) - but runners
    that still serve requests are never cut short, and with free memory loads go side by side."""
    h = Harness(Limits(num_parallel=1), inv=GPU24)
    rid, a = start_ready(h, "m")
    h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=8192))  # 2: needs a reload
    h.arrive("m", facts(1 * GB))  # 3: would fit the old runner but waits behind 2
    assert h.runner(rid).state == "expiring"
    new = [e for e in h.effects if isinstance(e, StartRunner) and e.runner_id != rid]
    assert len(new) == 1 and new[0].options.num_ctx == 8192  # loads beside: memory is free
    eff = h.do(RunnerReady(new[0].runner_id))
    assert eff[0] == Grant(2, new[0].runner_id)
    third = only(eff, StartRunner)
    assert third.options.num_ctx == 4096 and h.runner(new[0].runner_id).state == "expiring"
    assert h.do(RequestFinished(a)) == [StopRunner(rid, "reload")]
    assert h.do(RunnerReady(third.runner_id)) == [Grant(3, third.runner_id)]
    assert h.do(RequestFinished(2)) == [StopRunner(new[0].runner_id, "reload")]


def test_explicit_num_gpu_layers() -> None:
    h = Harness(inv=GPU24)
    s = only(h.arrive("m", facts(10 * GB, blocks=10), RunnerOptions(num_gpu=4)), StartRunner)
    assert s.placement.n_gpu_layers == 4
    assert s.placement.vram == 4 * GB and s.placement.cpu_bytes == 6 * GB


def test_max_loaded_auto_is_three_per_gpu() -> None:
    assert Scheduler(Limits(), inventory()).snapshot().max_loaded == 3
    two = inventory(cuda("0", GB), cuda("1", GB))
    assert Scheduler(Limits(), two).snapshot().max_loaded == 6
    assert Scheduler(Limits(max_loaded=2), two).snapshot().max_loaded == 2


def test_unknown_event_is_a_type_error() -> None:
    s = Scheduler(Limits(), inventory(metal()))
    with pytest.raises(TypeError):
        s.dispatch(object(), 0.0)  # type: ignore[arg-type]


def test_duplicate_request_id_is_ignored() -> None:
    h = Harness(inv=GPU24)
    s = only(h.arrive("m", facts(1 * GB), req_id=7), StartRunner)
    assert s.model_key == "m"
    assert h.s.dispatch(type(h.arrived[7])(7, "x", facts(1 * GB), RunnerOptions()), h.now) == []


def test_tick_without_anything_pending() -> None:
    h = Harness(inv=GPU24)
    assert h.do(Tick()) == []


def test_automatic_batch_with_flash_attention_off_on_a_small_cuda_gpu() -> None:
    h = Harness(inv=inventory(cuda("0", 6 * (1 << 30)), host_total=64 * GB, host_free=60 * GB))
    opts = RunnerOptions(num_ctx=16384, num_batch_auto=True, flash_attention=False)
    s = only(h.arrive("m", facts(1 * GB), opts), StartRunner)
    assert s.options.num_batch == 256
    h = Harness(inv=GPU24)
    s = only(
        h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=16384, num_batch_auto=True)), StartRunner
    )
    assert s.options.num_batch == 1024


def test_model_that_must_load_alone_is_not_starved_by_other_loads() -> None:
    """Found by the hypothesis run: a model too big for the GPU evicted a small model, the small
    model's next request loaded it again on CPU, and so on for ever. A model that can only load
    partially claims everything until it has loaded."""
    inv = inventory(metal(total=24 * GB, free=24 * GB), host_total=64 * GB, host_free=60 * GB)
    h = Harness(inv=inv)
    ra, a = start_ready(h, "small", 4 * GB)
    h.do(RequestFinished(a))
    assert h.arrive("huge", facts(30 * GB, blocks=30)) == [StopRunner(ra, "evicted")]
    assert h.arrive("small", facts(4 * GB), RunnerOptions(num_gpu=0)) == []  # must wait
    assert h.do(RunnerStopped(ra)) == []
    huge, small = h.do(InventoryUpdated(inv))
    assert huge.model_key == "huge" and huge.placement.cpu_bytes > 0  # partial offload, alone
    assert small.model_key == "small" and small.placement.gpus == ()  # then beside it, on CPU
