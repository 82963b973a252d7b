"""Shutdown with real runner processes: order, parallel stops, the budget, a killed daemon."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from corral.daemon.api.errors import http_status
from corral.daemon.errors import CorralError
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.supervisor import Supervisor
from corral.scheduler import SHUTTING_DOWN_MESSAGE
from tests.daemon.test_supervisor import HOST, SAFETY, Model, config, pid_alive


def model(factory, i: int) -> Model:
    return Model(name=f"tiny{i}:latest", model_path=factory(i), digest=f"{i:064x}")


async def started(cfg, **kw) -> Supervisor:
    sup = Supervisor(cfg, probe=SimulatedProbe(cfg.simulate_gpus, host=HOST), **kw)
    await sup.start()
    return sup


async def test_close_stops_every_runner_in_parallel_within_the_budget(tiny_gguf_factory):
    # Three runners that ignore SIGTERM: each needs the full grace then SIGKILL. In parallel
    # the whole close takes about one grace, not three.
    grace = 1.0
    sup = await started(
        config(fake_knobs={"ignore_sigterm": True}), stop_grace=grace, drain_timeout=0.5
    )
    procs = []
    for i in range(3):
        async with await asyncio.wait_for(
            sup.acquire(model(tiny_gguf_factory, i), None, None), SAFETY
        ) as lease:
            procs.append(sup.runner_process(lease.runner_id))
    assert all(pid_alive(p.pid) for p in procs)
    t0 = time.monotonic()
    await asyncio.wait_for(sup.close(), SAFETY)
    took = time.monotonic() - t0
    assert grace * 0.9 < took < grace * 2 + 1.0, took
    assert sup.stop_grace + sup.drain_timeout + 1.0 < 10.0  # the documented budget
    for p in procs:
        assert p.returncode == -signal.SIGKILL
        assert not pid_alive(p.pid)


async def test_close_fails_queued_requests_and_drains_in_flight_ones(tiny_gguf_factory):
    sup = await started(config(), stop_grace=2.0, drain_timeout=5.0)
    m = model(tiny_gguf_factory, 0)
    held = await asyncio.wait_for(sup.acquire(m, None, None), SAFETY)
    pid = sup.runner_process(held.runner_id).pid
    queued = asyncio.create_task(sup.acquire(m, None, None))
    await asyncio.wait_for(sup.wait_until(lambda: sup.snapshot().queued == 1), SAFETY)
    closing = asyncio.create_task(sup.close())
    with pytest.raises(CorralError) as ei:  # 2. queued requests fail at once
        await asyncio.wait_for(queued, SAFETY)
    assert http_status(ei.value) in (500, 503) and ei.value.message == SHUTTING_DOWN_MESSAGE
    with pytest.raises(CorralError) as ei:  # 1. nothing new is accepted
        await sup.acquire(m, None, None)
    assert http_status(ei.value) == 503
    assert not closing.done() and pid_alive(pid)  # 3. the stream may drain...
    async with await held.runner.http.request("GET", "/health") as reply:
        assert reply.status == 200
    held.release()  # ...and when it ends, runners stop
    await asyncio.wait_for(closing, SAFETY)
    assert not pid_alive(pid)


async def test_drain_timeout_bounds_a_stuck_stream(tiny_gguf_factory):
    sup = await started(config(), stop_grace=1.0, drain_timeout=0.3)
    lease = await asyncio.wait_for(sup.acquire(model(tiny_gguf_factory, 0), None, None), SAFETY)
    pid = sup.runner_process(lease.runner_id).pid
    t0 = time.monotonic()
    await asyncio.wait_for(sup.close(), SAFETY)  # the lease is never released
    assert time.monotonic() - t0 < 0.3 + 1.0 + 1.0
    assert not pid_alive(pid)
    assert lease.failure_reason() == SHUTTING_DOWN_MESSAGE
    lease.release()  # late release after close: harmless


async def test_close_during_a_load_leaves_no_process(tiny_gguf_factory):
    sup = await started(config(fake_knobs={"load_time": 5.0}), stop_grace=1.0, drain_timeout=0.2)
    task = asyncio.create_task(sup.acquire(model(tiny_gguf_factory, 0), None, None))
    await asyncio.wait_for(sup.wait_until(lambda: bool(sup.snapshot().runners)), SAFETY)
    assert sup.snapshot().runners[0].state == "loading"
    proc = next(iter(sup._runners.values())).proc
    t0 = time.monotonic()
    await asyncio.wait_for(sup.close(), SAFETY)
    assert time.monotonic() - t0 < 3.0  # did not wait for the 5 s load
    with pytest.raises(CorralError) as ei:
        await task
    assert http_status(ei.value) in (500, 503)
    assert proc.pid is None or not pid_alive(proc.pid)


DAEMON = r"""
import asyncio, sys
from corral.daemon.runners import RunnerProcess
from corral.runner.protocol import FakeKnobs, LaunchSpec

async def main():
    r = RunnerProcess("r1")
    ready = await r.start(LaunchSpec(model_path="/x.gguf", engine="fake", num_ctx=64,
                                     fake=FakeKnobs()), load_timeout=20)
    print("RUNNER_PID", ready.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_runner_exits_when_the_daemon_is_killed():
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DAEMON, stdout=asyncio.subprocess.PIPE
    )
    try:

        async def runner_pid_line() -> int:
            async for line in daemon.stdout:
                if line.startswith(b"RUNNER_PID "):
                    return int(line.split()[1])
            raise AssertionError("the daemon ended without starting a runner")

        runner_pid = await asyncio.wait_for(runner_pid_line(), SAFETY)
        assert pid_alive(runner_pid)
        daemon.kill()  # SIGKILL: no cleanup code runs
        await daemon.wait()
        deadline = time.monotonic() + SAFETY
        while pid_alive(runner_pid):  # stdin EOF ends the orphan; init reaps
            assert time.monotonic() < deadline, "runner outlived its daemon"
            await asyncio.sleep(0.05)
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
