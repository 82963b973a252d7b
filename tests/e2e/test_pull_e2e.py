"""Pull (and push) through a real ``corral serve`` with the real ``ollama`` client, from a registry
the test runs on loopback (plain http, so ``insecure=True`` as with any private http registry)."""

from __future__ import annotations

import asyncio
import os

import ollama
import pytest

from tests.daemon.registry_server import RegistryServer, sha256
from tests.e2e.conftest import start_daemon
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(120)

GGUF = "application/vnd.ollama.image.model"
PARAMS = "application/vnd.ollama.image.params"


@pytest.fixture
async def reg():
    async with RegistryServer() as r:
        yield r


@pytest.fixture
def daemon(tmp_path):
    with start_daemon(tmp_path) as d:
        yield d


@pytest.fixture
async def c(daemon):
    async with ollama.AsyncClient(host=daemon.url) as client:
        yield client


def store_tree(d) -> list[str]:
    """Stored files; partial downloads (kept for resuming, pruned at start) are not counted."""
    return sorted(
        str(p.relative_to(d.models))
        for p in d.models.rglob("*")
        if p.is_file() and "partial" not in p.name
    )


async def test_pull_then_generate(reg, daemon, tmp_path, c):
    data = write_tiny_llama(tmp_path / "t.gguf", seed=5).read_bytes()
    reg.publish("library/tiny", "latest", [(GGUF, data), (PARAMS, b'{"temperature":0}')])
    name = f"{reg.host}/library/tiny:latest"
    progress = [p async for p in await c.pull(name, insecure=True, stream=True)]
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    blob = [p for p in progress if p.digest == sha256(data)]
    assert blob and blob[-1].completed == blob[-1].total == len(data)
    assert name in [m.model for m in (await c.list()).models]
    r = await c.generate(model=name, prompt="hi", options={"num_predict": 2})
    assert r.done


async def test_interrupted_pull_resumes(reg, daemon, tmp_path, c):
    # 4 MiB, stalled after 3 MiB: past the daemon's 1 MiB write batches, so progress shows it
    data = os.urandom(4 << 20)
    digest = sha256(data)
    reg.publish("library/big", "latest", [(GGUF, data)])
    reg.stall_after[digest] = 3 << 20
    name = f"{reg.host}/library/big:latest"

    async def first() -> None:
        stream = await c.pull(name, insecure=True, stream=True)
        try:
            async for p in stream:
                if p.digest == digest and (p.completed or 0) >= 2 << 20:
                    return  # the user gives up half-way (Ctrl-C) ...
        finally:
            await stream.aclose()  # ... and the connection closes

    await asyncio.wait_for(first(), 60)
    # the half-downloaded blob is kept as a partial file for the next pull
    loop = asyncio.get_running_loop()
    end = loop.time() + 20
    while not list((daemon.models / "blobs").glob("*partial*")) and loop.time() < end:
        await asyncio.sleep(0.05)
    assert list((daemon.models / "blobs").glob("*partial*"))
    del reg.stall_after[digest]
    before = len(reg.blob_requests(digest))
    progress = [p async for p in await c.pull(name, insecure=True, stream=True)]
    assert progress[-1].status == "success"
    ranges = reg.blob_requests(digest)[before:]
    starts = [int(r.split("=")[1].split("-")[0]) for r in ranges if r]
    assert starts and min(starts) > 0, ranges  # nothing fetched twice from byte 0
    assert (daemon.models / "blobs" / f"sha256-{digest[7:]}").read_bytes() == data


async def test_wrong_digest_is_refused(reg, daemon, tmp_path, c):
    data = write_tiny_llama(tmp_path / "t.gguf", seed=7).read_bytes()
    reg.publish("library/bad", "latest", [(GGUF, data)])
    reg.corrupt.add(sha256(data))
    before = store_tree(daemon)
    with pytest.raises(ollama.ResponseError) as err:
        async for _ in await c.pull(f"{reg.host}/library/bad:latest", insecure=True, stream=True):
            pass
    assert "digest" in err.value.error
    assert store_tree(daemon) == before
    assert not list((daemon.models / "blobs").glob(f"sha256-{sha256(data)[7:]}*"))
    assert f"{reg.host}/library/bad:latest" not in [m.model for m in (await c.list()).models]


async def test_push_to_registry(reg, daemon, tmp_path, c):
    path = write_tiny_llama(tmp_path / "t.gguf", seed=8)
    name = f"{reg.host}/team/tiny:v1"
    digest = await c.create_blob(path)
    await c.create(model=name, files={"t.gguf": digest})
    statuses = [p.status async for p in await c.push(name, insecure=True, stream=True)]
    assert statuses[-1] == "success"
    assert ("team/tiny", "v1") in reg.manifests
    assert reg.blobs[digest] == path.read_bytes()
