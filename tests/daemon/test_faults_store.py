"""Store faults: a disk that fills up during an upload, a create or a pull, and racing writers.

The full disk is a quota on the store's writes: every file the store or the registry opens for
writing under the store root counts its bytes against ``free``; the write that crosses it writes
what still fits and fails with ENOSPC, as a real file system does. (Small part-progress files
written through ``Path.write_bytes`` are not counted.)

After any failure the store must be consistent: every manifest's blobs present, no temp files,
the old model of that name intact; a pull's ``-partial`` file resumes once space is back.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from corral.daemon.api.native_models import REGISTRY
from corral.daemon.models import registry as registry_mod
from corral.daemon.models import store as store_mod
from corral.daemon.models.store import MEDIA_MODEL, MEDIA_SYSTEM, Store
from tests.daemon.registry_server import RegistryServer
from tests.daemon.test_api_models import Server, srv  # noqa: F401 - fixture
from tests.daemon.test_registry import reg  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(60)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class DiskQuota:
    """``free`` bytes left for writes under ``root`` (None: unlimited)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.free: int | None = None
        self.failures = 0

    def open(self, file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wa+") and str(file).startswith(self.root):
            return _QuotaFile(f, self)
        return f


class _QuotaFile:
    def __init__(self, f, quota: DiskQuota) -> None:
        self._f, self._q = f, quota

    def write(self, data) -> int:
        q = self._q
        if q.free is not None and len(data) > q.free:
            self._f.write(data[: q.free])
            q.free = 0
            q.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device", self._f.name)
        if q.free is not None:
            q.free -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def disk(srv: Server, monkeypatch: pytest.MonkeyPatch) -> DiskQuota:
    q = DiskQuota(srv.root)
    monkeypatch.setattr(store_mod, "open", q.open, raising=False)
    monkeypatch.setattr(registry_mod, "open", q.open, raising=False)
    return q


def consistent(store: Store) -> set[str]:
    """Every manifest's blobs exist; no temp or partial file; no blob nothing references.
    Returns the blob digests."""
    refs = store.referenced_digests()
    files = {p.name for p in store.blobs_dir.iterdir()} if store.blobs_dir.is_dir() else set()
    blobs = {"sha256:" + n.removeprefix("sha256-") for n in files if len(n) == 71}
    assert files == {d.replace(":", "-") for d in blobs}, files  # nothing else lying around
    assert refs == blobs, refs ^ blobs
    temps = (
        [p for p in store.manifests_dir.rglob("*") if p.name.startswith(".")]
        if store.manifests_dir.is_dir()
        else []
    )
    assert not temps
    return blobs


async def post_json(http: aiohttp.ClientSession, path: str, body: dict) -> tuple[int, dict]:
    async with http.post(path, json=body) as r:
        return r.status, await r.json()


async def pull_v1_publish_v2(
    http: aiohttp.ClientSession, reg: RegistryServer, old: bytes
) -> tuple[str, dict, bytes]:
    """Pull v1 of ``library/tiny``, then publish v2 (same size, other bytes) at the same tag.
    Returns (name, the pull body, v2's model bytes)."""
    new = old[:-64] + bytes(64)
    name = f"{reg.host}/library/tiny"
    reg.publish("library/tiny", "latest", [(MEDIA_MODEL, old), (MEDIA_SYSTEM, b"v1")])
    pull = {"model": name, "insecure": True, "stream": False}
    assert (await post_json(http, "/api/pull", pull))[0] == 200
    reg.publish("library/tiny", "latest", [(MEDIA_MODEL, new), (MEDIA_SYSTEM, b"v2")])
    return name, pull, new


async def upload(http: aiohttp.ClientSession, data: bytes) -> tuple[int, str]:
    async with http.post(f"/api/blobs/{sha(data)}", data=data) as r:
        return r.status, await r.text()


# ---- full disk -------------------------------------------------------------------------------


async def test_blob_upload_on_a_full_disk_is_507_and_leaves_nothing(
    srv: Server, disk: DiskQuota, tiny_gguf: Path
) -> None:
    data = tiny_gguf.read_bytes()
    disk.free = len(data) // 3
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        status, text = await upload(http, data)
        assert status == 507, text
        msg = json.loads(text)["error"]
        assert msg.startswith("write ") and msg.endswith(": no space left on device"), msg
        assert disk.failures == 1
        assert consistent(srv.store) == set()  # the temp file is gone
        disk.free = None  # space is back
        assert (await upload(http, data))[0] == 201
        assert srv.store.has_blob(sha(data))


async def test_create_on_a_full_disk_never_breaks_the_old_model(
    srv: Server, disk: DiskQuota, tiny_gguf: Path
) -> None:
    """The disk fills at every possible point of a create over an existing model: each attempt
    either succeeds or is a 507 that leaves the old model exactly as it was."""
    data = tiny_gguf.read_bytes()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        assert (await upload(http, data))[0] == 201
        body = {"model": "m", "files": {"m.gguf": sha(data)}, "system": "old", "stream": False}
        assert (await post_json(http, "/api/create", body))[0] == 200
        manifest = srv.store.manifest_path(srv.store.resolve("m").model_name)
        old_bytes = manifest.read_bytes()
        outcomes = []
        for free in range(0, 2400, 40):
            disk.free = free
            status, answer = await post_json(
                http,
                "/api/create",
                {**body, "system": f"new {free}", "parameters": {"temperature": free / 1000}},
            )
            outcomes.append(status)
            if status == 200:
                assert srv.store.resolve("m").system == f"new {free}"
                break
            assert status == 507, answer
            assert answer["error"].endswith("no space left on device")
            assert manifest.read_bytes() == old_bytes
            assert srv.store.resolve("m").system == "old"
            disk.free = None
            consistent(srv.store)
        assert outcomes[-1] == 200 and outcomes.count(507) >= 10, outcomes
        disk.free = None
        consistent(srv.store)


async def test_pull_on_a_full_disk_keeps_the_old_model_and_resumes(
    srv: Server, disk: DiskQuota, reg: RegistryServer, tiny_gguf: Path
) -> None:
    old = tiny_gguf.read_bytes()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        name, pull, new = await pull_v1_publish_v2(http, reg, old)

        disk.free = len(new) // 2
        srv.server.app[REGISTRY].write_batch = 64 * 1024  # a big blob is written in batches
        reg.requests.clear()
        async with http.post("/api/pull", json={**pull, "stream": True}) as r:
            assert r.status == 200
            lines = [json.loads(x) for x in (await r.read()).splitlines()]
        error = lines[-1]["error"]
        assert error.startswith("write ") and error.endswith("-partial: no space left on device")
        assert len(reg.blob_requests(sha(new))) == 1  # no retries on a full disk
        assert srv.store.resolve(name).system == "v1"  # the old model is intact
        assert srv.store.resolve(name).model_path.read_bytes() == old
        partial = srv.store.blob_path(sha(new)).with_name(
            srv.store.blob_path(sha(new)).name + "-partial"
        )
        assert partial.is_file()
        done = json.loads(partial.with_name(partial.name + "-0").read_bytes())["Completed"]
        assert 0 < done <= len(new) // 2

        disk.free = 0  # still full: 500 when not streamed (Ollama's status for a failed pull)
        status, answer = await post_json(http, "/api/pull", pull)
        assert status == 500 and answer["error"].endswith("no space left on device")

        disk.free = None  # space is back: resume
        reg.requests.clear()
        assert (await post_json(http, "/api/pull", pull))[0] == 200
        [rng] = reg.blob_requests(sha(new))
        assert rng == f"bytes={done}-{len(new) - 1}"
        record = srv.store.resolve(name)
        assert record.system == "v2" and record.model_path.read_bytes() == new
        assert consistent(srv.store) == set(srv.store.referenced_digests())


# ---- racing writers --------------------------------------------------------------------------


async def test_two_creates_of_one_name_end_with_one_valid_model(
    srv: Server, tiny_gguf: Path
) -> None:
    data = tiny_gguf.read_bytes()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        assert (await upload(http, data))[0] == 201
        for round_ in range(5):
            bodies = [
                {
                    "model": "race",
                    "files": {"m.gguf": sha(data)},
                    "stream": False,
                    "system": f"writer {i} round {round_}",
                    "license": f"L{i}{round_}",
                }
                for i in range(2)
            ]
            answers = await asyncio.gather(*(post_json(http, "/api/create", b) for b in bodies))
            assert [a[0] for a in answers] == [200, 200]
            record = srv.store.resolve("race")
            assert record.system in {b["system"] for b in bodies}
            # one writer's model whole, not a mix of the two
            assert record.license == [f"L{record.system[7]}{round_}"]
            consistent(srv.store)


async def test_delete_during_a_pull_of_that_name_does_not_wait_and_leaves_a_consistent_store(
    srv: Server, reg: RegistryServer, tiny_gguf: Path
) -> None:
    old = tiny_gguf.read_bytes()
    async with aiohttp.ClientSession(base_url=srv.url) as http:
        name, pull, new = await pull_v1_publish_v2(http, reg, old)
        reg.stall_after[sha(new)] = len(new) // 2
        # a stalled part is retried after 0.5 s without a byte (from where it got to)
        srv.server.app[REGISTRY].stall_timeout = 0.5
        srv.server.app[REGISTRY].retries = 100
        progress = asyncio.Event()

        async def pulling() -> list[dict]:
            async with http.post("/api/pull", json={**pull, "stream": True}) as r:
                lines = []
                async for raw in r.content:
                    lines.append(json.loads(raw))
                    if lines[-1].get("completed", 0) >= len(new) // 2:
                        progress.set()
                return lines

        task = asyncio.create_task(pulling())
        await progress.wait()
        # The pull of v2 is stuck half-way: deleting the name must not wait for it.
        async with asyncio.timeout(5):
            async with http.delete("/api/delete", json={"model": name}) as r:
                assert r.status == 200
        assert not srv.store.exists(name)
        del reg.stall_after[sha(new)]  # the registry recovers: the pull ends
        lines = await task
        assert lines[-1] == {"status": "success"}
        record = srv.store.resolve(name)  # v2 whole (the delete came first)
        assert record.system == "v2" and record.model_path.read_bytes() == new
        assert not srv.store.has_blob(sha(old))  # v1's blob went with the delete
        consistent(srv.store)
