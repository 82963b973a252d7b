"""Supervisor acceptance: real FakeEngine runner processes, simulated GPUs, the real Scheduler.

Tests wait on supervisor events (``wait_until`` / ``wait_processed``), never on sleeps; every
wait is wrapped in a wall-clock safety net only.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog

from corral.daemon.api.errors import http_status
from corral.daemon.api.ps import ps_models
from corral.daemon.config import Config, SimulatedGpu
from corral.daemon.errors import CorralError
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.model_inputs import runner_options
from corral.daemon.params import RequestOptions
from corral.daemon.runner_client import RunnerLease
from corral.daemon.runners import RunnerProcess, child_env, huge_pages_usable
from corral.daemon.supervisor import DECISIONS, Lease, Supervisor
from corral.runner import protocol
from corral.scheduler import QUEUE_FULL_MESSAGE as QUEUE_FULL
from corral.scheduler import StopReason

GiB = 1 << 30
SAFETY = float(os.environ.get("TEST_SAFETY", "30"))
HOST = (64 * GiB, 48 * GiB)


@dataclass
class Model:
    """A ModelRecord stand-in: what acquire() reads."""

    name: str
    model_path: Path
    digest: str = "0" * 64
    parameters: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(
        default_factory=lambda: {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "0.2M",
            "quantization_level": "F32",
        }
    )


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# A runner that writes an error line and dies on SIGUSR1 (a CUDA fault stand-in); otherwise the
# real `python -m corral.runner`.
CRASHY_RUNNER = (
    sys.executable,
    "-c",
    (
        "import os, signal, sys\n"
        "def boom(*_):\n"
        "    os.write(2, b'CUDA error: an illegal memory access was encountered\\n')\n"
        "    os._exit(134)\n"
        "signal.signal(signal.SIGUSR1, boom)\n"
        "from corral.runner.__main__ import main\n"
        "code = main()\n"
        "sys.stderr.flush()\n"
        "os._exit(code)\n"
    ),
)
SILENT_RUNNER = (sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)")


def config(**kw: Any) -> Config:
    knobs = kw.pop("fake_knobs", {})
    base: dict[str, Any] = dict(
        runner_engine="fake",
        simulate_gpus=(SimulatedGpu(id="0", total=24 * GiB, free=24 * GiB, name="Sim 24G"),),
        fake_knobs={"load_time": 0.0, "tokens_per_second": 200.0, **knobs},
        keep_alive=300.0,
        load_timeout=20.0,
    )
    base.update(kw)
    return Config(**base)


@pytest.fixture
def models(tiny_gguf_factory: Callable[[int], Path]) -> Callable[[int], Model]:
    def make(i: int = 0) -> Model:
        return Model(name=f"tiny{i}:latest", model_path=tiny_gguf_factory(i), digest=f"{i:064x}")

    return make


@pytest.fixture
async def make_sup() -> AsyncIterator[Callable[..., Any]]:
    made: list[Supervisor] = []

    async def make(cfg: Config | None = None, **kw: Any) -> Supervisor:
        cfg = cfg or config()
        kw.setdefault("stop_grace", 2.0)
        kw.setdefault("drain_timeout", 1.0)
        sup = Supervisor(cfg, probe=SimulatedProbe(cfg.simulate_gpus, host=HOST), **kw)
        await sup.start()
        made.append(sup)
        return sup

    yield make
    for sup in made:
        await asyncio.wait_for(sup.close(), SAFETY)
        for r in sup._runners.values():
            assert not pid_alive(r.proc.pid), "a runner outlived the supervisor"


async def until(sup: Supervisor, pred: Callable[[], bool], timeout: float = SAFETY) -> None:
    await asyncio.wait_for(sup.wait_until(pred), timeout)


def loaded(sup: Supervisor) -> list[str]:
    return [v.runner_id for v in sup.snapshot().runners]


async def acquire(sup: Supervisor, model: Model, **kw: Any) -> Lease:
    kw.setdefault("options", None)
    kw.setdefault("keep_alive", None)
    return await asyncio.wait_for(
        sup.acquire(model, kw.pop("options"), kw.pop("keep_alive"), **kw), SAFETY
    )


# ------------------------------------------------------------------------------------ basics


async def test_acquire_loads_grants_and_serves_http(make_sup, models):
    sup = await make_sup()
    m = models(0)
    async with await acquire(sup, m) as lease:
        assert isinstance(lease, RunnerLease)  # what the api layer relies on
        assert lease.runner.base_url.startswith("http://127.0.0.1:")
        assert lease.n_ctx == 4096  # CPU-tier default, clamped to n_ctx_train
        assert lease.load_duration > 0
        async with await lease.runner.http.request("GET", "/health") as reply:
            assert reply.status == 200
        body = protocol.CompletionRequest(
            prompt="hi", options=protocol.SamplingOptions(num_predict=3), stream=False
        )
        async with await lease.runner.http.request(
            "POST", "/completion", protocol.encode(body)
        ) as reply:
            assert reply.status == 200
            lines = [
                protocol.decode_completion_event(x)
                for x in (await reply.read()).splitlines()
                if x.strip()
            ]
        assert isinstance(lines[-1], protocol.CompletionDone) and lines[-1].eval_count == 3
        assert sup.snapshot().in_flight == 1
        assert lease.failure_reason() is None
    await sup.wait_processed()
    assert sup.snapshot().in_flight == 0
    # The same model is served by the same runner without a reload.
    async with await acquire(sup, m) as lease2:
        assert lease2.runner_id == lease.runner_id
        assert lease2.load_duration < lease.load_duration + 1


async def test_lease_release_is_exactly_once_also_on_exceptions(make_sup, models):
    sup = await make_sup()
    with pytest.raises(RuntimeError):
        async with await acquire(sup, models(0)) as lease:
            raise RuntimeError("handler bug")
    lease.release()
    lease.release()
    await sup.wait_processed()
    assert sup.snapshot().in_flight == 0


async def test_ps_rows_have_ollamas_fields_and_our_extras(make_sup, models):
    sup = await make_sup()
    async with await acquire(sup, models(0), keep_alive=120.0) as lease:
        rows = ps_models(sup)
        assert [list(r)[:8] for r in rows] == [
            [
                "name",
                "model",
                "size",
                "digest",
                "details",
                "expires_at",
                "size_vram",
                "context_length",
            ]
        ]
        row = rows[0]
        assert row["name"] == row["model"] == "tiny0:latest"
        assert row["digest"] == f"{0:064x}"
        assert row["context_length"] == 4096
        assert row["state"] == "ready" and row["in_flight"] == 1 and row["queued"] == 0
        assert row["num_parallel"] == 1
        assert row["pid"] == sup.runner_process(lease.runner_id).pid
        assert row["size"] >= row["size_vram"] > 0
        assert row["gpus"] == [
            {"id": "0", "name": "Sim 24G", "vram": row["size_vram"], "simulated": True}
        ]
        # local time: its offset, or Z on a machine on UTC (as Go writes it)
        assert re.fullmatch(
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)", row["expires_at"]
        )
    await sup.wait_processed()
    # Idle: expires about keep-alive from now; longest-lived first.
    async with await acquire(sup, models(1), keep_alive=math.inf):
        pass
    await sup.wait_processed()
    names = [r["name"] for r in ps_models(sup)]
    assert names == ["tiny1:latest", "tiny0:latest"]
    assert ps_models(sup)[0]["expires_at"].startswith(("22", "23"))  # "forever" is ~292 years out


def test_runner_options_follow_ollamas_auto_rules():
    auto = runner_options(RequestOptions(), default_ctx=(32768, True))
    assert (auto.num_ctx, auto.num_ctx_auto, auto.num_batch, auto.num_batch_auto) == (
        32768,
        True,
        512,
        True,
    )
    env = runner_options(RequestOptions(), default_ctx=(8192, False))  # OLLAMA_CONTEXT_LENGTH
    assert (env.num_ctx, env.num_ctx_auto) == (8192, False)
    explicit = runner_options(
        RequestOptions.build(None, {"num_ctx": 2.0, "num_batch": 128, "num_gpu": 0}),
        default_ctx=(4096, True),
    )
    assert (explicit.num_ctx, explicit.num_ctx_auto, explicit.num_batch, explicit.num_gpu) == (
        2,
        False,
        128,
        0,
    )  # floored where it is used: scheduler.estimate.effective_num_ctx
    odd = runner_options(
        RequestOptions(num_batch=0, num_thread=-3, main_gpu=1, use_mmap=False),
        default_ctx=(4096, True),
    )
    assert (odd.num_batch, odd.num_batch_auto, odd.num_thread, odd.main_gpu, odd.use_mmap) == (
        1,
        False,
        0,
        1,
        False,
    )


async def test_acquire_takes_the_options_as_merged_by_the_caller(make_sup, models):
    """acquire merges nothing: the model's parameters reach the runner only through the
    caller's RequestOptions.build (the one merge), and a dict is not accepted."""
    sup = await make_sup()
    m = models(0)
    m.parameters["num_ctx"] = 512
    async with await acquire(sup, m) as a:
        assert a.n_ctx != 512
    async with await acquire(sup, m, options=RequestOptions.build(m.parameters, None)) as b:
        assert b.runner_id != a.runner_id and b.n_ctx == 512
    with pytest.raises(AttributeError):
        await acquire(sup, m, options={"num_ctx": 512})


