"""`corral serve` on SIGTERM: ordered shutdown within the service manager's stop timeout (the
systemd unit gives 30 s), even with a stream in flight and runners that ignore SIGTERM; no runner
process outlives the daemon and the in-flight stream ends with a final line (done or error),
never cut off or hung."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import create_tiny, pid_alive, start_daemon, wait_until

pytestmark = pytest.mark.timeout(120)

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "corral.service"


async def test_sigterm_stops_within_the_unit_timeout(tmp_path):
    stop_timeout = int(re.search(r"TimeoutStopSec=(\d+)", UNIT.read_text()).group(1))
    knobs = {"tokens_per_second": 20, "default_num_predict": 10_000, "ignore_sigterm": True}
    with start_daemon(
        tmp_path,
        CORRAL_RUNNER_ENGINE="fake",
        CORRAL_FAKE_KNOBS=json.dumps(knobs),
        OLLAMA_MAX_LOADED_MODELS="2",
    ) as d:
        async with aiohttp.ClientSession() as s:
            await create_tiny(s, d.url, tmp_path, "a", 1)
            await create_tiny(s, d.url, tmp_path, "b", 2)
            async with s.post(
                f"{d.url}/api/generate", json={"model": "b", "prompt": "", "stream": False}
            ) as r:
                assert r.status == 200  # a second, idle runner
            async with s.post(f"{d.url}/api/generate", json={"model": "a", "prompt": "x"}) as r:
                assert json.loads(await r.content.readline())["done"] is False
                pids = d.runner_pids()
                assert len(pids) == 2
                t0 = time.monotonic()
                d.proc.send_signal(signal.SIGTERM)
                rest = [json.loads(x) for x in (await r.content.read()).splitlines() if x]
            assert rest and (rest[-1].get("done") or "error" in rest[-1]), rest[-2:]
            rc = await asyncio.to_thread(d.proc.wait, stop_timeout)
            elapsed = time.monotonic() - t0
            assert rc == 0
            assert elapsed < stop_timeout, elapsed
            assert not [p for p in pids if pid_alive(p)]


async def test_the_spare_runner_serves_a_load_and_dies_with_a_killed_daemon(tmp_path):
    """CORRAL_SPARE_RUNNER: the first spare is spawned before the server's imports (its
    warm-up overlaps them) and adopted by the supervisor; a load starts in it (its pid
    answers), a new spare waits named ``corral-spare``, and a daemon killed without a word
    (SIGKILL: no shutdown) leaves no spare behind: its stdin closes and it exits."""
    env = {"CORRAL_RUNNER_ENGINE": "fake", "CORRAL_SPARE_RUNNER": "1"}
    with start_daemon(tmp_path, exit_code=-signal.SIGKILL, **env) as d:
        assert wait_until(lambda: len(d.runner_pids(spares=True)) == 1)
        (spare,) = d.runner_pids(spares=True)
        assert d.runner_pids() == set()  # a spare is no runner of a model yet
        first = [i for i, x in enumerate(d.log) if re.search(rf"runner_id=spare0 pid={spare}", x)]
        config = [i for i, x in enumerate(d.log) if "server config" in x]
        assert first and config and first[0] < config[0]  # spawned before the server's start
        async with aiohttp.ClientSession() as s:
            await create_tiny(s, d.url, tmp_path, "a", 1)
            async with s.post(
                f"{d.url}/api/generate",
                json={"model": "a", "prompt": "", "stream": False},
            ) as r:
                assert r.status == 200, await r.text()
        assert d.runner_pids() == {spare}  # the model's runner is the former spare
        assert wait_until(lambda: len(d.runner_pids(spares=True)) == 2)
        spares = d.runner_pids(spares=True) - {spare}
        # the load says it started in a spare, warm or still warming up
        assert [x for x in d.log if "starting runner" in x and re.search(r"\sspare=warm", x)]
        d.proc.kill()
        d.proc.wait(10)
        assert wait_until(lambda: not [p for p in {spare, *spares} if pid_alive(p)])


def test_a_start_that_fails_leaves_no_spare_runner(tmp_path):
    """A start that fails after the first spare's spawn (a key file that cannot be read) stops
    that spare before the daemon exits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env |= {
        "OLLAMA_HOST": "127.0.0.1:0",
        "OLLAMA_MODELS": str(tmp_path / "m"),
        "OLLAMA_DEBUG": "1",
        "CORRAL_DEFAULT_MODEL": "",
        "CORRAL_RUNNER_ENGINE": "fake",
        "CORRAL_SPARE_RUNNER": "1",
        "CORRAL_API_KEYS_FILE": str(tmp_path / "none.toml"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "serve failed" in r.stderr, r.stderr
    spawned = re.search(r"runner_id=spare0 pid=(\d+)", r.stderr)
    assert spawned, r.stderr
    assert not pid_alive(int(spawned.group(1)))
