"""CORRAL_PREDICT_LIMIT through the daemon: the supervisor hands it to every runner, and a request
to a model that never ends its turn (FakeEngine runners with ``default_num_predict`` huge) with
``num_predict`` -1 ends after limit x num_ctx tokens with done_reason "length"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from corral.daemon.api.app import make_app
from corral.daemon.config import DEFAULT_PREDICT_LIMIT, Config
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.models.store import Store
from corral.daemon.supervisor import Supervisor

SAFETY = float(os.environ.get("TEST_SAFETY", "30"))
GiB = 1 << 30
NUM_CTX = 64


def test_config_parses_the_limit():
    assert Config.from_env({}).predict_limit == DEFAULT_PREDICT_LIMIT == 10
    assert Config.from_env({"CORRAL_PREDICT_LIMIT": "3"}).predict_limit == 3
    assert Config.from_env({"CORRAL_PREDICT_LIMIT": "0"}).predict_limit == 0  # no limit
    with capture_logs() as logs:
        assert Config.from_env({"CORRAL_PREDICT_LIMIT": "-1"}).predict_limit == 10
    assert [e["variable"] for e in logs if e["log_level"] == "warning"] == ["CORRAL_PREDICT_LIMIT"]


@pytest.mark.parametrize(("env", "limit"), [({}, 10), ({"CORRAL_PREDICT_LIMIT": "2"}, 2)])
async def test_a_generation_that_never_ends_stops_at_the_limit(
    tmp_path: Path, tiny_gguf: Path, env, limit
):
    store = Store(tmp_path)
    layer = await store.write_blob_bytes(tiny_gguf.read_bytes())
    await store.create("never-ends", files={"m.gguf": layer.digest})
    config = Config.from_env(
        {
            "CORRAL_RUNNER_ENGINE": "fake",
            "CORRAL_SIMULATE_GPUS": "[]",
            "OLLAMA_MODELS": str(tmp_path),
            "CORRAL_FAKE_KNOBS": '{"default_num_predict": 1000000000, "tokens_per_second": 0}',
            **env,
        }
    )
    sup = Supervisor(config, store, probe=SimulatedProbe((), host=(64 * GiB, 48 * GiB)))
    await sup.start()
    try:
        async with TestClient(TestServer(make_app(config, store, sup))) as client:
            r = await client.post(
                "/api/generate",
                json={
                    "model": "never-ends",
                    "prompt": "go on",
                    "stream": False,
                    "options": {"num_ctx": NUM_CTX, "num_predict": -1},
                },
            )
            body = await r.json()
            assert r.status == 200, body
            assert body["done_reason"] == "length" and body["eval_count"] == limit * NUM_CTX
    finally:
        await sup.close()