class _OneModelStore:
    """The store surface the supervisor uses: resolve one name, hold/release blobs."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.held: list[str] = []

    def resolve(self, name: str) -> Model:
        assert name == self.model.name
        return self.model

    def hold(self, path: str) -> None:
        self.held.append(path)

    def release(self, path: str) -> None:
        self.held.remove(path)


async def test_preload_loads_with_the_models_parameters(make_sup, models):
    """The default-model preload builds the options from the record's parameters itself
    (acquire no longer merges them): a Modelfile num_ctx decides the preloaded runner."""
    m = models(0)
    m.parameters["num_ctx"] = 512
    sup = await make_sup(store=_OneModelStore(m))
    await sup.preload_default(m.name)
    assert sup.preloaded
    assert [v.options.num_ctx for v in sup.snapshot().runners] == [512]
    async with await acquire(sup, m, options=RequestOptions.build(m.parameters, None)) as lease:
        assert lease.n_ctx == 512 and len(loaded(sup)) == 1  # the preloaded runner serves


async def test_num_ctx_floors_apply_to_what_is_launched(make_sup, models):
    """A num_ctx under the floor launches the runner with the floor (4; 2048 for vision, see
    tests/scheduler/test_estimate.py) and /api/ps shows it."""
    sup = await make_sup()
    async with await acquire(sup, models(0), options=RequestOptions(num_ctx=2)) as lease:
        assert lease.n_ctx == 4 and ps_models(sup)[0]["context_length"] == 4


async def test_missing_blob_is_404_and_closed_supervisor_is_503(make_sup, models, tmp_path):
    sup = await make_sup()
    with pytest.raises(CorralError) as ei:
        await acquire(sup, Model(name="gone:latest", model_path=tmp_path / "nope.gguf"))
    assert http_status(ei.value) == 404
    assert ei.value.message == 'model "gone:latest" not found, try pulling it first'
    await sup.close()
    with pytest.raises(CorralError) as ei:
        await acquire(sup, models(0))
    assert http_status(ei.value) == 503


# ------------------------------------------------------------------------- scheduler behaviour


async def test_max_loaded_models_evicts_the_idle_runner(make_sup, models):
    sup = await make_sup(config(max_loaded_models=1))
    async with await acquire(sup, models(0)) as a:
        pid_a = sup.runner_process(a.runner_id).pid
    async with await acquire(sup, models(1)) as b:
        assert b.runner_id != a.runner_id
        assert loaded(sup) == [b.runner_id]
        assert not pid_alive(pid_a)
    assert [r["name"] for r in ps_models(sup)] == ["tiny1:latest"]


async def test_max_loaded_models_waits_for_a_busy_runner(make_sup, models):
    sup = await make_sup(config(max_loaded_models=1))
    a = await acquire(sup, models(0))
    waiter = asyncio.create_task(sup.acquire(models(1), None, None))
    await until(sup, lambda: sup.snapshot().queued == 1)
    assert not waiter.done()  # nobody is killed with a request in flight
    pid_a = sup.runner_process(a.runner_id).pid
    assert pid_alive(pid_a)
    a.release()
    async with await asyncio.wait_for(waiter, SAFETY) as b:
        assert b.runner_id != a.runner_id
        assert not pid_alive(pid_a)


async def test_keep_alive_expiry_stops_the_process(make_sup, models):
    sup = await make_sup()
    async with await acquire(sup, models(0), keep_alive=0.3) as lease:
        pid = sup.runner_process(lease.runner_id).pid
    t0 = time.monotonic()
    await until(sup, lambda: not loaded(sup))
    assert time.monotonic() - t0 >= 0.2
    assert not pid_alive(pid)
    assert ps_models(sup) == []


async def test_keep_alive_zero_unloads_when_idle(make_sup, models):
    sup = await make_sup()
    async with await acquire(sup, models(0), keep_alive=0.0) as lease:
        pid = sup.runner_process(lease.runner_id).pid
        await sup.wait_processed()
        assert loaded(sup) == [lease.runner_id]  # busy: not stopped under the request
    await until(sup, lambda: not loaded(sup))
    assert not pid_alive(pid)


async def test_unload_stops_an_idle_runner(make_sup, models):
    sup = await make_sup()
    m = models(0)
    async with await acquire(sup, m, keep_alive=math.inf) as lease:
        pid = sup.runner_process(lease.runner_id).pid
    await sup.unload(m)
    await until(sup, lambda: not loaded(sup))
    assert not pid_alive(pid)
    await sup.unload(m)  # not loaded: a no-op
    await sup.wait_processed()


async def test_max_queue_rejects_with_ollamas_503_text(make_sup, models):
    sup = await make_sup(config(max_queue=1))
    m = models(0)
    held = await acquire(sup, m)  # loaded model, its only slot busy
    second = asyncio.create_task(sup.acquire(m, None, None))
    await until(sup, lambda: sup.snapshot().queued == 1)
    with pytest.raises(CorralError) as ei:
        await acquire(sup, m)
    assert (http_status(ei.value), ei.value.message) == (503, QUEUE_FULL)
    held.release()
    async with await asyncio.wait_for(second, SAFETY) as lease:
        assert lease.runner_id == held.runner_id


async def test_cancelled_while_queued_frees_its_queue_place(make_sup, models):
    sup = await make_sup(config(max_queue=1))
    m = models(0)
    held = await acquire(sup, m)
    queued = asyncio.create_task(sup.acquire(m, None, None))
    await until(sup, lambda: sup.snapshot().queued == 1)
    queued.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await queued
    await until(sup, lambda: sup.snapshot().queued == 0)
    again = asyncio.create_task(sup.acquire(m, None, None))  # the place is free again
    await until(sup, lambda: sup.snapshot().queued == 1)
    held.release()
    async with await asyncio.wait_for(again, SAFETY):
        assert sup.snapshot().in_flight == 1
    await sup.wait_processed()
    assert sup.snapshot().in_flight == 0


async def test_num_parallel_grants_concurrent_slots(make_sup, models):
    sup = await make_sup(config(num_parallel=2))
    m = models(0)
    a = await acquire(sup, m)
    b = await acquire(sup, m)
    assert a.runner_id == b.runner_id
    assert ps_models(sup)[0]["num_parallel"] == 2 and ps_models(sup)[0]["in_flight"] == 2
    third = asyncio.create_task(sup.acquire(m, None, None))
    await until(sup, lambda: sup.snapshot().queued == 1)
    b.release()
    async with await asyncio.wait_for(third, SAFETY) as c:
        assert c.runner_id == a.runner_id
    a.release()


async def test_num_ctx_change_reloads(make_sup, models):
    sup = await make_sup()
    m = models(0)
    async with await acquire(sup, m, options=RequestOptions(num_ctx=512)) as a:
        assert a.n_ctx == 512
        pid_a = sup.runner_process(a.runner_id).pid
    async with await acquire(sup, m, options=RequestOptions(num_ctx=512)) as same:
        assert same.runner_id == a.runner_id
    async with await acquire(sup, m, options=RequestOptions(num_ctx=1024)) as b:
        assert b.runner_id != a.runner_id and b.n_ctx == 1024
    await until(sup, lambda: loaded(sup) == [b.runner_id])
    assert not pid_alive(pid_a)


async def test_sigkill_mid_request_fails_it_and_the_next_acquire_reloads(make_sup, models):
    sup = await make_sup()
    m = models(0)
    lease = await acquire(sup, m)
    pid = sup.runner_process(lease.runner_id).pid
    os.kill(pid, signal.SIGKILL)
    reason = await asyncio.wait_for(lease.wait_failure(), SAFETY)
    assert reason is not None
    assert reason.startswith("llama runner process has terminated: signal: killed")
    await asyncio.wait_for(lease.aborted.wait(), SAFETY)
    await until(sup, lambda: lease.runner_id not in loaded(sup))
    lease.release()  # late release after the crash: harmless
    async with await acquire(sup, m) as again:
        assert again.runner_id != lease.runner_id
        assert sup.runner_process(again.runner_id).pid != pid
    await sup.wait_processed()
    assert sup.snapshot().in_flight == 0


async def test_crash_error_carries_the_runners_last_stderr_line(make_sup, models):
    sup = await make_sup(runner_argv=CRASHY_RUNNER)
    lease = await acquire(sup, models(0))
    os.kill(sup.runner_process(lease.runner_id).pid, signal.SIGUSR1)
    reason = await asyncio.wait_for(lease.wait_failure(), SAFETY)
    assert reason == (
        "llama runner process has terminated: exit status 134: "
        "CUDA error: an illegal memory access was encountered"
    )
    assert lease.failure_reason() == reason
    lease.release()


async def test_crash_while_streaming_breaks_the_stream(make_sup, models):
    sup = await make_sup(config(fake_knobs={"crash_after_tokens": 3}))
    async with await acquire(sup, models(0)) as lease:
        body = protocol.CompletionRequest(
            prompt="hi", options=protocol.SamplingOptions(num_predict=50)
        )
        with pytest.raises(ConnectionError):
            async with await lease.runner.http.request(
                "POST", "/completion", protocol.encode(body)
            ) as reply:
                await reply.read()
                raise ConnectionError("stream ended without done")
        reason = await asyncio.wait_for(lease.wait_failure(), SAFETY)
        assert reason is not None and reason.startswith(
            "llama runner process has terminated: exit status 1"
        )


async def test_load_failure_with_oom_is_a_500_with_the_runners_message(make_sup, models):
    sup = await make_sup(config(fake_knobs={"fail_load_oom": True}))
    with pytest.raises(CorralError) as ei:
        await acquire(sup, models(0))
    assert http_status(ei.value) == 500
    assert "out of memory" in ei.value.message
    await until(sup, lambda: not loaded(sup))
    assert sup.snapshot().queued == 0


async def test_a_bug_starting_a_runner_is_a_500_that_names_it(make_sup, models):
    """An exception with no message while starting a runner (an ``assert`` in a library, say)
    still gives the client an error that says something, never ``{"error": ""}``."""
    sup = await make_sup(config())

    def broken(effect):
        raise AssertionError()

    sup._launch_spec = broken
    with pytest.raises(CorralError) as ei:
        await acquire(sup, models(0))
    assert http_status(ei.value) == 500
    assert ei.value.message == "unable to start runner: AssertionError"
    await until(sup, lambda: not loaded(sup))
    assert sup.snapshot().queued == 0


async def test_stall_timeout_fails_the_load(make_sup, models):
    sup = await make_sup(config(load_timeout=0.5), runner_argv=SILENT_RUNNER)
    t0 = time.monotonic()
    with pytest.raises(CorralError) as ei:
        await acquire(sup, models(0))
    assert 0.4 < time.monotonic() - t0 < 10
    assert http_status(ei.value) == 500
    assert "timed out waiting for llama runner to start" in ei.value.message
    await until(sup, lambda: not loaded(sup))


async def test_runner_ignoring_sigterm_is_killed_after_the_grace(make_sup, models):
    sup = await make_sup(config(fake_knobs={"ignore_sigterm": True}), stop_grace=0.5)
    async with await acquire(sup, models(0), keep_alive=0.0) as lease:
        proc = sup.runner_process(lease.runner_id)
    t0 = time.monotonic()
    await until(sup, lambda: not loaded(sup))
    assert 0.4 < time.monotonic() - t0 < 10
    assert proc.returncode == -signal.SIGKILL
    assert not pid_alive(proc.pid)


async def test_cancel_during_load_leaves_no_queued_request(make_sup, models):
    sup = await make_sup(config(fake_knobs={"load_time": 0.5}))
    m = models(0)
    task = asyncio.create_task(sup.acquire(m, None, None))
    await until(sup, lambda: bool(loaded(sup)))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(sup, lambda: sup.snapshot().queued == 0 and sup.snapshot().in_flight == 0)
    async with await acquire(sup, m):  # the load went on; the next request uses it
        pass


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_keep_alive_deadline_follows_the_injected_clock(make_sup, models):
    clock = FakeClock()
    sup = await make_sup(clock=clock)
    async with await acquire(sup, models(0), keep_alive=60.0) as lease:
        pid = sup.runner_process(lease.runner_id).pid
    await sup.wait_processed()
    clock.now += 59.0
    sup.tick()
    await sup.wait_processed()
    assert loaded(sup) == [lease.runner_id]
    assert ps_models(sup)[0]["state"] == "ready"
    clock.now += 2.0
    sup.tick()
    await until(sup, lambda: not loaded(sup))
    assert not pid_alive(pid)


async def test_runtime_out_of_memory_unloads_every_runner_once_idle(make_sup, models):
    sup = await make_sup()
    with structlog.testing.capture_logs() as logs:
        async with await acquire(sup, models(0), keep_alive=math.inf) as a:
            pid_a = sup.runner_process(a.runner_id).pid
        async with await acquire(sup, models(1), keep_alive=math.inf) as b:
            pid_b = sup.runner_process(b.runner_id).pid
            sup.report_out_of_memory(b)
            await sup.wait_processed()
            assert b.runner_id in loaded(sup)  # busy: it finishes first
        await until(sup, lambda: not loaded(sup))
    assert not pid_alive(pid_a) and not pid_alive(pid_b)
    stops = [e for e in logs if e["event"] == "stopping runner"]
    assert [(e["decision"], e["reason"]) for e in stops] == [("oom_unload", "out of memory")] * 2


def test_every_stop_reason_is_a_logged_decision():
    assert set(DECISIONS) == set(StopReason)


# ------------------------------------------------------------------------ huge pages, mmap


def _spec_and_env(logs: list[dict], pid: int) -> tuple[dict, dict[str, str]]:
    spec = next(e["spec"] for e in logs if e["event"] == "runner launch spec" and e["pid"] == pid)
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(x.decode().split("=", 1) for x in raw if b"=" in x)
    return spec, env


@pytest.mark.parametrize(
    "huge, gpus, asked, mmap",
    [
        (True, (), None, False),  # CPU only: weights read into memory (Ollama's rule), huge pages
        (True, (), True, True),  # the request / Modelfile says mmap: it wins
        (False, (), None, False),  # no huge pages to be had: nothing asked of glibc
        (True, "gpu", None, True),  # on a GPU: mmap; the KV/compute buffers still ask
    ],
)
async def test_runners_ask_glibc_for_huge_pages(
    make_sup, models, monkeypatch, huge, gpus, asked, mmap
):
    monkeypatch.setattr("corral.daemon.supervisor.huge_pages_usable", lambda: huge)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    sup = await make_sup(config() if gpus else config(simulate_gpus=()))
    with structlog.testing.capture_logs() as logs:
        async with await acquire(sup, models(0), options=RequestOptions(use_mmap=asked)) as lease:
            spec, env = _spec_and_env(logs, sup.runner_process(lease.runner_id).pid)
    assert spec["use_mmap"] is mmap and (spec["n_gpu_layers"] > 0) is bool(gpus)
    assert (env.get("GLIBC_TUNABLES") == "glibc.malloc.hugetlb=1") is huge


def test_huge_pages_usable_and_the_child_tunable(tmp_path):
    setting = tmp_path / "enabled"
    for text, libc, usable in [
        ("[always] madvise never", "musl", True),
        ("always [madvise] never", "glibc", True),
        ("always [madvise] never", "musl", False),  # nobody asks
        ("always madvise [never]", "glibc", False),
    ]:
        setting.write_text(text + "\n")
        assert huge_pages_usable(setting, libc) is usable, text
    assert huge_pages_usable(tmp_path / "missing", "glibc") is False  # not Linux
    assert child_env(None, {"A": "1"}, huge_pages=True) == {
        "A": "1",
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    kept = child_env(None, {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, huge_pages=True)
    assert kept == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    theirs = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert child_env(None, theirs, huge_pages=True) == theirs  # the user's choice wins
    assert child_env(None) is None and child_env("1", {}) == {"CUDA_VISIBLE_DEVICES": "1"}


# ------------------------------------------------------------------------------ spare runner


async def spares_warm(sup: Supervisor, n: int) -> list[int]:
    """The pids of the supervisor's waiting spare runners once ``n`` of them are warm, oldest
    first (polled: a spare's warm-up dispatches nothing; the timeout is a safety net only)."""

    def warm() -> list[int]:
        return [p.pid for p in sup._spares if p.spare and p.warm and p.pid is not None]

    async def wait() -> None:
        while len(warm()) < n:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(wait(), SAFETY)
    return warm()


def spare_uses(sup: Supervisor) -> float:
    return sup.metrics.registry.get_sample_value("corral_spare_runner_uses_total") or 0.0


def spare_gauge(sup: Supervisor, state: str) -> float | None:
    return sup.metrics.registry.get_sample_value("corral_spare_runners", {"state": state})


def load_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "starting runner"]


