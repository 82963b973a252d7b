"""`corral serve` with a policy file (CORRAL_POLICY): a bad file stops the start naming the line;
SIGHUP reloads it (new pins load, /api/ps shows what applies; a bad reload keeps the old)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from tests.e2e.conftest import create_tiny, free_port, start_daemon, wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_bad_policy_file_stops_serve_naming_the_line(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text('[models."a"]\nnum_parallel = 2\npriority = "urgent"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env.update(
        OLLAMA_HOST=f"127.0.0.1:{free_port()}",
        OLLAMA_MODELS=str(tmp_path / "models"),
        CORRAL_DEFAULT_MODEL="",
        CORRAL_POLICY=str(f),
    )
    p = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 1
    assert "serve failed" in p.stderr and f"{f}:3: models." in p.stderr
    assert "priority: must be" in p.stderr
    assert "Listening" not in p.stderr


async def test_sighup_reloads_pins_and_ps_shows_the_policy(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text('[models."a:latest"]\nnum_parallel = 2\n')
    with start_daemon(
        tmp_path, CORRAL_RUNNER_ENGINE="fake", CORRAL_POLICY=str(f), OLLAMA_KEEP_ALIVE="0"
    ) as d:
        async with aiohttp.ClientSession() as s:
            await create_tiny(s, d.url, tmp_path, "a", 1)

            async def ps() -> list[dict]:
                async with s.get(f"{d.url}/api/ps") as r:
                    return (await r.json())["models"]

            f.write_text('[models."a:latest"]\nnum_parallel = 2\npinned = true\n')
            d.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: "pinned model loaded" in d.log_text())
            (row,) = await ps()
            assert row["name"] == "a:latest" and row["pinned"] is True
            assert row["policy"] == {"num_parallel": 2, "pinned": True}
            assert row["num_parallel"] == 2
            f.write_text("[models.a\n")
            d.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: "keeping the old policy" in d.log_text())
            async with s.post(
                f"{d.url}/api/generate", json={"model": "a", "prompt": "hi", "stream": False}
            ) as r:
                assert r.status == 200
            (row,) = await ps()  # OLLAMA_KEEP_ALIVE=0, but the pin stays
            assert row["pinned"] is True
