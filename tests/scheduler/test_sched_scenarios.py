"""Ollama's scheduler test catalogue (shared/reference/ollama-scheduler.md §4), translated to
events and effects. One test per scenario, named after the original; where a scenario does not
apply to corral's design the test says why and checks the contract that replaces it.

Common fixture as in Ollama: one Metal GPU, 24 GB total / 12 GB free; host 32 GB / 26 GB free.
Test models have an estimate of exactly their size (no KV heads, no graph) unless stated."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from corral.scheduler import (
    QUEUE_FULL_MESSAGE,
    Fail,
    Grant,
    InventoryUpdated,
    Limits,
    ModelFacts,
    Placement,
    Refusal,
    Reject,
    RequestCancelled,
    RequestFinished,
    RunnerLoadFailed,
    RunnerOptions,
    RunnerOutOfMemory,
    RunnerReady,
    RunnerStopped,
    Scheduler,
    Shutdown,
    StartRunner,
    StopReason,
    StopRunner,
    UnloadRequested,
)
from corral.scheduler.core import needs_reload
from corral.scheduler.estimate import auto_batch, estimate
from corral.scheduler.placement import place
from tests.scheduler.sched_harness import (
    GB,
    GiB,
    Harness,
    MiB,
    cuda,
    facts,
    inventory,
    kinds,
    metal,
    only,
)

AUTO = RunnerOptions(num_ctx_auto=True, num_batch_auto=True)


def loaded(
    h: Harness,
    model: str,
    size: int = 1 * GB,
    keep_alive: float | None = None,
    options: RunnerOptions | None = None,
    f: ModelFacts | None = None,
    gpu_bytes: dict | None = None,
) -> tuple[str, int]:
    """Arrive + ready: returns (runner_id, req_id) with the request in flight."""
    eff = h.arrive(model, f or facts(size), options, keep_alive)
    start = only(eff, StartRunner)
    req_id = h._next_req
    eff = h.do(RunnerReady(start.runner_id, pid=100, gpu_bytes=gpu_bytes))
    assert Grant(req_id, start.runner_id) in eff
    return start.runner_id, req_id


# 1
def test_main_logging_not_applicable() -> None:
    """TestMain sets up debug logging. The scheduler does no logging at all (it is pure);
    importing it must not pull in the logging machinery of the daemon."""
    code = "import sys, corral.scheduler; print('structlog' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# 2
def test_sched_init() -> None:
    s = Scheduler(Limits(), inventory(metal()))
    snap = s.snapshot()
    assert snap.runners == () and snap.queued == 0 and snap.in_flight == 0
    assert s.next_deadline() is None
    assert snap.max_loaded == 3


# 3
def test_sched_load() -> None:
    h = Harness(inv=inventory())  # no GPUs
    # (a) runner creation fails -> the error reaches the request, nothing stays loaded
    start = only(h.arrive("a", facts(1 * GB)), StartRunner)
    assert start.placement.gpus == () and start.placement.n_gpu_layers == 0
    eff = h.do(RunnerLoadFailed(start.runner_id, "something failed to load model blah"))
    assert eff == [Fail(1, Refusal.LOAD_FAILED, "something failed to load model blah")]
    assert h.s.snapshot().runners == ()
    # (b) success -> granted, one runner, in flight 1
    rid, req = loaded(h, "b", 10)
    snap = h.s.snapshot()
    assert [r.runner_id for r in snap.runners] == [rid] and snap.runners[0].in_flight == 1
    # (c) second model whose load fails: error delivered, runner cleaned up
    start = only(h.arrive("c", facts(10)), StartRunner)
    eff = h.do(RunnerLoadFailed(start.runner_id, "wait failure"))
    assert eff == [Fail(h._next_req, Refusal.LOAD_FAILED, "wait failure")]
    assert set(h.runners()) == {rid}


# 4
def test_sched_load_stores_effective_context_length() -> None:
    h = Harness()
    f = facts(1 * GB, n_ctx_train=131072)
    start = only(h.arrive("a", f, msgspec.structs.replace(AUTO, num_ctx=262144)), StartRunner)
    assert start.options.num_ctx == 131072 and start.options.num_ctx_auto
    h.do(RunnerReady(start.runner_id, n_ctx=131072))
    assert h.runner(start.runner_id).context_length == 131072


# 5
def test_sched_load_stores_effective_explicit_context_length() -> None:
    h = Harness()
    f = facts(1 * GB, n_ctx_train=131072)
    start = only(h.arrive("a", f, RunnerOptions(num_ctx=262144)), StartRunner)
    assert start.options.num_ctx == 131072 and not start.options.num_ctx_auto
    h.do(RunnerReady(start.runner_id, n_ctx=131072))
    assert h.runner(start.runner_id).context_length == 131072


# 6
@pytest.mark.parametrize("auto", [True, False])
def test_sched_vision_context_floor(auto: bool) -> None:
    h = Harness()
    f = facts(1 * GB, has_vision=True)
    start = only(h.arrive("v", f, RunnerOptions(num_ctx=128, num_ctx_auto=auto)), StartRunner)
    assert start.options.num_ctx == 2048
    assert start.options.num_ctx_auto is auto


# 7
def test_sched_requests_same_model_same_request() -> None:
    h = Harness()
    rid, a = loaded(h, "m1", 1 * GB)
    h.do(RequestFinished(a))
    eff = h.arrive("m1", facts(1 * GB), keep_alive=0.0)
    assert eff == [Grant(h._next_req, rid)]
    assert h.s.snapshot().queued == 0
    # keep_alive 0: unloaded as soon as idle
    assert h.do(RequestFinished(h._next_req)) == [StopRunner(rid, "expired")]


# 8
def test_sched_requests_simple_reload_same_model() -> None:
    h = Harness(inv=inventory(metal(total=12 * GB, free=12 * GB)))
    rid, a = loaded(h, "m1", 10 * GB)
    h.do(InventoryUpdated(inventory(metal(total=12 * GB, free=2 * GB))))  # the probe sees it
    # Different load options (Ollama: adapters) -> reload once A is done.
    eff = h.arrive("m1", facts(10 * GB), RunnerOptions(num_ctx=8192))
    b = h._next_req
    assert not any(isinstance(e, StartRunner) for e in eff)  # 2 GB usable: no room alongside
    assert h.runner(rid).state == "expiring"
    assert h.do(RequestFinished(a)) == [StopRunner(rid, "reload")]
    assert h.do(RunnerStopped(rid)) == []  # memory not seen back yet: still reserved
    eff = h.do(InventoryUpdated(inventory(metal(total=12 * GB, free=12 * GB))))
    start = only(eff, StartRunner)
    assert start.options.num_ctx == 8192
    assert h.do(RunnerReady(start.runner_id)) == [Grant(b, start.runner_id)]


# 9
def test_sched_requests_multiple_loaded_models() -> None:
    h = Harness()
    ra, a = loaded(h, "a", 1 * GB)
    rb, b = loaded(h, "b", 10 * GB)  # fits alongside: 12 GB free, 11 GB reserved
    rc, c = loaded(h, "c", 10 * GB, options=RunnerOptions(num_gpu=0))  # CPU load allowed
    assert h.starts[rc].placement.gpus == ()
    assert len(h.runners()) == 3  # = auto max 3 x 1 GPU
    h.do(RequestFinished(a))
    # D (13 GB): max loaded reached -> the idle runner A is unloaded first
    eff = h.arrive("d", facts(13 * GB))
    d = h._next_req
    assert StopRunner(ra, "evicted") in eff
    h.do(RunnerStopped(ra))
    # A's memory stays reserved until the probe shows it back (here it never does: the fixture's
    # free reading is constant) or the reclaim deadline passes, as Ollama's 5 s VRAM recovery.
    assert h.s.snapshot().reclaiming == (ra,)
    assert h.s.next_deadline() == pytest.approx(h.now + 5.0)
    h.tick(dt=5.0)
    # now a slot is free but 13 GB do not fit in 12 GB -> the busy B becomes expiring
    assert h.runner(rb).state == "expiring"
    assert h.do(RequestFinished(b)) == [StopRunner(rb, "evicted")]
    h.do(RunnerStopped(rb))
    eff = h.do(InventoryUpdated(inventory(metal(free=24 * GB))))
    start = only(eff, StartRunner)
    assert h.do(RunnerReady(start.runner_id)) == [Grant(d, start.runner_id)]
    assert set(h.runners()) == {rc, start.runner_id}


# 10
def test_sched_get_runner() -> None:
    h = Harness(Limits(max_queue=1))
    eff = h.arrive("a", facts(1 * GB))
    assert kinds(eff) == ["StartRunner"]
    a_runner = eff[0].runner_id
    assert h.s.snapshot().queued == 1
    eff = h.arrive("b", facts(1 * GB))
    assert eff == [Reject(2, Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, 5.0)]  # nothing drained: 5 s
    assert QUEUE_FULL_MESSAGE == "server busy, please try again.  maximum pending requests exceeded"
    h.do(RunnerReady(a_runner))
    h.do(RequestFinished(1), dt=0.001)
    # a model that cannot load ("bad path") fails its request with the reason
    start = only(h.arrive("bad path", facts(1 * GB)), StartRunner)
    eff = h.do(RunnerLoadFailed(start.runner_id, "open bad path: no such file or directory"))
    assert eff == [Fail(3, Refusal.LOAD_FAILED, "open bad path: no such file or directory")]


# 11
def test_sched_get_runner_uses_digest_key_when_model_path_empty() -> None:
    """The model key is chosen by the daemon (blob path, else digest); different keys never
    share a runner."""
    h = Harness()
    loaded(h, "digest:sha-a", 1 * GB)
    eff = h.arrive("digest:sha-b", facts(1 * GB))
    assert kinds(eff) == ["StartRunner"]
    assert h.s.snapshot().waiting == {"digest:sha-b": 1}


# 12
def test_sched_get_runner_reuses_same_digest_when_model_path_empty() -> None:
    h = Harness(Limits(num_parallel=2))
    rid, _ = loaded(h, "digest:sha-a", 1 * GB)
    eff = h.arrive("digest:sha-a", facts(1 * GB))  # another name, same blob
    assert eff == [Grant(2, rid)] and h.s.snapshot().queued == 0


# 13
def test_sched_expire_runner() -> None:
    h = Harness()
    rid, a = loaded(h, "m", 1 * GB, keep_alive=120.0)
    assert h.do(UnloadRequested("m")) == []  # busy: lazy
    assert h.runner(rid).state == "expiring"
    assert h.do(RequestFinished(a)) == [StopRunner(rid, "unload")]
    h.do(RunnerStopped(rid))
    assert h.s.snapshot().runners == ()


# 14
def test_sched_premature_expired() -> None:
    h = Harness()
    rid, a = loaded(h, "m", 1 * GB, keep_alive=0.1)
    # spurious events while the request is active change nothing
    assert h.tick(dt=10) == []
    assert h.do(RunnerStopped("r-unknown")) == []
    assert h.runner(rid).in_flight == 1
    assert h.do(RequestFinished(a)) == []
    assert h.s.next_deadline() == pytest.approx(h.now + 0.1)
    assert h.tick(dt=0.1) == [StopRunner(rid, "expired")]
    h.do(RunnerStopped(rid))
    assert h.s.snapshot().runners == ()
    # a late finished event for the unloaded model is ignored
    assert h.do(RequestFinished(a)) == []


# 15
def test_sched_use_loaded_runner() -> None:
    h = Harness()
    rid, a = loaded(h, "m", 1 * GB)
    h.do(RequestFinished(a))
    assert h.runner(rid).in_flight == 0
    eff = h.arrive("m", facts(1 * GB), keep_alive=2e-9)
    assert eff == [Grant(2, rid)]
    r = h.runner(rid)
    assert r.in_flight == 1 and r.keep_alive == 2e-9 and r.deadline is None
    h.do(RequestFinished(2))
    assert h.runner(rid).in_flight == 0


# 16
def test_sched_update_free_space() -> None:
    g1 = cuda("0", 1000, 900)
    g2 = cuda("1", 2000, 1900)
    h = Harness(inv=inventory(g1, g2))
    f = facts(100, blocks=1)
    s1 = only(h.arrive("r1", f, RunnerOptions(num_gpu=0)), StartRunner)
    h.do(RunnerReady(s1.runner_id, gpu_bytes={"0": 50, "1": 50}))
    s2 = only(h.arrive("r2", f, RunnerOptions(num_gpu=0)), StartRunner)
    h.do(RunnerReady(s2.runner_id, gpu_bytes={"0": 125, "1": 75}))
    usable = [g.usable for g in h.s.snapshot().gpus]
    assert usable == [1000 - 175, 2000 - 125]


# 17
def test_sched_find_runner_to_unload() -> None:
    h = Harness(Limits(max_loaded=2, num_parallel=1))
    r1, a = loaded(h, "m1", 1 * GB, keep_alive=1.0)
    r2, b = loaded(h, "m2", 1 * GB, keep_alive=2.0)
    h.do(RequestFinished(b))  # r2 idle (keep-alive 2), r1 busy (keep-alive 1)
    eff = h.arrive("m3", facts(1 * GB))
    assert eff == [StopRunner(r2, "evicted")]  # the idle one
    start = only(h.do(RunnerStopped(r2)), StartRunner)
    assert start.model_key == "m3"
    h.do(RunnerReady(start.runner_id))
    # both busy now: the shortest keep-alive (r1: 1 s; m3: default 300 s) becomes expiring
    eff = h.arrive("m4", facts(1 * GB))
    assert eff == [] and h.runner(r1).state == "expiring"
    assert h.runner(start.runner_id).state == "ready"


# 18
def test_sched_needs_reload() -> None:
    """Adapters/projectors are part of the model identity the daemon passes as the model key,
    and a failed health ping is a RunnerExited event; the option rules are checked here."""
    f = facts(1 * GB)
    base = RunnerOptions(num_ctx=4096, num_batch=512, use_mmap=True)
    assert not needs_reload(base, f, base)
    assert needs_reload(base, f, msgspec.structs.replace(base, num_batch=1234))
    assert needs_reload(base, f, msgspec.structs.replace(base, num_gpu=99))
    assert not needs_reload(base, f, msgspec.structs.replace(base, num_gpu=-1))
    launched_99 = msgspec.structs.replace(base, num_gpu=99)
    assert not needs_reload(launched_99, f, base)  # a default request reuses an explicit runner
    for change in (
        {"main_gpu": 1},
        {"num_thread": 8},
        {"kv_cache_type": "q8_0"},
        {"flash_attention": True},
    ):
        assert needs_reload(base, f, msgspec.structs.replace(base, **change)), change
    assert not needs_reload(base, f, msgspec.structs.replace(base, kv_cache_type="f16"))


# 19
def test_resolve_context_shift_not_applicable() -> None:
    """Context shift is resolved by the daemon and the runner (not a launch option that can
    differ between requests for one runner in corral), so the scheduler has no such field."""
    assert "context_shift" not in RunnerOptions.__struct_fields__


# 20
def test_sched_needs_reload_ignores_automatic_num_ctx_clamp() -> None:
    f = facts(1 * GB)  # n_ctx_train unknown
    runner = RunnerOptions(num_ctx=131072, num_ctx_auto=True)
    assert not needs_reload(runner, f, RunnerOptions(num_ctx=262144, num_ctx_auto=True))
    assert needs_reload(runner, f, RunnerOptions(num_ctx=262144))


# 21
def test_sched_needs_reload_uses_effective_automatic_context_shift() -> None:
    """The context-shift half does not apply (see test 19); the num_ctx half does."""
    f = facts(1 * GB)
    runner = RunnerOptions(num_ctx=128, num_ctx_auto=True)
    assert not needs_reload(runner, f, RunnerOptions(num_ctx=262144, num_ctx_auto=True))
    assert needs_reload(runner, f, RunnerOptions(num_ctx=262144))


# 22
def test_sched_needs_reload_uses_effective_explicit_context() -> None:
    f = facts(1 * GB, n_ctx_train=2048)
    runner = RunnerOptions(num_ctx=2048)
    assert not needs_reload(runner, f, RunnerOptions(num_ctx=262144))  # clamped to 2048
    assert needs_reload(runner, f, RunnerOptions(num_ctx=1024))


# 23
def test_sched_needs_reload_ignores_automatic_num_batch_derivation() -> None:
    f = facts(1 * GB)
    runner = RunnerOptions(num_batch=1024, num_batch_auto=True)
    assert not needs_reload(runner, f, RunnerOptions(num_batch=512, num_batch_auto=True))
    assert needs_reload(runner, f, RunnerOptions(num_batch=512))


# 24
def test_sched_needs_reload_ignores_automatic_use_mmap_default() -> None:
    f = facts(1 * GB)
    auto_false = RunnerOptions(use_mmap=False, use_mmap_auto=True)
    assert not needs_reload(auto_false, f, RunnerOptions(use_mmap=None))
    assert needs_reload(auto_false, f, RunnerOptions(use_mmap=True))
    assert not needs_reload(auto_false, f, RunnerOptions(use_mmap=False))
    explicit_false = RunnerOptions(use_mmap=False)
    assert needs_reload(explicit_false, f, RunnerOptions(use_mmap=None))


# 25
@pytest.mark.parametrize(
    ("ctx", "predicted", "available", "fa_off", "small", "expect"),
    [
        (4096, 0, 0, False, False, 512),
        (32768, 0, 0, False, False, 1024),
        (131072, 8 * GiB, 14 * GiB, False, False, 2048),
        (131072, 9 * GiB, 14 * GiB, False, False, 1024),
        (131072, 8 * GiB, 11 * GiB, False, False, 1024),
        (32768, 8500 * MiB, 11 * GiB, False, False, 512),
        (32768, 0, 14 * GiB, True, False, 512),
        (131072, 0, 6 * GiB, True, True, 256),
    ],
)
def test_automatic_generation_batch(ctx, predicted, available, fa_off, small, expect) -> None:
    assert (
        auto_batch(ctx, predicted, available, flash_attention_off=fa_off, cuda_small_gpu=small)
        == expect
    )


# 26
def test_sched_unload_all_runners() -> None:
    h = Harness()
    assert h.do(Shutdown()) == []
    h = Harness()
    r1, a = loaded(h, "a", 1 * GB)
    r2, b = loaded(h, "b", 1 * GB)
    h.do(RequestFinished(a))
    eff = h.do(Shutdown())
    assert eff == [StopRunner(r1, "shutdown")]  # r2 is busy: stopped once its request ends
    assert h.do(RequestFinished(b)) == [StopRunner(r2, "shutdown")]


# 27
def test_sched_unload() -> None:
    h = Harness()
    rid, a = loaded(h, "m", 1 * GB)
    h.do(RequestFinished(a))
    assert h.do(UnloadRequested("m")) == [StopRunner(rid, "unload")]
    assert h.do(UnloadRequested("not-loaded")) == []


# 28
def test_sched_already_canceled() -> None:
    """A request cancelled while queued leaves the queue and gets no outcome. Unlike Ollama, the
    load it started continues (issue #7408: a client giving up must not abort a big load)."""
    h = Harness()
    start = only(h.arrive("m", facts(1 * GB)), StartRunner)
    assert h.do(RequestCancelled(1)) == []
    assert h.s.snapshot().queued == 0
    assert h.do(RunnerReady(start.runner_id)) == []
    assert 1 not in h.outcome


# 29
def test_sched_llama_server_evicts_when_vram_insufficient() -> None:
    h = Harness(inv=inventory(metal(total=10 * GB, free=10 * GB)))
    rid, a = loaded(h, "a", 8 * GB)
    h.do(RequestFinished(a))
    eff = h.arrive("b", facts(8 * GB))  # 2 GB usable left
    assert eff == [StopRunner(rid, "evicted")]


# 30
def test_sched_llama_server_explicit_partial_num_gpu_skips_full_fit_eviction() -> None:
    h = Harness(inv=inventory(metal(total=10 * GB, free=10 * GB)))
    rid, a = loaded(h, "a", 8 * GB)
    eff = h.arrive("b", facts(8 * GB, blocks=8), RunnerOptions(num_gpu=1))
    start = only(eff, StartRunner)
    assert start.placement.n_gpu_layers == 1 and start.options.num_gpu == 1
    assert not any(isinstance(e, StopRunner) for e in eff)


# 31
def test_sched_llama_server_fits_alongside() -> None:
    h = Harness(inv=inventory(metal(free=20 * GB)))
    loaded(h, "a", 1 * GB)
    eff = h.arrive("b", facts(100 * MiB))
    assert kinds(eff) == ["StartRunner"]


# 32
def test_sched_llama_server_prediction_uses_total_parallel_context() -> None:
    f = ModelFacts(
        architecture="test",
        file_size=0,
        block_count=1,
        n_ctx_train=65536,
        embedding_length=4096,
        head_count=32,
        head_count_kv=32,
    )
    est = estimate(f, RunnerOptions(num_ctx=32768), parallel=2)
    assert est.kv_total == 1 * GiB
    h = Harness(Limits(num_parallel=2), inv=inventory(metal(free=900 * MiB)))
    rid, a = loaded(h, "small", 10 * MiB)
    h.do(RequestFinished(a))
    eff = h.arrive("big", f, RunnerOptions(num_ctx=32768))
    assert eff == [StopRunner(rid, "evicted")]  # not spawned: evict first


# 33
@pytest.mark.parametrize(
    ("gpus", "host_free", "expect"),
    [
        ([("metal", True, 300 * GB)], 80 * GB, [80 * GB]),
        ([("vulkan", True, 12 * GB)], 6 * GB, [6 * GB]),
        ([("metal", False, 12 * GB)], 6 * GB, [12 * GB]),
        ([("cuda", False, 12 * GB)], 6 * GB, [12 * GB]),
        ([("cuda", False, 12 * GB), ("vulkan", True, 10 * GB)], 6 * GB, [12 * GB, 6 * GB]),
        ([("metal", True, 12 * GB)], 20 * GB, [12 * GB]),
    ],
)
def test_available_memory_for_load_uses_worst_shared_memory_measurement(
    gpus, host_free, expect
) -> None:
    from corral.scheduler import Gpu

    inv = inventory(
        *[
            Gpu(id=str(i), name="g", library=lib, total=free, free=free, integrated=igpu)
            for i, (lib, igpu, free) in enumerate(gpus)
        ],
        host_total=400 * GB,
        host_free=host_free,
    )
    s = Scheduler(Limits(), inv)
    assert [g.usable for g in s.snapshot().gpus] == expect


# 34
class TestSelectLlamaServerPlacement:
    def _est(self, size: int):
        return estimate(facts(size, blocks=20), RunnerOptions())

    def _rooms(self, *gpus):
        return [(g, g.free) for g in gpus]

    def test_single_gpu_with_most_room(self) -> None:
        p = place(
            self._est(8 * GB),
            RunnerOptions(),
            self._rooms(cuda("0", 10 * GB), cuda("1", 20 * GB)),
            14 * GB,
        )
        assert isinstance(p, Placement)
        assert p.gpus == ("1",) and p.main_gpu == 0 and p.split_mode == "none"

    def test_main_gpu_selects_that_device(self) -> None:
        from corral.scheduler import Gpu

        rooms = self._rooms(
            cuda("0", 16 * GB),
            Gpu(id="r0", name="R", library="rocm", total=16 * GB, free=16 * GB),
            Gpu(id="r1", name="R", library="rocm", total=16 * GB, free=16 * GB),
        )
        p = place(self._est(8 * GB), RunnerOptions(main_gpu=2), rooms, 14 * GB)
        assert p.gpus == ("r1",) and p.main_gpu == 0

    def test_discrete_before_integrated(self) -> None:
        from corral.scheduler import Gpu

        igpu = Gpu(id="0", name="i", library="metal", total=32 * GB, free=32 * GB, integrated=True)
        dgpu = Gpu(id="1", name="d", library="metal", total=16 * GB, free=16 * GB)
        p = place(self._est(12 * GB), RunnerOptions(), [(igpu, 14 * GB), (dgpu, 16 * GB)], 14 * GB)
        assert p.gpus == ("1",)
        vk = Gpu(id="0", name="i", library="vulkan", total=32 * GB, free=32 * GB, integrated=True)
        d10 = Gpu(id="1", name="d", library="vulkan", total=10 * GB, free=10 * GB)
        p = place(self._est(8 * GB), RunnerOptions(), [(vk, 32 * GB), (d10, 10 * GB)], 14 * GB)
        assert p.gpus == ("1",)

    def test_spread_uses_all_gpus_of_the_backend(self) -> None:
        p = place(
            self._est(8 * GB),
            RunnerOptions(),
            self._rooms(cuda("0", 10 * GB), cuda("1", 20 * GB)),
            14 * GB,
            spread=True,
        )
        assert set(p.gpus) == {"0", "1"} and p.split_mode == "layer"
        assert sum(p.tensor_split) == p.n_gpu_layers == 21

    def test_too_big_for_one_gpu_picks_best_backend_group(self) -> None:
        from corral.scheduler import Gpu

        rooms = self._rooms(
            cuda("0", 10 * GB),
            cuda("1", 18 * GB),
            Gpu(id="r0", name="R", library="rocm", total=12 * GB, free=12 * GB),
        )
        p = place(self._est(30 * GB), RunnerOptions(), rooms, 64 * GB, allow_partial=True)
        assert p.library == "cuda" and set(p.gpus) == {"0", "1"}
        assert p.n_gpu_layers < 21 and p.cpu_bytes > 0  # partial offload


# 35
def test_disable_mmap_default_reason() -> None:
    """Windows+CUDA does not apply (the daemon runs the scheduler on Linux/macOS)."""
    # explicit wins
    h = Harness()
    s = only(h.arrive("a", facts(1 * GB), RunnerOptions(use_mmap=True, num_gpu=0)), StartRunner)
    assert s.options.use_mmap is True and not s.options.use_mmap_auto
    # CPU-only request, and no GPUs -> "cpu"
    s = only(Harness().arrive("a", facts(1 * GB), RunnerOptions(num_gpu=0)), StartRunner)
    assert s.options.use_mmap is False and s.options.use_mmap_auto
    s = only(Harness(inv=inventory()).arrive("a", facts(1 * GB)), StartRunner)
    assert s.options.use_mmap is False
    # Metal partial offload -> off; full offload -> on
    s = only(
        Harness().arrive("a", facts(1 * GB, blocks=20), RunnerOptions(num_gpu=10)), StartRunner
    )
    assert s.options.use_mmap is False
    s = only(
        Harness().arrive("a", facts(1 * GB, blocks=20), RunnerOptions(num_gpu=21)), StartRunner
    )
    assert s.options.use_mmap is True
    # Linux CUDA full fit, plenty of host RAM -> on
    h = Harness(inv=inventory(cuda("0", 24 * GB), host_total=64 * GB, host_free=60 * GB))
    assert only(h.arrive("a", facts(1 * GB)), StartRunner).options.use_mmap is True


# 36
def test_disable_mmap_for_host_pressure() -> None:
    inv = inventory(cuda("0", 100 * GB, 80 * GB), host_total=100 * GB, host_free=50 * GB)
    h = Harness(inv=inv)
    loaded(h, "mapped", 25 * GB)
    assert h.starts["r1"].options.use_mmap is True  # 25 + 10 < 50
    s = only(h.arrive("b", facts(20 * GB)), StartRunner)
    assert s.options.use_mmap is False  # 20 + 25 + max(8, 10) = 55 > 50
    # explicit use_mmap wins
    h = Harness(inv=inv)
    loaded(h, "mapped", 25 * GB)
    s = only(h.arrive("b", facts(20 * GB), RunnerOptions(use_mmap=True)), StartRunner)
    assert s.options.use_mmap is True
    # integrated GPU: the rule does not apply
    inv_i = inventory(
        cuda("0", 100 * GB, 80 * GB, integrated=True), host_total=100 * GB, host_free=50 * GB
    )
    s = only(Harness(inv=inv_i).arrive("b", facts(20 * GB)), StartRunner)
    assert s.options.use_mmap is True


# 37
def test_sched_load_crash_triggers_evict_all_and_retry() -> None:
    h = Harness()
    other, a = loaded(h, "other", 1 * GB)
    h.do(RequestFinished(a))
    start = only(h.arrive("m", facts(1 * GB)), StartRunner)
    b = h._next_req
    eff = h.do(RunnerLoadFailed(start.runner_id, "cudaMalloc failed: out of memory"))
    assert eff == [StopRunner(other, "evicted")]  # no error yet: evict all, then retry
    h.do(RunnerStopped(other))
    retry = only(h.do(InventoryUpdated(inventory(metal(free=13 * GB)))), StartRunner)
    assert retry.model_key == "m" and retry.runner_id != start.runner_id
    eff = h.do(RunnerLoadFailed(retry.runner_id, "cudaMalloc failed: out of memory"))
    assert eff == [Fail(b, Refusal.LOAD_FAILED, "cudaMalloc failed: out of memory")]


# 38
def test_sched_load_oom_reduces_automatic_context_before_retry() -> None:
    h = Harness()
    other, a = loaded(h, "other", 1 * GB)
    h.do(RequestFinished(a))
    f = facts(1 * GB, n_ctx_train=131072)
    first = only(h.arrive("m", f, msgspec.structs.replace(AUTO, num_ctx=262144)), StartRunner)
    assert (first.options.num_ctx, first.options.num_batch) == (131072, 2048)
    b = h._next_req
    eff = h.do(RunnerLoadFailed(first.runner_id, "out of memory", oom=True))
    assert eff == [StopRunner(other, "evicted")]
    h.do(RunnerStopped(other))
    eff = h.do(InventoryUpdated(inventory(metal(free=13 * GB))))
    second = only(eff, StartRunner)
    assert (second.options.num_ctx, second.options.num_batch) == (32768, 1024)
    eff = h.do(RunnerLoadFailed(second.runner_id, "out of memory", oom=True))
    assert eff == [Fail(b, Refusal.LOAD_FAILED, "out of memory")]


# 39
def test_sched_load_oom_keeps_explicit_context_before_retry() -> None:
    h = Harness()
    other, a = loaded(h, "other", 1 * GB)
    h.do(RequestFinished(a))
    first = only(h.arrive("m", facts(1 * GB), RunnerOptions(num_ctx=262144)), StartRunner)
    eff = h.do(RunnerLoadFailed(first.runner_id, "out of memory"))
    assert eff == [StopRunner(other, "evicted")]
    h.do(RunnerStopped(other))
    second = only(h.do(InventoryUpdated(inventory(metal(free=13 * GB)))), StartRunner)
    assert second.options.num_ctx == 262144


# 40
def test_sched_first_load_oom_reduces_automatic_context_and_retries() -> None:
    h = Harness()
    first = only(
        h.arrive("m", facts(1 * GB), msgspec.structs.replace(AUTO, num_ctx=262144)), StartRunner
    )
    eff = h.do(
        RunnerLoadFailed(
            first.runner_id,
            "ggml_backend_cuda_buffer_type_alloc_buffer: "
            "allocating 20.00 MiB on device 0: "
            "cudaMalloc failed: out of memory",
        )
    )
    second = only(eff, StartRunner)  # nothing to evict: retried at once
    assert [first.options.num_ctx, second.options.num_ctx] == [262144, 32768]
    eff = h.do(RunnerReady(second.runner_id))
    assert eff == [Grant(1, second.runner_id)]
    assert h.runner(second.runner_id).context_length == 32768


# 41
def test_sched_load_crash_no_other_models_fails_fast() -> None:
    h = Harness()
    start = only(h.arrive("m", facts(1 * GB)), StartRunner)
    eff = h.do(RunnerLoadFailed(start.runner_id, "simulated llama-server OOM crash"))
    assert eff == [Fail(1, Refusal.LOAD_FAILED, "simulated llama-server OOM crash")]


# 42
def test_sched_load_non_oom_with_other_models_fails_fast() -> None:
    h = Harness()
    other, a = loaded(h, "other", 1 * GB)
    h.do(RequestFinished(a))
    start = only(h.arrive("m", facts(1 * GB)), StartRunner)
    eff = h.do(RunnerLoadFailed(start.runner_id, "server parse failed"))
    assert eff == [Fail(2, Refusal.LOAD_FAILED, "server parse failed")]
    assert h.runner(other).state == "ready"


# 43
def test_sched_runtime_oom_unloads_loaded_runners() -> None:
    """Ollama expires every runner after a runtime OOM; the stop says why (decision
    oom_unload in the supervisor's log), and a later keep-alive makes it a plain expiry."""
    h = Harness()
    r1, a = loaded(h, "a", 1 * GB, keep_alive=3600.0)
    r2, b = loaded(h, "b", 1 * GB, keep_alive=3600.0)
    h.do(RequestFinished(a))
    eff = h.do(RunnerOutOfMemory(r2))
    assert eff == [StopRunner(r1, StopReason.OUT_OF_MEMORY)]  # idle: now
    assert h.do(RequestFinished(b)) == [StopRunner(r2, StopReason.OUT_OF_MEMORY)]  # once idle
    r3, c = loaded(h, "c", 1 * GB, keep_alive=3600.0)
    h.do(RunnerOutOfMemory(r3))
    assert h.arrive("c", facts(1 * GB), keep_alive=0.5) == []  # waits for the busy slot
    d = h._next_req
    assert h.do(RequestFinished(c)) == [Grant(d, r3)]  # its keep-alive is set again
    assert h.do(RequestFinished(d)) == []
    assert h.tick(1.0) == [StopRunner(r3, StopReason.EXPIRED)]


# 44
def test_sched_llama_server_evicts_existing_on_pending() -> None:
    h = Harness(inv=inventory(metal(total=12 * GB, free=12 * GB)))
    rid, a = loaded(h, "a", 10 * GB)
    h.do(RequestFinished(a))
    eff = h.arrive("b", facts(10 * GB))
    assert eff == [StopRunner(rid, "evicted")]


# 45
def test_runner_can_be_evicted() -> None:
    h = Harness(Limits(max_loaded=1))
    rid, a = loaded(h, "/fake/model", 1 * GB)
    h.do(RequestFinished(a))
    eff = h.arrive("/fake/other", facts(1 * GB))
    assert eff == [StopRunner(rid, "evicted")]


# 46
def test_scheduler_tracks_multiple_loaded_runners() -> None:
    h = Harness(inv=inventory(metal(total=24 * GB, free=24 * GB)))
    loaded(h, "a", 8 * GB)
    loaded(h, "b", 4 * GB)
    assert [g.usable for g in h.s.snapshot().gpus] == [12 * GB]