async def test_two_loads_in_a_row_both_start_in_a_warm_spare_and_spares_follow(make_sup, models):
    sup = await make_sup(config(spare_runner=2))
    first, second = await spares_warm(sup, 2)
    assert spare_gauge(sup, "warm") == 2 and spare_gauge(sup, "warming") == 0
    assert sup.spare_memory() > 0  # what /metrics reports they cost
    with structlog.testing.capture_logs() as logs:
        async with await acquire(sup, models(0)) as a:
            assert a.load_duration > 0
            async with await acquire(sup, models(1)) as b:  # right after: the other warm one
                procs = [sup.runner_process(x.runner_id) for x in (a, b)]
                assert [p.pid for p in procs if p is not None] == [first, second]
                async with await b.runner.http.request("GET", "/health") as reply:
                    assert reply.status == 200
    assert [e["spare"] for e in load_lines(logs)] == ["warm", "warm"]
    assert spare_uses(sup) == 2
    followers = await spares_warm(sup, 2)  # both replaced, in the last load's environment
    assert not {first, second} & set(followers)
    await asyncio.wait_for(sup.close(), SAFETY)
    assert not any(pid_alive(p) for p in (first, second, *followers))  # spares die with it
    assert sup.spare_runners() == (0, 0) and sup.spare_memory() == 0


