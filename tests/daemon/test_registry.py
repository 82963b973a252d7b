"""Pull and push against the loopback registry: progress, cache hits, ranged parallel parts,
resume of an interrupted pull, wrong digests, registry errors, and the HTTP routes."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import ollama
import pytest

from corral.daemon.api.native_models import REGISTRY
from corral.daemon.errors import CorralError
from corral.daemon.models.registry import Registry, go_request_error
from corral.daemon.models.store import MEDIA_MODEL, MEDIA_PARAMS, MEDIA_TEMPLATE, Store
from tests.daemon.registry_server import OLLAMA_TEMPLATE, RegistryServer
from tests.daemon.test_api_models import Server
from tests.daemon.test_store import tree


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def reg() -> AsyncIterator[RegistryServer]:
    async with RegistryServer() as r:
        yield r


def publish_tiny(reg: RegistryServer, gguf: bytes, tag: str = "latest") -> bytes:
    return reg.publish(
        "library/tiny",
        tag,
        [
            (MEDIA_MODEL, gguf),
            (MEDIA_TEMPLATE, OLLAMA_TEMPLATE.encode()),
            (MEDIA_PARAMS, b'{"stop":["<|eot_id|>"]}'),
        ],
    )


def registry(store: Store, **kw: object) -> Registry:
    kw.setdefault("backoff", 0.001)
    return Registry(store, **kw)  # type: ignore[arg-type]


async def test_pull_writes_manifest_verbatim(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path
) -> None:
    gguf = tiny_gguf.read_bytes()
    manifest = publish_tiny(reg, gguf)
    store = Store(tmp_path)
    seen: list[dict] = []
    rec = await registry(store).pull(
        f"{reg.host}/library/tiny", insecure=True, progress=seen.append
    )
    assert rec.name == f"{reg.host}/library/tiny:latest"
    assert rec.digest == hashlib.sha256(manifest).hexdigest()
    assert (tmp_path / f"manifests/{reg.host}/library/tiny/latest").read_bytes() == manifest
    assert rec.model_path is not None and rec.model_path.read_bytes() == gguf
    assert rec.template == OLLAMA_TEMPLATE and rec.parameters == {"stop": ["<|eot_id|>"]}
    statuses = [m["status"] for m in seen]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    first = next(m for m in seen if m.get("digest") == sha(gguf))
    assert first == {
        "status": f"pulling {sha(gguf)[7:19]}",
        "digest": sha(gguf),
        "total": len(gguf),
    }  # completed omitted while 0
    last = [m for m in seen if m.get("digest") == sha(gguf)][-1]
    assert last["completed"] == len(gguf)
    assert not [p for p in (tmp_path / "blobs").iterdir() if "partial" in p.name]

    # second pull: every blob is a cache hit (total == completed at once, no blob GET)
    reg.requests.clear()
    seen.clear()
    await registry(store).pull(f"{reg.host}/library/tiny", insecure=True, progress=seen.append)
    assert [m for m, _, _ in reg.requests] == ["GET"]  # the manifest only
    assert all(m["total"] == m["completed"] for m in seen if "digest" in m)


async def test_pull_in_parallel_ranged_parts(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path
) -> None:
    gguf = tiny_gguf.read_bytes()
    publish_tiny(reg, gguf)
    store = Store(tmp_path)
    r = registry(store, min_part=1000, max_part=1000)
    rec = await r.pull(f"{reg.host}/library/tiny", insecure=True)
    assert rec.model_path is not None and rec.model_path.read_bytes() == gguf
    ranges = reg.blob_requests(sha(gguf))
    n = -(-len(gguf) // 1000)
    assert len(ranges) == n
    assert sorted(ranges, key=lambda x: int(x.split("=")[1].split("-")[0])) == [
        f"bytes={o}-{min(o + 1000, len(gguf)) - 1}" for o in range(0, len(gguf), 1000)
    ]


async def test_interrupted_pull_resumes_from_partial(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path
) -> None:
    gguf = tiny_gguf.read_bytes()
    digest = sha(gguf)
    publish_tiny(reg, gguf)
    store = Store(tmp_path)
    half = len(gguf) // 2
    reg.stall_after[digest] = half
    reached = asyncio.Event()

    def watch(msg: dict) -> None:
        if msg.get("digest") == digest and msg.get("completed", 0) >= half:
            reached.set()

    pull = asyncio.create_task(
        registry(store, write_batch=4096, progress_interval=0).pull(
            f"{reg.host}/library/tiny", insecure=True, progress=watch
        )
    )
    await reached.wait()
    pull.cancel()  # the daemon stops mid-download (client gone, shutdown, crash)
    with pytest.raises(asyncio.CancelledError):
        await pull
    partial = tmp_path / "blobs" / (digest.replace(":", "-") + "-partial")
    assert partial.is_file()
    part = json.loads((partial.parent / (partial.name + "-0")).read_bytes())
    assert part == {"N": 0, "Offset": 0, "Size": len(gguf), "Completed": half}
    assert not store.exists(f"{reg.host}/library/tiny")

    del reg.stall_after[digest]
    reg.requests.clear()
    rec = await registry(store).pull(f"{reg.host}/library/tiny", insecure=True)
    assert reg.blob_requests(digest) == [f"bytes={half}-{len(gguf) - 1}"]
    assert rec.model_path is not None and rec.model_path.read_bytes() == gguf
    assert not [p for p in (tmp_path / "blobs").iterdir() if "partial" in p.name]


async def test_broken_connection_is_retried(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path
) -> None:
    gguf = tiny_gguf.read_bytes()
    publish_tiny(reg, gguf)
    reg.cut_after[sha(gguf)] = len(gguf) // 3
    rec = await registry(Store(tmp_path), retries=2).pull(f"{reg.host}/library/tiny", insecure=True)
    assert rec.model_path is not None and rec.model_path.read_bytes() == gguf
    assert len(reg.blob_requests(sha(gguf))) == 2


async def test_wrong_digest_is_refused_and_store_untouched(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path
) -> None:
    store = Store(tmp_path)
    gguf = tiny_gguf.read_bytes()
    publish_tiny(reg, gguf, tag="good")
    await registry(store).pull(f"{reg.host}/library/tiny:good", insecure=True)
    before = tree(tmp_path)

    other = gguf + b"\0" * 16  # a new blob the registry serves corrupted
    reg.publish("library/tiny", "bad", [(MEDIA_MODEL, other)])
    reg.corrupt.add(sha(other))
    with pytest.raises(CorralError) as exc:
        await registry(store).pull(f"{reg.host}/library/tiny:bad", insecure=True)
    assert exc.value.message.startswith(
        f"digest mismatch, file must be downloaded again: want {sha(other)}, got sha256:"
    )
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    # only the bad model's config blob (downloaded intact) may be new; no partial, no bad blob
    new = {k: v for k, v in after.items() if k not in before}
    assert all(k == "blobs/" + sha(v).replace(":", "-") for k, v in new.items())
    assert "blobs/" + sha(other).replace(":", "-") not in after
    assert not store.exists(f"{reg.host}/library/tiny:bad")


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("missing", "pull model manifest: file does not exist"),
        ("server_error", "download failed"),
        ("bad_manifest", "pull model manifest: invalid manifest"),
        ("traversal_digest", "pull model manifest: invalid manifest"),
    ],
)
async def test_pull_errors(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path, setup: str, error: str
) -> None:
    gguf = tiny_gguf.read_bytes()
    publish_tiny(reg, gguf)
    if setup == "server_error":
        reg.fail_blob[sha(gguf)] = 500
    elif setup == "bad_manifest":
        reg.manifests[("library/tiny", "latest")] = b"{not json"
    elif setup == "traversal_digest":
        reg.manifests[("library/tiny", "latest")] = json.dumps(
            {
                "schemaVersion": 2,
                "config": {"mediaType": "x", "digest": "sha256:../../../etc", "size": 1},
                "layers": [],
            }
        ).encode()
    store = Store(tmp_path)
    name = f"{reg.host}/library/{'nope' if setup == 'missing' else 'tiny'}"
    with pytest.raises(CorralError) as exc:
        await registry(store, retries=1).pull(name, insecure=True)
    assert error in exc.value.message
    assert not (tmp_path / "manifests").exists()


def test_unreachable_registry_texts_are_gos() -> None:
    """What Ollama's errors carry when the registry cannot be reached: Go's net/http texts."""
    url = "https://registry.ollama.ai/v2/library/gemma3/manifests/1b"
    key = SimpleNamespace(host="registry.ollama.ai", port=443, ssl=True)

    def connector(os_error: OSError) -> aiohttp.ClientConnectorError:
        return aiohttp.ClientConnectorError(key, os_error)  # type: ignore[arg-type]

    head = f'Get "{url}": '
    no_host = connector(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert go_request_error(url, no_host) == head + (
        "dial tcp: lookup registry.ollama.ai: no such host"
    )
    again = connector(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert go_request_error(url, again) == head + (
        "dial tcp: lookup registry.ollama.ai: temporary failure in name resolution"
    )
    unreachable = connector(OSError(errno.ENETUNREACH, "Network is unreachable"))
    assert go_request_error(url, unreachable) == head + (
        "dial tcp registry.ollama.ai:443: connect: network is unreachable"
    )
    timeout = aiohttp.ConnectionTimeoutError("Connection timeout to host")
    assert go_request_error(url, timeout) == head + "dial tcp registry.ollama.ai:443: i/o timeout"


async def test_http_scheme_needs_insecure(tmp_path: Path, reg: RegistryServer) -> None:
    with pytest.raises(CorralError, match="insecure protocol http"):
        await registry(Store(tmp_path)).pull(f"http://{reg.host}/library/tiny")


async def test_push_uploads_missing_blobs_then_manifest(
    tmp_path: Path, reg: RegistryServer, tiny_gguf: Path
) -> None:
    store = Store(tmp_path)
    gguf = tiny_gguf.read_bytes()

    async def one():
        yield gguf

    await store.write_blob_stream(sha(gguf), one())
    name = f"{reg.host}/me/tiny:v1"
    rec = await store.create(name, files={"t.gguf": sha(gguf)}, system="pushed")
    reg.blobs[sha(gguf)] = gguf  # already there: must be skipped (HEAD 200)
    seen: list[dict] = []
    await registry(store, min_part=100, max_part=100).push(
        name, insecure=True, progress=seen.append
    )
    statuses = [m["status"] for m in seen]
    assert statuses[0] == "retrieving manifest"
    assert statuses[-2:] == ["pushing manifest", "success"]
    assert reg.manifests[("me/tiny", "v1")] == rec.manifest_path.read_bytes()
    for layer in rec.manifest.all_layers():
        assert reg.blobs[layer.digest] == store.blob_path(layer.digest).read_bytes()
    patched = [p for m, p, _ in reg.requests if m == "PATCH"]
    assert patched  # the new small layers went through the upload flow
    assert not any(m == "POST" and sha(gguf) in p for m, p, _ in reg.requests)

    # and it pulls back into another store identically
    other = Store(tmp_path / "other")
    back = await registry(other).pull(name, insecure=True)
    assert back.digest == rec.digest and back.system == "pushed"


async def test_bearer_token_challenge(tmp_path: Path, reg: RegistryServer, tiny_gguf: Path) -> None:
    gguf = tiny_gguf.read_bytes()
    publish_tiny(reg, gguf)
    reg.token = "s3cret"
    store = Store(tmp_path)
    rec = await registry(store).pull(f"{reg.host}/library/tiny", insecure=True)
    assert rec.model_path is not None and rec.model_path.read_bytes() == gguf
    await store.copy(f"{reg.host}/library/tiny", f"{reg.host}/me/t:1")
    await registry(store).push(f"{reg.host}/me/t:1", insecure=True)
    assert ("me/t", "1") in reg.manifests


# ---- over HTTP -------------------------------------------------------------------------------


@pytest.fixture
async def srv(tmp_path: Path) -> AsyncIterator[Server]:
    s = Server(tmp_path / "models")
    await s.server.start_server()
    yield s
    await s.server.close()


async def test_pull_and_push_routes(srv: Server, reg: RegistryServer, tiny_gguf: Path) -> None:
    publish_tiny(reg, tiny_gguf.read_bytes())
    client = ollama.AsyncClient(host=srv.url)
    try:
        lines = [
            p
            async for p in await client.pull(f"{reg.host}/library/tiny", insecure=True, stream=True)
        ]
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        assert any(p.digest and p.total for p in lines)
        assert (await client.pull(f"{reg.host}/library/tiny", insecure=True)).status == "success"
        shown = await client.show(f"{reg.host}/library/tiny")
        assert shown.template == OLLAMA_TEMPLATE

        await client.copy(f"{reg.host}/library/tiny", f"{reg.host}/me/copy:1")
        assert (await client.push(f"{reg.host}/me/copy:1", insecure=True)).status == "success"
        assert ("me/copy", "1") in reg.manifests

        # unknown model: 200 stream with a final error line; stream=false: 500, as Ollama
        with pytest.raises(ollama.ResponseError) as exc:
            async for _ in await client.pull(
                f"{reg.host}/library/nope", insecure=True, stream=True
            ):
                pass
        assert exc.value.error == "pull model manifest: file does not exist"
        with pytest.raises(ollama.ResponseError) as exc:
            await client.pull(f"{reg.host}/library/nope", insecure=True)
        assert exc.value.status_code == 500
        assert exc.value.error == "pull model manifest: file does not exist"
    finally:
        await client._client.aclose()

    async with aiohttp.ClientSession(base_url=srv.url) as http:
        async with http.post(
            "/api/pull", json={"model": f"{reg.host}/library/nope", "insecure": True}
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/x-ndjson"
            lines = (await r.read()).decode().splitlines()
        assert [json.loads(x) for x in lines] == [
            {"status": "pulling manifest"},
            {"error": "pull model manifest: file does not exist"},
        ]


async def test_create_from_missing_model_pulls_it_first(
    srv: Server, reg: RegistryServer, tiny_gguf: Path
) -> None:
    """Ollama's parseFromModel: a ``from`` not in the store is pulled (default registry options,
    no insecure: the loopback registry is reached through ``base_url_for``), its progress lines in
    the create stream; a ``from`` the registry lacks fails with the pull's error and no trace."""
    gguf = tiny_gguf.read_bytes()
    reg.publish(
        "library/base",
        "latest",
        [
            (MEDIA_MODEL, gguf),
            (MEDIA_TEMPLATE, OLLAMA_TEMPLATE.encode()),
            (MEDIA_PARAMS, b'{"stop":["<|eot_id|>"]}'),
        ],
    )
    srv.server.app[REGISTRY].base_url_for = lambda _name: f"http://{reg.host}"
    base = f"{reg.host}/library/base:latest"
    assert not srv.store.exists(base)

    client = ollama.AsyncClient(host=srv.url)
    try:
        lines = [
            p
            async for p in await client.create(
                model="derived",
                from_=base,
                system="be brief",
                parameters={"temperature": 0.25},
                stream=True,
            )
        ]
        statuses = [p.status for p in lines]
        assert statuses[0] == "pulling manifest"  # the pull's lines come first, as in Ollama
        assert any(p.digest == sha(gguf) and p.total == len(gguf) for p in lines)
        assert statuses.index("writing manifest") < statuses.index("success") < len(statuses) - 1
        assert statuses[-1] == "success"
        pulled = srv.store.resolve(base)
        assert pulled.model_path is not None and pulled.model_path.read_bytes() == gguf
        derived = srv.store.resolve("derived")
        assert derived.system == "be brief"
        assert derived.parameters == {"stop": ["<|eot_id|>"], "temperature": 0.25}
        assert derived.template == OLLAMA_TEMPLATE
        assert derived.model_path == pulled.model_path
        assert (await client.show("derived")).details.parent_model == base

        # the base is local now: a second derived model does not touch the registry
        reg.requests.clear()
        assert (await client.create(model="derived2", from_=base)).status == "success"
        assert reg.requests == []

        # unknown `from`: streaming ⇒ the pull's error line; stream=false ⇒ 500 (Ollama's
        # parseFromModel error); nothing stored
        before = tree(srv.root)
        with pytest.raises(ollama.ResponseError) as exc:
            async for _ in await client.create(
                model="bad", from_=f"{reg.host}/library/nope", stream=True
            ):
                pass
        assert exc.value.error == "pull model manifest: file does not exist"
        with pytest.raises(ollama.ResponseError) as exc:
            await client.create(model="bad", from_=f"{reg.host}/library/nope")
        assert exc.value.status_code == 500
        assert exc.value.error == "pull model manifest: file does not exist"
        assert tree(srv.root) == before
        assert not srv.store.exists("bad") and not srv.store.exists(f"{reg.host}/library/nope")
    finally:
        await client._client.aclose()

    async with aiohttp.ClientSession(base_url=srv.url) as http:
        async with http.post(
            "/api/create", json={"model": "bad", "from": f"{reg.host}/library/nope"}
        ) as r:
            assert r.status == 200
            lines = (await r.read()).decode().splitlines()
        assert [json.loads(x) for x in lines] == [
            {"status": "pulling manifest"},
            {"error": "pull model manifest: file does not exist"},
        ]
