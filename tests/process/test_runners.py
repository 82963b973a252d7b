"""RunnerProcess with real children: the FakeEngine runner and small scripted stand-ins, and
spare runners (spawned ahead, started later)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import aiohttp
import msgspec
import psutil
import pytest

from corral.daemon.errors import Busy, Cancelled, Failed, InvalidRequest
from corral.daemon.runner_client import RunnerClient
from corral.daemon.runner_http import RunnerHTTP
from corral.daemon.runners import GONE, RunnerProcess, RunnerStartError, describe_returncode
from corral.runner.protocol import (
    CompletionChunk,
    CompletionDone,
    CompletionRequest,
    FakeKnobs,
    LaunchSpec,
    SamplingOptions,
    encode,
)

SAFETY = 20.0  # wall-clock safety net only; tests wait on events


def spec(**knobs) -> LaunchSpec:
    return LaunchSpec(
        model_path="/nonexistent/fake.gguf", engine="fake", num_ctx=256, fake=FakeKnobs(**knobs)
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def script(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


class Exits:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.event = asyncio.Event()

    def __call__(self, runner: RunnerProcess, rc: int) -> None:
        self.calls.append((runner.runner_id, rc))
        self.event.set()


async def test_handshake_serves_http_and_stops_gracefully():
    exits = Exits()
    r = RunnerProcess("m:1", on_exit=exits)
    ready = await asyncio.wait_for(r.start(spec(load_time=0.05), load_timeout=10), SAFETY)
    assert ready.pid == r.pid and ready.port > 0 and ready.n_ctx_per_slot == 256
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{ready.port}/health") as resp:
            assert resp.status == 200
    assert exits.calls == []
    rc = await asyncio.wait_for(r.stop(grace=5), SAFETY)
    assert rc == 0
    assert exits.calls == [("m:1", 0)]
    assert not pid_alive(r.pid)
    assert await r.stop(grace=5) == 0  # idempotent
    assert exits.calls == [("m:1", 0)]  # on_exit exactly once


async def test_failed_load_reports_reason_and_oom():
    r = RunnerProcess("m:1")
    with pytest.raises(RunnerStartError) as ei:
        await asyncio.wait_for(r.start(spec(fail_load_oom=True), load_timeout=10), SAFETY)
    assert ei.value.oom and ei.value.kind == "failed"
    assert "out of memory" in ei.value.reason
    assert not pid_alive(r.pid)


async def test_exit_during_load_fails_at_once_with_last_error_line():
    code = (
        "import sys, time\n"
        "sys.stdin.readline()\n"
        "print('loading tensors', file=sys.stderr)\n"
        "print('error: GGML_ASSERT(ctx) failed', file=sys.stderr)\n"
        "print('cleanup done', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    r = RunnerProcess("m:1", argv=script(code))
    t0 = time.monotonic()
    with pytest.raises(RunnerStartError) as ei:
        await asyncio.wait_for(r.start(spec(), load_timeout=60), SAFETY)
    assert time.monotonic() - t0 < 5
    assert ei.value.kind == "exited"
    assert ei.value.reason == (
        "llama runner process has terminated: exit status 3: error: GGML_ASSERT(ctx) failed"
    )
    assert r.stderr_tail() == ["loading tensors", "error: GGML_ASSERT(ctx) failed", "cleanup done"]


async def test_stall_timeout_kills_a_silent_child():
    r = RunnerProcess("m:1", argv=script("import time; time.sleep(60)"))
    t0 = time.monotonic()
    with pytest.raises(RunnerStartError) as ei:
        await asyncio.wait_for(r.start(spec(), load_timeout=0.5), SAFETY)
    assert 0.4 < time.monotonic() - t0 < 5
    assert ei.value.kind == "stalled"
    assert "timed out waiting for llama runner to start" in ei.value.reason
    assert not pid_alive(r.pid)  # start() never leaves a child behind


async def test_progress_on_stderr_pushes_the_stall_deadline():
    # 1.2 s of loading with a byte every 0.1 s passes a 0.5 s stall timeout.
    code = (
        "import sys, time, os, json\n"
        "sys.stdin.readline()\n"
        "for _ in range(12):\n"
        "    time.sleep(0.1); print('.', file=sys.stderr, flush=True)\n"
        "print(json.dumps({'type': 'ready', 'version': 1, 'port': 1, 'pid': os.getpid(),\n"
        "    'n_ctx': 8, 'n_ctx_per_slot': 8, 'parallel': 1}), flush=True)\n"
        "sys.stdin.read()\n"
    )
    r = RunnerProcess("m:1", argv=script(code))
    ready = await asyncio.wait_for(r.start(spec(), load_timeout=0.5), SAFETY)
    assert ready.pid == r.pid
    assert await asyncio.wait_for(r.stop(grace=5), SAFETY) is not None
    assert not pid_alive(r.pid)


async def test_sigterm_ignored_is_escalated_to_sigkill_of_the_group():
    exits = Exits()
    r = RunnerProcess("m:1", on_exit=exits)
    await asyncio.wait_for(r.start(spec(ignore_sigterm=True), load_timeout=10), SAFETY)
    t0 = time.monotonic()
    rc = await asyncio.wait_for(r.stop(grace=0.3), SAFETY)
    took = time.monotonic() - t0
    assert rc == -9 and describe_returncode(rc) == "signal: killed"
    assert 0.25 < took < 5
    assert exits.calls == [("m:1", -9)]
    assert not pid_alive(r.pid)


async def test_grandchildren_die_with_the_group():
    code = (
        "import subprocess, sys, time, os, json\n"
        "sys.stdin.readline()\n"
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import signal,time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "print(json.dumps({'type': 'ready', 'version': 1, 'port': p.pid, 'pid': os.getpid(),\n"
        "    'n_ctx': 8, 'n_ctx_per_slot': 8, 'parallel': 1}), flush=True)\n"
        "time.sleep(60)\n"
    )
    r = RunnerProcess("m:1", argv=script(code))
    ready = await asyncio.wait_for(r.start(spec(), load_timeout=10), SAFETY)
    grandchild = ready.port  # smuggled through the Ready line
    assert pid_alive(grandchild)
    await asyncio.wait_for(r.stop(grace=0.2), SAFETY)
    for _ in range(100):  # the grandchild is init's to reap: poll briefly
        if not pid_alive(grandchild):
            break
        await asyncio.sleep(0.02)
    assert not pid_alive(grandchild)


async def test_exit_watcher_notices_a_crash_at_once():
    exits = Exits()
    r = RunnerProcess("m:1", on_exit=exits)
    ready = await asyncio.wait_for(r.start(spec(), load_timeout=10), SAFETY)
    os.kill(ready.pid, 9)
    await asyncio.wait_for(exits.event.wait(), SAFETY)
    assert exits.calls == [("m:1", -9)]
    assert r.exit_reason().startswith("llama runner process has terminated: signal: killed")
    assert await r.stop(grace=1) == -9


async def test_cancelled_start_leaves_no_child():
    r = RunnerProcess("m:1")
    task = asyncio.create_task(r.start(spec(load_time=30), load_timeout=60))
    while r.pid is None:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, SAFETY)
    assert not pid_alive(r.pid)


async def test_child_env_narrowing_reaches_the_child():
    code = (
        "import sys, os, json\n"
        "sys.stdin.readline()\n"
        "print('CVD=' + os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'), file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    from corral.daemon.runners import child_env

    r = RunnerProcess("m:1", argv=script(code), env=child_env("GPU-bbbb"))
    with pytest.raises(RunnerStartError):
        await asyncio.wait_for(r.start(spec(), load_timeout=10), SAFETY)
    assert r.stderr_tail() == ["CVD=GPU-bbbb"]


async def test_spawn_failure_is_a_start_error():
    r = RunnerProcess("m:1", argv=("/nonexistent/python",))
    with pytest.raises(RunnerStartError) as ei:
        await r.start(spec(), load_timeout=10)
    assert ei.value.kind == "spawn"
    assert await r.stop(grace=1) is None


def _client(proc: RunnerProcess, port: int) -> RunnerClient:
    """The runner client a lease gives, around a real RunnerProcess (close its ``http``)."""

    async def failure() -> str | None:
        await proc.wait_exited()
        return proc.exit_reason()

    return RunnerClient(RunnerHTTP("127.0.0.1", port), proc.requests, failure=failure)


async def test_streams_come_up_the_event_pipe_and_a_killed_runner_ends_them():
    """The request pipe end to end: the runner client sends the request on the child's stdin,
    the events arrive through its event pipe, in order, ending with done; a runner killed
    mid-stream ends the stream with its exit reason, and later requests at once."""
    r = RunnerProcess("m:1")
    ready = await asyncio.wait_for(r.start(spec(tokens_per_second=300), load_timeout=10), SAFETY)
    client = _client(r, ready.port)
    try:
        async with aiohttp.ClientSession() as s:
            body = CompletionRequest(prompt="hi", options=SamplingOptions(num_predict=5, seed=2))
            got = [ev async for ev, _ in client.completion(body)]
            assert [type(e) for e in got] == [CompletionChunk] * 5 + [CompletionDone]
            assert got[-1].eval_count == 5
            async with s.post(client.base_url + "/completion", data=encode(body)) as resp:
                plain = [json.loads(line) async for line in resp.content]  # the same job over HTTP
            assert [e.content for e in got[:-1]] == [x["content"] for x in plain[:-1]]
            assert r.requests.open()[0] == 2  # the client used id 1

            long = client.completion(
                CompletionRequest(prompt="a", options=SamplingOptions(num_predict=100000))
            )
            first, _ = await asyncio.wait_for(anext(long), SAFETY)
            assert isinstance(first, CompletionChunk)
            os.killpg(r.pid, signal.SIGKILL)
            with pytest.raises(Failed) as err:  # a 500
                async with asyncio.timeout(SAFETY):
                    async for _ in long:
                        pass
            assert "signal: killed" in err.value.message
            _, queue = r.requests.open()  # the pipe is closed: a new request is gone at once
            assert queue.get_nowait() is GONE
    finally:
        client.http.close()
        await r.stop(grace=5)


async def test_a_step_line_fans_its_text_out_to_the_open_relays(tmp_path):
    """One RelayStep line (a decode step's text for several streams) puts a CompletionChunk in
    each open relay's queue, in order with the Relay lines after it; ids not open (closed, or
    never opened) are dropped."""
    go = tmp_path / "go"
    code = (
        "import sys, os, time, json\n"
        "sys.stdin.readline()\n"
        "out = os.fdopen(1, 'wb', buffering=0)\n"
        "out.write(json.dumps({'type': 'ready', 'version': 1, 'port': 1, 'pid': os.getpid(),"
        " 'n_ctx': 8, 'n_ctx_per_slot': 8, 'parallel': 2}).encode() + b'\\n')\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        'out.write(b\'{"type":"step","ids":[1,2,3],"content":["a","b","c"]}\\n\''
        ' b\'{"type":"relay","id":1,"event":{"type":"done","eval_count":1}}\\n\')\n'
        "sys.stdin.readline()\n"
    )
    r = RunnerProcess("m:1", argv=script(code))
    await asyncio.wait_for(r.start(spec(), load_timeout=10), SAFETY)
    try:
        (one, q1), (two, _) = r.requests.open(), r.requests.open()
        assert (one, two) == (1, 2)
        r.requests.close(two, cancel=False)
        go.touch()
        async with asyncio.timeout(SAFETY):
            first, last = await q1.get(), await q1.get()
        assert first == CompletionChunk(content="a")
        assert isinstance(last, CompletionDone) and last.eval_count == 1
        assert q1.empty()
    finally:
        await r.stop(grace=5)


async def test_relays_left_early_or_finished_leave_nothing_behind():
    """Eight relayed streams on a 4-slot runner, half abandoned after their first token (a
    client gone): every stream ends as it should, no relay queue stays registered and the
    abandoned jobs are cancelled in the runner (its slots and queue empty out)."""
    r = RunnerProcess("m:1")
    four = msgspec.structs.replace(spec(tokens_per_second=300), parallel=4)
    ready = await asyncio.wait_for(r.start(four, load_timeout=10), SAFETY)
    client = _client(r, ready.port)
    try:
        async with aiohttp.ClientSession() as s:

            async def one(i: int) -> str:
                body = CompletionRequest(
                    prompt=f"p{i}", options=SamplingOptions(num_predict=20 if i % 2 else 100000)
                )
                lines = client.completion(body)
                first, _ = await anext(lines)
                assert isinstance(first, CompletionChunk)
                if i % 2 == 0:
                    await lines.aclose()  # the client went away
                    return "left"
                rest = [ev async for ev, _ in lines]
                assert isinstance(rest[-1], CompletionDone) and rest[-1].eval_count == 20
                return "done"

            outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), SAFETY)
            assert sorted(outcomes) == ["done"] * 4 + ["left"] * 4
            assert r.requests.open_count == 0
            async with asyncio.timeout(SAFETY):
                while True:
                    async with s.get(client.base_url + "/health") as resp:
                        health = await resp.json()
                    if health["slots_busy"] == 0 and health["queued"] == 0:
                        break
                    await asyncio.sleep(0.02)
    finally:
        client.http.close()
        await r.stop(grace=5)


async def _held_runner(hold) -> tuple[RunnerProcess, RunnerClient]:
    """A fake-engine runner whose sequences decode nothing after their first token while
    ``hold`` exists, and a client of it."""
    r = RunnerProcess("m:1")
    ready = await asyncio.wait_for(
        r.start(spec(tokens_per_second=2000, hold_tokens_while=str(hold)), load_timeout=10),
        SAFETY,
    )
    return r, _client(r, ready.port)


async def _health(client: RunnerClient) -> dict:
    async with aiohttp.ClientSession() as s, s.get(client.base_url + "/health") as resp:
        return await resp.json()


async def test_whole_answers_refusals_and_cancels_through_the_request_pipe(tmp_path):
    """A whole answer is one round trip through the pipe; a bad request is the runner's
    InvalidRequest; a cancel ends the call at once with Cancelled and the runner's job with a
    Cancel line (its slot empties); a killed runner ends a whole answer with its exit reason."""
    hold = tmp_path / "hold"
    r, client = await _held_runner(hold)
    try:
        async with asyncio.timeout(SAFETY):
            done = await client.complete(
                CompletionRequest(prompt="hi", stream=False, options=SamplingOptions(num_predict=3))
            )
            assert done.eval_count == 3 and done.content
            with pytest.raises(InvalidRequest, match="empty prompt"):
                await client.complete(CompletionRequest(prompt="", stream=False))
            hold.touch()  # a sequence decodes nothing after its first token
            whole = asyncio.ensure_future(
                client.complete(CompletionRequest(prompt="a", stream=False))
            )
            while (await _health(client))["slots_busy"] == 0:
                await asyncio.sleep(0.01)
            client.cancel("request cancelled by its owner")
            with pytest.raises(Cancelled):
                await whole
            while (await _health(client))["slots_busy"] != 0:  # the Cancel line freed it
                await asyncio.sleep(0.01)
            assert r.requests.open_count == 0
            other = _client(r, client.http.port)
            whole = asyncio.ensure_future(
                other.complete(CompletionRequest(prompt="b", stream=False))
            )
            while (await _health(other))["slots_busy"] == 0:
                await asyncio.sleep(0.01)
            os.killpg(r.pid, signal.SIGKILL)
            with pytest.raises(Failed, match="signal: killed"):
                await whole
            assert r.requests.open_count == 0
            other.http.close()
    finally:
        client.http.close()
        await r.stop(grace=5)


async def test_a_draining_runner_refuses_new_requests_and_finishes_its_own(tmp_path):
    """SIGTERM: a new request is refused (Busy, the runner's 503), the one in flight still ends
    with its done within the grace period."""
    hold = tmp_path / "hold"
    hold.touch()
    r, client = await _held_runner(hold)
    try:
        async with asyncio.timeout(SAFETY):
            stream = client.completion(
                CompletionRequest(prompt="a", options=SamplingOptions(num_predict=5))
            )
            first, _ = await anext(stream)
            assert isinstance(first, CompletionChunk)
            os.kill(r.pid, signal.SIGTERM)
            while (await _health(client))["status"] != "draining":
                await asyncio.sleep(0.01)
            with pytest.raises(Busy, match="shutting down"):
                await _client(r, client.http.port).complete(
                    CompletionRequest(prompt="b", stream=False)
                )
            hold.unlink()
            rest = [ev async for ev, _ in stream]
            assert isinstance(rest[-1], CompletionDone) and rest[-1].eval_count == 5
            assert await r.wait_exited() == 0
    finally:
        client.http.close()
        await r.stop(grace=5)


async def test_a_bad_line_from_the_runner_fails_the_request_it_names():
    """An event-pipe line for a request that does not decode (a protocol bug in the runner)
    fails that request (not a wait for nothing) and cancels its job in the runner; the runner
    reads the Cancel line."""
    code = (
        "import sys, os, json\n"
        "sys.stdin.readline()\n"
        "out = os.fdopen(1, 'wb', buffering=0)\n"
        "out.write(json.dumps({'type': 'ready', 'version': 1, 'port': 1, 'pid': os.getpid(),"
        " 'n_ctx': 8, 'n_ctx_per_slot': 8, 'parallel': 2}).encode() + b'\\n')\n"
        "sub = json.loads(sys.stdin.readline())\n"
        "out.write(json.dumps({'type': 'relay', 'id': sub['id'], 'event': {'type': 'bogus'}})"
        ".encode() + b'\\n')\n"
        "cancel = json.loads(sys.stdin.readline())\n"
        "sys.exit(0 if cancel == {'type': 'cancel', 'id': sub['id']} else 3)\n"
    )
    r = RunnerProcess("m:1", argv=script(code))
    await asyncio.wait_for(r.start(spec(), load_timeout=10), SAFETY)
    client = RunnerClient(RunnerHTTP("127.0.0.1", 1), r.requests)
    try:
        async with asyncio.timeout(SAFETY):
            with pytest.raises(Failed, match="bad line from runner"):
                await client.complete(CompletionRequest(prompt="x", stream=False))
            assert await r.wait_exited() == 0  # it read the Cancel line for its request
    finally:
        await r.stop(grace=5)


async def _name_becomes(pid: int, name: str) -> None:
    """Until the process's name (comm) is ``name`` (it sets it itself; safety net only)."""
    while psutil.Process(pid).name() != name:
        await asyncio.sleep(0.01)


async def test_a_spare_runner_waits_named_then_loads_like_a_fresh_one():
    exits = Exits()
    r = RunnerProcess("spare1", on_exit=exits)
    await asyncio.wait_for(r.spawn(("--spare", "fake")), SAFETY)
    assert r.spare and r.pid is not None and r.ready is None
    await asyncio.wait_for(_name_becomes(r.pid, "corral-spare"), SAFETY)
    assert await asyncio.wait_for(r.wait_warm(), SAFETY) and r.warm  # its Warm line came
    r.runner_id = "m:1"  # the supervisor's adoption
    ready = await asyncio.wait_for(r.start(spec(load_time=0.05), load_timeout=10), SAFETY)
    assert ready.pid == r.pid and not r.spare
    assert psutil.Process(r.pid).name() == "corral-runner"  # as every runner with a spec
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{ready.port}/health") as resp:
            assert resp.status == 200
    with pytest.raises(RuntimeError):
        await r.start(spec(), load_timeout=10)
    assert await asyncio.wait_for(r.stop(grace=5), SAFETY) == 0
    assert exits.calls == [("m:1", 0)]


async def test_a_spare_runner_exits_when_the_daemon_is_gone_or_stops_it():
    gone = RunnerProcess("spare1")
    await asyncio.wait_for(gone.spawn(("--spare", "fake")), SAFETY)
    stopped = RunnerProcess("spare2")
    await asyncio.wait_for(stopped.spawn(("--spare", "fake")), SAFETY)
    assert gone._transport is not None
    gone._transport.get_pipe_transport(0).close()  # stdin EOF: what a dead daemon leaves
    assert await asyncio.wait_for(gone.wait_exited(), SAFETY) == 0
    assert not gone.spare and not await gone.wait_warm()
    assert await asyncio.wait_for(stopped.stop(grace=5), SAFETY) is not None
    assert not stopped.spare and not pid_alive(stopped.pid)
    assert not await stopped.wait_warm()  # a stopped spare is no warm one
    with pytest.raises(RunnerStartError) as ei:
        await stopped.start(spec(), load_timeout=10)
    assert ei.value.kind == "stopped"


async def test_the_stall_timeout_of_a_spare_runs_from_its_launch_spec():
    # A spare waits for its spec as long as it must; the load timeout is about the load.
    code = (
        "import sys, os, json\n"
        "sys.stdin.readline()\n"
        "print(json.dumps({'type': 'ready', 'version': 1, 'port': 1, 'pid': os.getpid(),\n"
        "    'n_ctx': 8, 'n_ctx_per_slot': 8, 'parallel': 1}), flush=True)\n"
        "sys.stdin.read()\n"
    )
    r = RunnerProcess("spare1", argv=script(code))
    await asyncio.wait_for(r.spawn(("--spare", "fake")), SAFETY)
    await asyncio.sleep(0.5)  # longer than the load timeout below, silent
    ready = await asyncio.wait_for(r.start(spec(), load_timeout=0.3), SAFETY)
    assert ready.pid == r.pid
    await asyncio.wait_for(r.stop(grace=5), SAFETY)


async def test_start_waits_for_a_spare_still_being_spawned_and_a_failed_spawn_fails_it():
    r = RunnerProcess("spare1")
    spawning = asyncio.create_task(r.spawn(("--spare", "fake")))
    await asyncio.sleep(0)
    assert r.spare  # being spawned counts: start() waits for it
    ready = await asyncio.wait_for(r.start(spec(), load_timeout=10), SAFETY)
    await spawning
    assert ready.pid == r.pid
    assert not await r.wait_warm()  # taken before its warm-up ended: no spare any more
    await asyncio.wait_for(r.stop(grace=5), SAFETY)

    bad = RunnerProcess("spare2", argv=("/nonexistent/python",))
    with pytest.raises(RunnerStartError) as ei:
        await bad.spawn(("--spare", "fake"))
    assert ei.value.kind == "spawn" and not bad.spare
    with pytest.raises(RunnerStartError) as ei:
        await bad.start(spec(), load_timeout=10)
    assert ei.value.kind == "spawn" and "/nonexistent/python" in ei.value.reason