async def test_a_load_takes_the_spare_still_warming_up_rather_than_spawning_one(make_sup, models):
    sup = await make_sup(config(spare_runner=1))
    await spares_warm(sup, 1)
    with structlog.testing.capture_logs() as logs:
        async with await acquire(sup, models(0)):
            pass
        assert len(sup._spares) == 1  # its follower, spawned when that load started
        follower = sup._spares[0]  # maybe still being spawned
        async with await acquire(sup, models(1)) as lease:
            assert sup.runner_process(lease.runner_id) is follower
    spares = [e["spare"] for e in load_lines(logs)]
    assert spares[0] == "warm" and spares[1] in ("warm", "warming")  # as far as it got


# A stand-in spare runner: warm (its Warm line) once the file it is given is gone
HELD_SPARE = (
    "import os, sys, time\n"
    "from corral.runner.protocol import Warm, encode\n"
    "while os.path.exists(sys.argv[1]):\n"
    "    time.sleep(0.01)\n"
    "os.write(1, encode(Warm()) + b'\\n')\n"
    "sys.stdin.readline()\n"
)


async def test_spares_are_spawned_one_at_a_time_and_one_dying_in_its_warm_up_ends_it(
    make_sup, tmp_path
):
    # two warm-ups at once would compete with a load for the CPU: the next spare is spawned
    # once the one before is warm
    hold = tmp_path / "hold"
    hold.touch()
    argv = (sys.executable, "-c", HELD_SPARE, str(hold))  # then --spare ENGINE
    sup = await make_sup(config(spare_runner=2), runner_argv=argv)
    await asyncio.sleep(0.3)  # the first one spawned (and held); a second would be by now
    assert len(sup._spares) == 1 and not sup._spares[0].warm
    assert spare_gauge(sup, "warming") == 1
    hold.unlink()
    assert len(await spares_warm(sup, 2)) == 2
    assert sup._refilling is not None
    await asyncio.wait_for(sup._refilling, SAFETY)  # two are kept, no more
    assert len(sup._spares) == 2

    # a spare that dies in its warm-up is not spawned again and again: the next load tries
    with structlog.testing.capture_logs() as logs:
        dying = await make_sup(config(spare_runner=2), runner_argv=(sys.executable, "-c", "pass"))
        assert dying._refilling is not None
        await asyncio.wait_for(dying._refilling, SAFETY)
    assert [e for e in logs if e["event"] == "spare runner exited"]
    assert dying.spare_runners() == (0, 0) and not dying._spares


