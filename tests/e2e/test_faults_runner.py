"""Runner faults against a real ``corral serve``: a model that fails on every load, a load that
hangs.

Crash loop: a model whose GGUF is cut short (a corrupt download) makes the real llama.cpp
runner fail on every load. A client retrying it in a tight loop gets the runner's last error
line every time, the daemon spaces the loads (1 s, 2 s, ... after each failed start: the
scheduler's crash-loop backoff) instead of spawning a runner per retry, and a healthy model keeps
answering meanwhile.

Hung load: a FakeEngine runner whose load hangs silently is killed at ``OLLAMA_LOAD_TIMEOUT`` (10 s
here: a fresh Python runner on a loaded 2-core machine may take a few seconds to say anything, and
the recovering load must not be taken for a hung one); its waiters get a clear error, and the next
request starts a fresh runner.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from datetime import datetime

import pytest

from tests.e2e.conftest import create_model, create_tiny, pid_alive, start_daemon
from tests.e2e.test_scheduler_http import generate
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def starts_of(log: list[str], model: str) -> list[str]:
    """Runner ids of the daemon's ``starting runner`` lines for ``model``."""
    out = []
    for line in log:
        if "starting runner" in line and f"model={model}" in line:
            out.append(re.search(r"runner_id=(\S+)", line).group(1))
    return out


def log_times(log: list[str], event: str, model: str) -> list[datetime]:
    """The timestamps of the daemon's ``event`` lines for ``model``, in order."""
    return [
        datetime.fromisoformat(re.search(r"timestamp=(\S+)", line).group(1))
        for line in log
        if f'event="{event}"' in line and f"model={model}" in line
    ]


CRASH_LOADS = 3  # the first load, then one after each backoff of 1 s and 2 s
REFUSED = 10  # requests answered from the backoff, without a load
SAFETY = 120.0  # s: only a daemon that loads on every retry gets here


async def test_crash_loop_backs_off_and_other_models_keep_serving(tmp_path, session):
    """A client retries a model that fails on every load; another asks a healthy model all the
    while. The retries stop once three loads have failed and at least ten more requests were
    answered without a load (however slow the machine: no throughput is assumed). Without the
    backoff every retry would load and that never happens."""
    good_path = write_tiny_llama(tmp_path / "good.gguf", seed=1)
    whole = write_tiny_llama(tmp_path / "whole.gguf", seed=2).read_bytes()
    bad_path = tmp_path / "bad.gguf"
    bad_path.write_bytes(whole[: len(whole) - 4096])
    with start_daemon(tmp_path) as d:
        good = await create_model(session, d.url, good_path, "good")
        bad = await create_model(session, d.url, bad_path, "bad")
        first = await generate(session, d.url, bad, options={"num_predict": 2})
        assert first["_status"] == 500, first
        error = first["error"]
        # the client sees the runner's last error line (llama.cpp's words), not a generic text
        assert error.startswith("failed to load model: llama_model_load"), error

        loop = asyncio.get_running_loop()
        bad_answers: list[dict] = [first]
        good_answers: list[dict] = []
        retried = asyncio.Event()

        def enough() -> bool:
            failed = len(log_times(d.log, "runner failed to load", bad))
            return failed >= CRASH_LOADS and len(bad_answers) >= failed + REFUSED

        async def retrying_client() -> None:
            end = loop.time() + SAFETY
            try:
                while not enough() and loop.time() < end:
                    answer = await generate(session, d.url, bad, options={"num_predict": 2})
                    bad_answers.append(answer)
                    await asyncio.sleep(0.02)
            finally:
                retried.set()

        async def healthy_client() -> None:
            while not retried.is_set() or len(good_answers) < 10:
                good_answers.append(
                    await generate(session, d.url, good, options={"num_predict": 2})
                )
                await asyncio.sleep(0.2)

        await asyncio.gather(retrying_client(), healthy_client())
        assert [a["_status"] for a in good_answers] == [200] * len(good_answers)
        assert {(a["_status"], a["error"]) for a in bad_answers} == {(500, error)}
    # the daemon has stopped: its log is complete
    starts = log_times(d.log, "starting runner", bad)
    failures = log_times(d.log, "runner failed to load", bad)
    assert len(failures) == len(starts) >= CRASH_LOADS, (starts, failures)
    assert len(bad_answers) >= len(starts) + REFUSED, (len(bad_answers), starts)
    # The schedule: the n-th load in a row starts no sooner than 2**(n-1) s after the start
    # of the one before (a slow machine only spaces them more). 0.25 s: the log's clock is
    # read a moment after the scheduler's.
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    assert all(gap >= 2**n - 0.25 for n, gap in enumerate(gaps)), gaps
    print(
        f"\nCRASH LOOP: {len(bad_answers)} requests for a model failing on every load -> "
        f"{len(starts)} loads, {', '.join(f'{g:.1f}' for g in gaps)} s apart; "
        f"{len(good_answers)} requests for another model meanwhile, all 200; "
        f"error: {error!r}"
    )


