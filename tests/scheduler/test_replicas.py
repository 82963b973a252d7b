"""Replicas in the pure scheduler: a busy model whose policy allows more runners gets another
one (a second GPU first) once its requests have waited; they share its requests; the extra
one expires and is evicted first; nothing is evicted to make room for one."""

from __future__ import annotations

from corral.scheduler import (
    Grant,
    Limits,
    ModelPolicy,
    RequestFinished,
    RunnerReady,
    StartRunner,
    StopRunner,
)
from tests.scheduler.sched_harness import GB, Harness, cuda, facts, inventory, only

TWO = inventory(cuda("0", 24 * GB), cuda("1", 24 * GB))
HOT = ModelPolicy(name="hot", replicas=2)
LIMITS = Limits(num_parallel=1, replica_after=1.0, replica_keep_alive=30.0)


def hot_busy(h: Harness) -> tuple[str, int]:
    """``hot`` loaded on GPU 0 with its one slot taken and one request waiting."""
    start = only(h.arrive("hot", facts(10 * GB), policy=HOT), StartRunner)
    assert not start.replica
    g = only(h.do(RunnerReady(start.runner_id, pid=1)), Grant)
    assert h.arrive("hot", facts(10 * GB), policy=HOT) == []  # waits for the slot
    return start.runner_id, g.req_id


def test_a_waiting_model_gets_a_replica_on_the_other_gpu() -> None:
    h = Harness(LIMITS, TWO)
    primary, _ = hot_busy(h)
    assert h.starts[primary].placement.gpus == ("0",)
    assert h.s.next_deadline() == h.now + 1.0  # when its request will have waited long enough
    assert h.tick(dt=0.5) == []
    start = only(h.tick(dt=0.5), StartRunner)
    assert start.replica and start.placement.gpus == ("1",) and start.parallel == 1
    assert start.options == h.starts[primary].options  # the same launch options
    g = only(h.do(RunnerReady(start.runner_id, pid=2)), Grant)  # the waiting one goes there
    assert g.runner_id == start.runner_id
    # one extra at most (replicas = 2): more waiting requests start nothing new
    h.arrive("hot", facts(10 * GB), policy=HOT)
    assert not any(isinstance(e, StartRunner) for e in h.tick(dt=5.0))


def test_requests_go_to_the_runner_with_a_free_slot() -> None:
    h = Harness(LIMITS, TWO)
    primary, a = hot_busy(h)
    replica = only(h.tick(dt=1.0), StartRunner).runner_id
    b = only(h.do(RunnerReady(replica, pid=2)), Grant).req_id
    h.do(RequestFinished(b))
    # the primary is busy, the replica free: a new request takes the fast path to the replica
    assert only(h.arrive("hot", facts(10 * GB), policy=HOT), Grant).runner_id == replica
    h.do(RequestFinished(a))
    assert only(h.arrive("hot", facts(10 * GB), policy=HOT), Grant).runner_id == primary


def test_the_extra_replica_expires_first() -> None:
    h = Harness(LIMITS, TWO)
    primary, a = hot_busy(h)
    replica = only(h.tick(dt=1.0), StartRunner).runner_id
    b = only(h.do(RunnerReady(replica, pid=2)), Grant).req_id
    h.do(RequestFinished(a))
    h.do(RequestFinished(b))
    stop = only(h.tick(dt=31.0), StopRunner)  # replica_keep_alive, not the 5 min keep-alive
    assert (stop.runner_id, stop.reason) == (replica, "expired")
    assert h.runner(primary).state == "ready"


def test_the_replica_is_evicted_before_other_models() -> None:
    h = Harness(LIMITS, TWO)
    _, a = hot_busy(h)
    replica = only(h.tick(dt=1.0), StartRunner).runner_id
    b = only(h.do(RunnerReady(replica, pid=2)), Grant).req_id
    other = only(h.arrive("other", facts(10 * GB)), StartRunner).runner_id
    g = only(h.do(RunnerReady(other, pid=3)), Grant).req_id
    for r in (g, a, b):  # all idle; "other" was used last but the replica still goes first
        h.do(RequestFinished(r), dt=1.0)
    stop = only(h.arrive("new", facts(20 * GB)), StopRunner)
    assert stop.runner_id == replica and stop.reason == "evicted"


def test_a_replica_never_evicts() -> None:
    h = Harness(LIMITS, inventory(cuda("0", 24 * GB), cuda("1", 16 * GB)))
    # another model fills GPU 0, idle: a replica of "hot" would fit only by evicting it
    other = only(h.arrive("other", facts(22 * GB)), StartRunner)
    assert other.placement.gpus == ("0",)  # 2 GB left there, 6 GB beside "hot" on GPU 1
    g = only(h.do(RunnerReady(other.runner_id, pid=3)), Grant).req_id
    h.do(RequestFinished(g))
    primary, _ = hot_busy(h)
    assert h.starts[primary].placement.gpus == ("1",)
    effects = h.tick(dt=5.0)
    assert not any(isinstance(e, (StartRunner, StopRunner)) for e in effects)
    assert h.runner(other.runner_id).state == "ready"


def test_the_same_gpu_when_the_other_has_no_room() -> None:
    h = Harness(LIMITS, inventory(cuda("0", 24 * GB), cuda("1", 8 * GB)))
    primary, _ = hot_busy(h)
    start = only(h.tick(dt=1.0), StartRunner)
    assert start.replica and start.placement.gpus == ("0",)


def test_no_replica_without_a_policy_that_allows_one() -> None:
    h = Harness(LIMITS, TWO)
    start = only(h.arrive("hot", facts(10 * GB)), StartRunner)
    only(h.do(RunnerReady(start.runner_id, pid=1)), Grant)
    h.arrive("hot", facts(10 * GB))
    assert h.s.next_deadline() is None
    assert h.tick(dt=60.0) == []