async def test_a_spare_spawned_before_the_supervisor_is_adopted_or_stopped(make_sup, models):
    # `corral serve` spawns its first spare before the server's imports (daemon/boot.py)
    cfg = config(spare_runner=1)
    gpus = tuple(g.id for g in cfg.simulate_gpus or ())
    visible = SimulatedProbe(cfg.simulate_gpus).visible_devices(gpus)
    env = child_env(visible, huge_pages=huge_pages_usable())  # the supervisor's first spares
    early = RunnerProcess("spare0", env=env)
    await asyncio.wait_for(early.spawn(("--spare", "fake")), SAFETY)
    sup = await make_sup(cfg, spare=early)
    assert sup._spares == [early]
    async with await acquire(sup, models(0)) as lease:
        assert sup.runner_process(lease.runner_id) is early  # its spec went to the early spare
    assert spare_uses(sup) == 1

    other = RunnerProcess("spare0", env={**(env or {}), "CUDA_VISIBLE_DEVICES": "elsewhere"})
    await asyncio.wait_for(other.spawn(("--spare", "fake")), SAFETY)
    sup = await make_sup(cfg, spare=other)
    await asyncio.wait_for(other.wait_exited(), SAFETY)  # not the spares' environment: stopped
    (pid,) = await spares_warm(sup, 1)
    assert pid != other.pid