async def test_hung_load_is_killed_at_the_load_timeout_and_the_next_request_loads_afresh(
    tmp_path, session
):
    hang = tmp_path / "driver-stuck"
    hang.touch()
    env = {
        "CORRAL_RUNNER_ENGINE": "fake",
        "OLLAMA_LOAD_TIMEOUT": "10s",
        "CORRAL_FAKE_KNOBS": json.dumps({"hang_load_while": str(hang)}),
    }
    with start_daemon(tmp_path, **env) as d:
        model = await create_tiny(session, d.url, tmp_path, "m", 1)
        waiters = await asyncio.gather(
            *(generate(session, d.url, model, options={"num_predict": 2}) for _ in range(3))
        )
        for w in waiters:
            assert w["_status"] == 500
            assert w["error"].startswith(
                "timed out waiting for llama runner to start (no progress for 10s)"
            ), w
        [hung] = starts_of(d.log, model)
        pids = [
            int(m.group(1))
            for line in d.log
            if f"runner_id={hung}" in line and "runner spawned" in line
            for m in [re.search(r"pid=(\d+)", line)]
        ]
        assert len(pids) == 1 and not pid_alive(pids[0])  # killed, not left hanging

        hang.unlink()  # the driver recovers
        ok = await generate(session, d.url, model, options={"num_predict": 2})
        assert ok["_status"] == 200 and ok["done"], ok
        assert len(starts_of(d.log, model)) == 2  # a fresh runner, not the hung one


async def test_copy_onto_a_name_being_loaded_is_safe(tmp_path, session):
    """``cp B A`` while A's runner is loading: the load still has A's weights (its blob is held
    until the runner is gone, then removed), later requests for A get B."""
    a_path = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b_path = write_tiny_llama(tmp_path / "b.gguf", seed=2)
    greedy = {"num_predict": 6, "temperature": 0, "seed": 1}
    with start_daemon(tmp_path) as d:
        a = await create_model(session, d.url, a_path, "a")
        b = await create_model(session, d.url, b_path, "b")
        ref = {}
        for m in (a, b):  # what each model answers, then unloaded
            ref[m] = (await generate(session, d.url, m, options=greedy, keep_alive=0))["response"]
        assert ref[a] != ref[b]
        a_blob = d.models / "blobs" / ("sha256-" + hashlib.sha256(a_path.read_bytes()).hexdigest())
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while any(p for p in d.runner_pids()) and loop.time() < end:
            await asyncio.sleep(0.05)
        n_starts = len(starts_of(d.log, a))

        request = asyncio.create_task(generate(session, d.url, a, options=greedy, keep_alive="1s"))
        while len(starts_of(d.log, a)) == n_starts and loop.time() < end:
            await asyncio.sleep(0.005)  # the daemon is starting A's runner now
        async with session.post(f"{d.url}/api/copy", json={"source": b, "destination": a}) as r:
            assert r.status == 200
        answer = await request
        assert answer["_status"] == 200 and answer["response"] == ref[a], answer
        again = await generate(session, d.url, a, options=greedy, keep_alive=0)
        assert again["response"] == ref[b]
        # A's old blob goes once its runner has stopped (keep-alive 1 s): nothing leaks
        end = loop.time() + 30
        while a_blob.exists() and loop.time() < end:
            await asyncio.sleep(0.05)
        assert not a_blob.exists()
