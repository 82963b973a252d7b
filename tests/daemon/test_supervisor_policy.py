"""The policy file through the supervisor: real FakeEngine runners on a simulated GPU.

Pins loaded at start and kept, a policy that cannot be met stops the start, SIGHUP's reload
(a bad file keeps the old policy), per-model defaults, /api/ps showing what applies."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from corral.daemon.api.ps import ps_models
from corral.daemon.config import SimulatedGpu
from corral.daemon.errors import Busy, NotFound
from corral.daemon.policy import PolicyError, parse
from corral.daemon.supervisor import Supervisor
from tests.daemon.test_supervisor import (  # noqa: F401 - fixtures
    GiB,
    Model,
    acquire,
    config,
    make_sup,
    models,
    until,
)


class Shelf:
    """The store's face the supervisor uses for pins: resolve, list, hold/release."""

    def __init__(self, *records: Model) -> None:
        self.records = {r.name: r for r in records}

    def resolve(self, name: str) -> Model:
        if name not in self.records:
            raise NotFound(f'model "{name}" not found, try pulling it first')
        return self.records[name]

    def list(self) -> list[Model]:
        return list(self.records.values())

    def hold(self, path: Any) -> None:
        pass

    def release(self, path: Any) -> None:
        pass


async def started(make_sup, text: str, *records: Model, **cfg: Any) -> Supervisor:
    sup = await make_sup(config(**cfg), policy=parse(text, "policy.toml"))
    sup.store = Shelf(*records)
    return sup


async def test_pins_load_at_start_and_stay_loaded(make_sup, models):
    a, b = models(0), models(1)
    sup = await started(make_sup, '[models."tiny0:*"]\npinned = true\n', a, b, keep_alive=0.0)
    assert await sup.load_pins() == ["tiny0:latest"]
    await sup.wait_processed()
    (view,) = sup.snapshot().runners
    assert view.pinned and view.deadline is None and math.isinf(view.keep_alive)
    # keep_alive 0 (request and server default) and an explicit unload leave it loaded
    async with await acquire(sup, a, keep_alive=0.0):
        pass
    await sup.unload(a)
    async with await acquire(sup, b):
        pass
    await until(sup, lambda: len(sup.snapshot().runners) == 1)  # b expired at once, a stays
    (row,) = ps_models(sup)
    assert row["name"] == "tiny0:latest" and row["pinned"] is True
    assert row["policy"] == {"pinned": True}


async def test_a_pin_missing_from_the_store_stops_the_start(make_sup, models):
    sup = await started(make_sup, '[models."nothere:1b"]\npinned = true\n', models(0))
    with pytest.raises(PolicyError, match="pinned model 'nothere:1b' cannot be loaded"):
        await sup.load_pins()


async def test_pins_that_cannot_all_fit_stop_the_start(make_sup, models):
    # One loaded model at most: the second pin can never load beside the first.
    sup = await started(
        make_sup,
        '[models."tiny*"]\npinned = true\n',
        models(0),
        models(1),
        max_loaded_models=1,
    )
    with pytest.raises(PolicyError, match="slots are held by pinned models"):
        await sup.load_pins()


async def test_per_model_slots_queue_and_defaults(make_sup, models):
    text = (
        '[models."tiny0:latest"]\nnum_parallel = 3\nmax_queue = 1\nkeep_alive = "1h"\n'
        "num_ctx = 256\n"
    )
    sup = await started(make_sup, text, models(0))
    m = models(0)
    leases = [await acquire(sup, m) for _ in range(3)]  # three slots at once
    assert {ls.runner_id for ls in leases} == {leases[0].runner_id}
    assert leases[0].n_ctx == 256  # the policy's num_ctx: neither request nor Modelfile sets it
    waiting = asyncio.ensure_future(sup.acquire(m, None, None))
    await until(sup, lambda: sup.snapshot().queued == 1)
    with pytest.raises(Busy):  # its own queue limit of 1
        await acquire(sup, m)
    for ls in leases:
        ls.release()
    async with await asyncio.wait_for(waiting, 30):
        pass
    await sup.wait_processed()
    (view,) = sup.snapshot().runners
    assert view.parallel == 3 and view.keep_alive == 3600.0


async def test_sighup_reload_applies_and_a_bad_file_keeps_the_old(make_sup, models, tmp_path):
    f: Path = tmp_path / "policy.toml"
    f.write_text('[models."tiny0:latest"]\npinned = true\n')
    cfg = config(
        policy_path=f,
        simulate_gpus=(SimulatedGpu(id="0", total=24 * GiB, free=24 * GiB, name="Sim 24G"),),
    )
    sup = await make_sup(cfg)
    m = models(0)
    sup.store = Shelf(m)
    await sup.load_pins()
    await sup.wait_processed()
    assert sup.snapshot().runners[0].pinned
    f.write_text('[models."tiny0:latest"]\npinned = maybe\n')
    assert sup.reload_policy() is False  # logged; the pin holds
    assert sup.policy_for("tiny0:latest") == {"pinned": True}
    f.write_text('[models."tiny0:latest"]\nkeep_alive = 0\n')
    assert sup.reload_policy() is True
    await sup.wait_processed()
    # unpinned: back to the server's keep-alive, the runner expires like any other
    assert not sup.snapshot().runners[0].pinned
    assert sup.policy_for("tiny0:latest") == {"keep_alive": 0.0}


def test_a_bad_policy_file_stops_the_supervisor_naming_the_line(tmp_path):
    f = tmp_path / "policy.toml"
    f.write_text('[models."a"]\nnum_parallel = 2\nreplicas = "two"\n')
    with pytest.raises(PolicyError, match=r"policy.toml:3: models.\"a\".replicas"):
        Supervisor(config(policy_path=f))