async def test_a_spare_of_another_environment_or_dead_is_not_used(make_sup, models):
    sup = await make_sup(config(spare_runner=1))
    (first,) = await spares_warm(sup, 1)
    first_proc = sup._spares[0]
    sup.probe.visible_devices = lambda gpus: "GPU-other"  # type: ignore[method-assign]
    async with await acquire(sup, models(0)) as lease:
        proc = sup.runner_process(lease.runner_id)
        assert proc is not None and proc.pid != first
        assert (proc.env or {})["CUDA_VISIBLE_DEVICES"] == "GPU-other"
    await asyncio.wait_for(first_proc.wait_exited(), SAFETY)  # stopped, not left waiting
    (second,) = await spares_warm(sup, 1)  # the next one has the environment of that load
    second_proc = sup._spares[0]
    assert second_proc.env == proc.env
    os.kill(second, signal.SIGKILL)
    await asyncio.wait_for(second_proc.wait_exited(), SAFETY)
    assert not second_proc.spare and sup.spare_runners() == (0, 0)
    async with await acquire(sup, models(1)) as lease:
        fresh = sup.runner_process(lease.runner_id)
        assert fresh is not None and fresh.pid not in (first, second)
        assert lease.runner.base_url.startswith("http://127.0.0.1:")
    assert spare_uses(sup) == 0


