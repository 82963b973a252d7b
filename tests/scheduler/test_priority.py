"""Priorities, the request list, cancellation and Retry-After in the pure scheduler."""

from __future__ import annotations

from corral.scheduler import (
    Grant,
    Limits,
    ModelPolicy,
    Priority,
    Reject,
    RequestCancelled,
    RequestFinished,
    RunnerReady,
    RunnerStopped,
    StartRunner,
    StopRunner,
)
from tests.scheduler.sched_harness import GB, Harness, cuda, facts, inventory, only

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
GPU = inventory(cuda("0", 24 * GB))


def busy_runner(h: Harness, model: str = "m") -> tuple[str, int]:
    """A ready runner of ``model`` with its one slot taken: (runner id, the request in it)."""
    start = only(h.arrive(model, facts(GB)), StartRunner)
    grant = only(h.do(RunnerReady(start.runner_id, pid=1)), Grant)
    return start.runner_id, grant.req_id


def granted_in_order(h: Harness, first: int, n: int) -> list[int]:
    """Finish the request in the slot ``n`` times; the requests granted, in order."""
    order = []
    current = first
    for _ in range(n):
        g = only(h.do(RequestFinished(current), dt=0.1), Grant)
        order.append(g.req_id)
        current = g.req_id
    return order


def test_classes_in_order_fifo_within_a_class() -> None:
    h = Harness(Limits(num_parallel=1, priority_aging=1000.0), GPU)
    _, a = busy_runner(h)
    h.arrive("m", facts(GB), priority=LOW, req_id=10)
    h.arrive("m", facts(GB), priority=NORMAL, req_id=11)
    h.arrive("m", facts(GB), priority=HIGH, req_id=12)
    h.arrive("m", facts(GB), priority=LOW, req_id=13)
    h.arrive("m", facts(GB), priority=HIGH, req_id=14)
    h.arrive("m", facts(GB), req_id=15)  # no header: the model's policy, else normal
    assert granted_in_order(h, a, 6) == [12, 14, 11, 15, 10, 13]


def test_the_policy_gives_the_class_when_the_request_names_none() -> None:
    h = Harness(Limits(num_parallel=1, priority_aging=1000.0), GPU)
    _, a = busy_runner(h)
    low = ModelPolicy(priority=LOW)
    h.arrive("m", facts(GB), policy=low, req_id=10)
    h.arrive("m", facts(GB), req_id=11)
    h.arrive("m", facts(GB), policy=low, priority=HIGH, req_id=12)  # the header wins
    assert granted_in_order(h, a, 3) == [12, 11, 10]


def test_aging_bound_a_low_request_is_never_starved() -> None:
    """Aging 30 s per class: a low request ranks with the high ones after 60 s of waiting and
    then goes before every high request that arrived after it."""
    h = Harness(Limits(num_parallel=1, priority_aging=30.0), GPU)
    _, slot = busy_runner(h)
    h.arrive("m", facts(GB), priority=LOW, req_id=100)
    t0 = h.now
    nxt = 1000
    # A stream of high requests, one a second, each served in a second: the low one waits.
    for _ in range(59):
        nxt += 1
        h.arrive("m", facts(GB), priority=HIGH, req_id=nxt, dt=0.5)
        g = only(h.do(RequestFinished(slot), dt=0.5), Grant)
        assert g.req_id != 100
        slot = g.req_id
    # 60 s: aged to high, and older than every high one waiting: next.
    nxt += 1
    h.arrive("m", facts(GB), priority=HIGH, req_id=nxt, dt=0.5)
    g = only(h.do(RequestFinished(slot), dt=0.6), Grant)
    assert g.req_id == 100
    assert h.now - t0 <= 2 * 30.0 + 1.1  # 2 classes x aging + one service time


def test_models_are_served_by_their_head_requests_class() -> None:
    """Loads too go by class: with one loaded-model slot, the high model loads first."""
    h = Harness(Limits(max_loaded=1, priority_aging=1000.0), GPU)
    rid, a = busy_runner(h, "x")
    h.arrive("low", facts(GB), priority=LOW, req_id=10)
    h.arrive("high", facts(GB), priority=HIGH, req_id=11)
    assert only(h.do(RequestFinished(a)), StopRunner).runner_id == rid
    start = only(h.do(RunnerStopped(rid), dt=6.0), StartRunner)
    assert start.model_key == "high"


def idle_pair(h: Harness) -> dict[str, str]:
    """ "chat" (high) loaded and used first, "batch" (low) after it: both idle, "chat" has the
    sooner keep-alive deadline. Runner ids by model."""
    ids = {}
    for model, prio in (("chat", HIGH), ("batch", LOW)):
        s = only(h.arrive(model, facts(10 * GB), policy=ModelPolicy(priority=prio)), StartRunner)
        g = only(h.do(RunnerReady(s.runner_id, pid=1)), Grant)
        h.do(RequestFinished(g.req_id), dt=1.0)
        ids[model] = s.runner_id
    return ids


def test_high_request_evicts_an_idle_lower_priority_model_first() -> None:
    h = Harness(Limits(priority_aging=1000.0), GPU)
    ids = idle_pair(h)
    assert (
        only(h.arrive("new", facts(8 * GB), priority=HIGH), StopRunner).runner_id == (ids["batch"])
    )
    # a low request has nobody below it: the sooner deadline goes, as without priorities
    h2 = Harness(Limits(priority_aging=1000.0), GPU)
    ids2 = idle_pair(h2)
    assert (
        only(h2.arrive("new", facts(8 * GB), priority=LOW), StopRunner).runner_id == (ids2["chat"])
    )


def test_cancel_frees_the_slot_at_once() -> None:
    h = Harness(Limits(num_parallel=1), GPU)
    rid, a = busy_runner(h)
    h.arrive("m", facts(GB), req_id=10)
    assert h.do(RequestCancelled(a)) == [Grant(10, rid)]  # same dispatch: the next one runs


def test_cancel_while_waiting_leaves_the_queue() -> None:
    h = Harness(Limits(num_parallel=1), GPU)
    rid, a = busy_runner(h)
    h.arrive("m", facts(GB), req_id=10)
    h.arrive("m", facts(GB), req_id=11)
    assert h.do(RequestCancelled(10)) == []
    assert [v.req_id for v in h.s.requests(h.now) if v.state == "waiting"] == [11]
    assert h.do(RequestFinished(a)) == [Grant(11, rid)]


def test_request_list_states_positions_and_waits() -> None:
    h = Harness(Limits(num_parallel=1, priority_aging=1000.0), GPU)
    rid, a = busy_runner(h)
    h.arrive("m", facts(GB), priority=LOW, req_id=10, dt=1.0)
    h.arrive("m", facts(GB), priority=HIGH, req_id=11, dt=1.0)
    start = only(h.arrive("n", facts(GB), req_id=12, dt=1.0), StartRunner)
    views = {v.req_id: v for v in h.s.requests(h.now + 2.0)}
    assert (views[a].state, views[a].position, views[a].runner_id) == ("running", 0, rid)
    assert (views[11].state, views[11].position, views[11].priority) == ("waiting", 1, HIGH)
    assert (views[10].state, views[10].position, views[10].waited) == ("waiting", 2, 4.0)
    assert (views[12].state, views[12].position) == ("loading", 1)
    assert start.model_key == "n"
    assert h.s.snapshot().waiting_classes == {"m": (1, 0, 1), "n": (0, 1, 0)}


def test_retry_after_from_the_drain_rate() -> None:
    h = Harness(Limits(num_parallel=1, max_queue=4), GPU)
    rid, slot = busy_runner(h)
    for i in range(4):
        h.arrive("m", facts(GB), req_id=10 + i)
    # one grant every 2 s
    for _ in range(4):
        g = only(h.do(RequestFinished(slot), dt=2.0), Grant)
        slot = g.req_id
        h.arrive("m", facts(GB))
    rej = only(h.arrive("m", facts(GB)), Reject)
    # 5 grants over the last 8 s (the first at t0, four more every 2 s): 0.625/s; 4 waiting
    assert rej.retry_after == 7.0


def test_retry_after_for_a_models_own_limit() -> None:
    h = Harness(Limits(num_parallel=1), GPU)
    pol = ModelPolicy(max_queue=1)
    start = only(h.arrive("m", facts(GB), policy=pol), StartRunner)
    rej = only(h.arrive("m", facts(GB), policy=pol), Reject)
    assert rej.retry_after == 5.0  # nothing drained yet
    assert start.runner_id