async def test_no_spare_runner_unless_asked_for_with_the_fake_engine(make_sup, models):
    sup = await make_sup()  # the fake engine's default: none
    async with await acquire(sup, models(0)):
        pass
    assert not sup._spares and sup.spare_memory() == 0 and spare_gauge(sup, "warm") == 0
    assert Config(runner_engine="fake").spare_runners == 0
    assert Config(runner_engine="llama").spare_runners == 2
    assert Config(runner_engine="llama", spare_runner=0).spare_runners == 0


def test_corral_spare_runner_is_a_count_or_a_bool():
    def count(value: str, engine: str = "llama") -> int:
        env = {"CORRAL_SPARE_RUNNER": value, "CORRAL_RUNNER_ENGINE": engine}
        return Config.from_env(env).spare_runners

    assert [count(v) for v in ("", "0", "1", "3", "8", "true", "false", "f")] == [
        2, 0, 1, 3, 8, 2, 0, 0,
    ]  # fmt: skip
    assert count("", "fake") == 0 and count("true", "fake") == 2 and count("1", "fake") == 1
    with structlog.testing.capture_logs() as logs:
        assert count("9") == 2 and count("-1") == 2 and count("many", "fake") == 0
    assert [e["variable"] for e in logs] == ["CORRAL_SPARE_RUNNER"] * 3
